// CUDA RMSNorm / fused add + RMSNorm kernel body (torch-free; nvcc, or g++ -DBI_CUDA_SIM for the
// CPU simulator). One block per row, THREADS = rms_norm_threads(hidden) threads.
//
// Interface (used by the launcher csrc/cuda/*.cu and the simulator module csrc/cuda/sim/):
//   template <typename T, typename W> struct RmsNormArgs {
//     const T* x; int64_t x_stride; const T* residual; int64_t residual_stride;  // residual may be nullptr
//     T* residual_out; int64_t residual_out_stride; const W* weight; T* out; int64_t out_stride;
//     int64_t rows; int hidden; float eps; };
//   int rms_norm_threads(int hidden);     // block size: a function of hidden only
//   template <typename T, typename W, int THREADS> __global__ void rms_norm_kernel(RmsNormArgs<T, W>);
//       grid = rows (one block per row), block = THREADS, no dynamic shared memory
//   dispatch_threads(threads, f)          // (row_common.cuh) f(std::integral_constant<int, THREADS>{})
// T in {float, __half, __nv_bfloat16}; W (weight) is T or float. Strides in elements; the hidden dim
// is contiguous in every tensor. In-place use is allowed (out == x, residual_out == residual):
// each thread reads and writes only its own chunks, in the order below.
//
// Per row (the contract of DESIGN.md §1 in this backend's reduction order, row_common.cuh):
//   z   = x                                   (rms_norm)
//   z   = round_T(x + residual), written to residual_out first (fused; the new residual)
//   ss  = sum over h of z_h * z_h: acc = fma_rn(z, z, acc) per thread in the chunk order, then the
//         warp butterfly and the cross-warp tree (block_reduce<SumOp>)
//   r   = 1 / sqrt(ss / H + eps)              (div_rn, add_rn, sqrt_rn, div_rn: the CPU's formula)
//   out = round_T((z * r) * w)                (two mul_rn, one rounding)
// The fused kernel's second pass reads z back from residual_out (the thread's own writes).
#pragma once

#include <cstdint>

#include "row_common.cuh"

namespace bi {
namespace cuda {

template <typename T, typename W>
struct RmsNormArgs {
  const T* x;
  int64_t x_stride;
  const T* residual;  // nullptr: plain rms_norm
  int64_t residual_stride;
  T* residual_out;
  int64_t residual_out_stride;
  const W* weight;
  T* out;
  int64_t out_stride;
  int64_t rows;
  int hidden;
  float eps;
};

inline int rms_norm_threads(int hidden) { return row_threads_for(hidden); }

template <typename T, typename W, int THREADS>
__global__ void __launch_bounds__(THREADS) rms_norm_kernel(RmsNormArgs<T, W> a) {
  __shared__ float red[THREADS / kWarp];
  const int64_t row = blockIdx.x;
  if (row >= a.rows) return;  // block-uniform
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t H = a.hidden;
  const int64_t nchunks = (H + VEC - 1) / VEC;
  const int tid = int(threadIdx.x);
  const bool fused = a.residual != nullptr;

  const T* x = a.x + row * a.x_stride;
  const T* res = fused ? a.residual + row * a.residual_stride : nullptr;
  T* z_out = fused ? a.residual_out + row * a.residual_out_stride : nullptr;
  const bool x_al = aligned16(x);
  const bool res_al = fused && aligned16(res);
  const bool z_al = fused && aligned16(z_out);

  // Pass 1: z (fused: round(x + residual), stored), per-thread sum of squares.
  float acc = 0.0f;
  for (int64_t c = tid; c < nchunks; c += THREADS) {
    const int n = int(H - c * VEC < VEC ? H - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
    if (fused) {
      float r[VEC];
      load_chunk<VEC>(res, c, n, res_al, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = to_f32(from_f32<T>(add_rn(z[j], r[j])));
      store_chunk<VEC>(z_out, c, n, z_al, z);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) acc = fma_rn(z[j], z[j], acc);
  }

  const float ss = block_reduce<SumOp, THREADS>(acc, red);
  const float mean = div_rn(ss, float(H));
  const float r = div_rn(1.0f, sqrt_rn(add_rn(mean, a.eps)));

  // Pass 2: out = round((z * r) * w), z re-read from the thread's own chunks.
  const T* zsrc = fused ? static_cast<const T*>(z_out) : x;
  const bool zsrc_al = fused ? z_al : x_al;
  const bool w_al = aligned16(a.weight);
  T* out = a.out + row * a.out_stride;
  const bool out_al = aligned16(out);
  for (int64_t c = tid; c < nchunks; c += THREADS) {
    const int n = int(H - c * VEC < VEC ? H - c * VEC : VEC);
    float z[VEC], w[VEC], y[VEC];
    load_chunk<VEC>(zsrc, c, n, zsrc_al, z);
    load_chunk<VEC>(a.weight, c, n, w_al, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = mul_rn(mul_rn(z[j], r), w[j]);
    store_chunk<VEC>(out, c, n, out_al, y);
  }
}

}  // namespace cuda
}  // namespace bi
