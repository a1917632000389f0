// The one wrapper header for everything a CUDA kernel body may not write directly: warp shuffles
// and votes, barriers, dynamic shared memory, the explicitly rounded fp32 operations and the
// half / bfloat16 conversions (later: mma, ldmatrix, cp.async). Kernel bodies (csrc/cuda/kernels/
// *.cuh) call only these wrappers, never a CUDA intrinsic or inline PTX themselves.
//
//   BI_CUDA_SIM defined  -> the CPU SIMT simulator's implementations (csrc/cuda/sim/sim.h): the
//                           kernel bodies compile with g++ and run on the CPU, bit for bit as on
//                           the device (same IEEE operations, same order).
//   otherwise            -> the device implementations (nvcc).
//
// Interface (namespace bi::cuda; all __device__ __forceinline__):
//   block_sync()                        __syncthreads()
//   warp_sync()                         __syncwarp()            (full warp)
//   warp_shfl_xor(v, lane_mask)         __shfl_xor_sync(0xffffffff, v, lane_mask), v float|int|unsigned
//   warp_shfl(v, src_lane)              __shfl_sync(0xffffffff, v, src_lane)
//   warp_ballot(p) / warp_any(p) / warp_all(p)   full-warp votes
//   dynamic_smem<T>()                   the block's `extern __shared__` buffer (16-byte aligned)
//   add_rn sub_rn mul_rn div_rn sqrt_rn fma_rn   IEEE fp32, round to nearest even, never contracted
//   rint_rn(x)                          round to nearest integer, ties to even (fp32 result)
//   float_as_uint / uint_as_float       bit casts
//   to_f32(T) / from_f32<T>(float)      T in {float, __half, __nv_bfloat16}; from_f32 rounds to
//                                       nearest even (NaN -> the canonical NaN of the type)
// Warp operations need all 32 lanes of the warp (kernels keep them warp-uniform); the simulator
// reports a launch in which they are not (deadlock / divergence) as an error.
//
// Device builds must not use --use_fast_math / -ftz=true / -prec-div=false / -prec-sqrt=false:
// the _rn operations then flush subnormals (mul.rn.ftz) and the simulator would no longer match.
#pragma once

#include <cstdint>

#ifdef BI_CUDA_SIM
#include "sim/sim.h"
#include "sim/sim_mma.h"  // MMA section: cp.async, ldmatrix, mma.sync
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace bi {
namespace cuda {

#ifdef BI_CUDA_SIM
#define BI_DEV inline
#else
#define BI_DEV __device__ __forceinline__
#endif

// ------------------------------------------------------------------------------------------
// Barriers, shuffles, votes.
#ifdef BI_CUDA_SIM

BI_DEV void block_sync() { sim::block_barrier(); }
BI_DEV void warp_sync() { sim::warp_exchange(0, sim::kWarpSync); }

template <typename V>
BI_DEV V sim_shfl(V v, int lane, sim::WarpOp op) {
  static_assert(sizeof(V) <= 8, "warp shuffles move at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  const uint64_t* all = sim::warp_exchange(bits, op);
  V r;
  std::memcpy(&r, &all[lane], sizeof(V));
  return r;
}
BI_DEV float warp_shfl_xor(float v, int lane_mask) {
  return sim_shfl(v, (sim::lane() ^ lane_mask) & 31, sim::kWarpShfl);
}
BI_DEV int warp_shfl_xor(int v, int lane_mask) {
  return sim_shfl(v, (sim::lane() ^ lane_mask) & 31, sim::kWarpShfl);
}
BI_DEV unsigned warp_shfl_xor(unsigned v, int lane_mask) {
  return sim_shfl(v, (sim::lane() ^ lane_mask) & 31, sim::kWarpShfl);
}
BI_DEV float warp_shfl(float v, int src_lane) { return sim_shfl(v, src_lane & 31, sim::kWarpShfl); }
BI_DEV int warp_shfl(int v, int src_lane) { return sim_shfl(v, src_lane & 31, sim::kWarpShfl); }
BI_DEV unsigned warp_shfl(unsigned v, int src_lane) { return sim_shfl(v, src_lane & 31, sim::kWarpShfl); }
BI_DEV unsigned warp_ballot(bool p) {
  const uint64_t* all = sim::warp_exchange(p ? 1u : 0u, sim::kWarpVote);
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= (all[l] ? 1u : 0u) << l;  // lanes beyond the warp: 0
  return m;
}
BI_DEV bool warp_any(bool p) { return warp_ballot(p) != 0u; }
BI_DEV bool warp_all(bool p) { return warp_ballot(p) == sim::warp_lane_mask(); }

template <typename T>
BI_DEV T* dynamic_smem() { return reinterpret_cast<T*>(sim::dynamic_smem_ptr()); }

#else  // device

BI_DEV void block_sync() { __syncthreads(); }
BI_DEV void warp_sync() { __syncwarp(0xffffffffu); }
BI_DEV float warp_shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
BI_DEV int warp_shfl_xor(int v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
BI_DEV unsigned warp_shfl_xor(unsigned v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
BI_DEV float warp_shfl(float v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BI_DEV int warp_shfl(int v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BI_DEV unsigned warp_shfl(unsigned v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BI_DEV unsigned warp_ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
BI_DEV bool warp_any(bool p) { return __any_sync(0xffffffffu, p) != 0; }
BI_DEV bool warp_all(bool p) { return __all_sync(0xffffffffu, p) != 0; }

template <typename T>
BI_DEV T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char bi_dynamic_smem[];
  return reinterpret_cast<T*>(bi_dynamic_smem);
}

#endif

// ------------------------------------------------------------------------------------------
// fp32 arithmetic with explicit rounding (never fused / contracted by the compiler).
#ifdef BI_CUDA_SIM
// The simulator is compiled with -ffp-contract=off and SSE math: each operation below is one
// IEEE binary32 operation, round to nearest even, subnormals kept (as the device without ftz).
// A NaN result becomes the canonical NaN 0x7fffffff, as on the device (x86 would return the
// first operand's payload or the negative default NaN).
BI_DEV uint32_t float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
BI_DEV float uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
BI_DEV float sim_canon(float r) { return r == r ? r : uint_as_float(0x7fffffffu); }
BI_DEV float add_rn(float a, float b) { return sim_canon(a + b); }
BI_DEV float sub_rn(float a, float b) { return sim_canon(a - b); }
BI_DEV float mul_rn(float a, float b) { return sim_canon(a * b); }
BI_DEV float div_rn(float a, float b) { return sim_canon(a / b); }
BI_DEV float sqrt_rn(float a) { return sim_canon(std::sqrt(a)); }
BI_DEV float fma_rn(float a, float b, float c) { return sim_canon(std::fma(a, b, c)); }
BI_DEV float rint_rn(float a) { return sim_canon(std::nearbyint(a)); }  // ties to even (default mode)
#else
BI_DEV float add_rn(float a, float b) { return __fadd_rn(a, b); }
BI_DEV float sub_rn(float a, float b) { return __fsub_rn(a, b); }
BI_DEV float mul_rn(float a, float b) { return __fmul_rn(a, b); }
BI_DEV float div_rn(float a, float b) { return __fdiv_rn(a, b); }
BI_DEV float sqrt_rn(float a) { return __fsqrt_rn(a); }
BI_DEV float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
BI_DEV float rint_rn(float a) { return rintf(a); }  // cvt.rni.f32.f32
BI_DEV uint32_t float_as_uint(float f) { return __float_as_uint(f); }
BI_DEV float uint_as_float(uint32_t u) { return __uint_as_float(u); }
#endif

// ------------------------------------------------------------------------------------------
// Number formats. The simulator uses the host implementations of cuda_fp16.h / cuda_bf16.h
// (round to nearest even, canonical NaN), the device the cvt instructions: the same bits.
BI_DEV float to_f32(float v) { return v; }
BI_DEV float to_f32(__half v) { return __half2float(v); }
BI_DEV float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct FromF32;
template <> struct FromF32<float> { static BI_DEV float cvt(float v) { return v; } };
template <> struct FromF32<__half> { static BI_DEV __half cvt(float v) { return __float2half_rn(v); } };
template <> struct FromF32<__nv_bfloat16> {
  static BI_DEV __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <typename T>
BI_DEV T from_f32(float v) { return FromF32<T>::cvt(v); }

// ------------------------------------------------------------------------------------------
// MMA section (sm_80+; used by kernels/linear.cuh). Tensor-core matrix multiply-accumulate and
// the shared-memory pipeline that feeds it:
//   cp_async_16(smem, gmem, src_bytes)   cp.async.cg.shared.global 16 bytes; bytes beyond src_bytes
//                                        (0 or 16 in our kernels) are zero-filled
//   cp_async_commit() / cp_async_wait<N>()   cp.async.commit_group / cp.async.wait_group N
//   ldmatrix_x4(r, smem_row)             ldmatrix.sync.aligned.m8n8.x4.shared.b16 (this lane's row
//                                        address; 16-byte aligned)
//   mma_m16n8k16<T>(d, a, b, c)          mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, T in
//                                        {__nv_bfloat16, __half}; fragments per the PTX ISA layout
// This is the one instruction family of the bf16 / fp16 GEMM on every sm_80+ target, sm_90a
// included (mma.sync, not wgmma), for every M. Simulator: csrc/cuda/sim/sim_mma.h (its mma is a
// fixed-order scalar routine, not bit-exact with the tensor core: it tests the kernels' logic).
#ifdef BI_CUDA_SIM
BI_DEV void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  sim::cp_async_16(smem_dst, gmem_src, src_bytes);
}
BI_DEV void cp_async_commit() { sim::cp_async_commit(); }
template <int N>
BI_DEV void cp_async_wait() { sim::cp_async_wait(N); }
BI_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { sim::ldmatrix_x4(r, smem_row); }
template <typename T> struct MmaM16N8K16;
template <> struct MmaM16N8K16<__nv_bfloat16> {
  static BI_DEV void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    sim::mma_m16n8k16(d, a, b, c, true);
  }
};
template <> struct MmaM16N8K16<__half> {
  static BI_DEV void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    sim::mma_m16n8k16(d, a, b, c, false);
  }
};
#else  // device
BI_DEV uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
BI_DEV void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}
BI_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
BI_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
BI_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row))
               : "memory");
}
template <typename T> struct MmaM16N8K16;
template <> struct MmaM16N8K16<__nv_bfloat16> {
  static BI_DEV void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
};
template <> struct MmaM16N8K16<__half> {
  static BI_DEV void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
};
#endif
template <typename T>
BI_DEV void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  MmaM16N8K16<T>::run(d, a, b, c);
}

}  // namespace cuda
}  // namespace bi
