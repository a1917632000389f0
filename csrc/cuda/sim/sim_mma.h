// Simulator side of the MMA section of csrc/cuda/intrinsics.cuh: cp.async, ldmatrix and
// mma.sync m16n8k16 (bf16 / fp16 inputs, fp32 accumulators) emulated on the CPU.
//
//   cp_async_16   the global source is read at issue (16 bytes, or the first src_bytes of them
//                 with the rest zero-filled, as cp.async's src-size operand) and written to shared
//                 memory when the issuing thread's cp_async_wait<N> retires its group (groups
//                 formed by cp_async_commit, oldest first): a missing or too lax wait leaves stale
//                 shared memory behind, as on the device. Per fiber and block: copies a thread
//                 leaves unretired when it returns are dropped (kernels end with cp_async_wait<0>).
//                 Not modelled: other threads see a landed copy at once, so a missing block_sync
//                 after the wait is not detected (the fibers' round-robin keeps warps in step).
//   ldmatrix_x4   one warp exchange of the lanes' row addresses, then each lane reads its
//                 fragment per the PTX ISA layout (matrix i = rows given by lanes 8i..8i+7; lane l
//                 receives row l/4, 16-bit columns 2(l%4), 2(l%4)+1 of each matrix, lower column
//                 in the low half).
//   mma_m16n8k16  three warp exchanges gather the A (4 regs) and B (2 regs) fragments of the 32
//                 lanes; each lane then computes its own 4 D elements (fragment layout of the PTX
//                 ISA, "mma.m16n8k16 .bf16/.f16": groupID g = lane/4, t = lane%4; A a0:(g,2t..)
//                 a1:(g+8,2t..) a2:(g,2t+8..) a3:(g+8,2t+8..); B b0:(k=2t..,n=g) b1:(k=2t+8..,n=g);
//                 C/D c0:(g,2t) c1:(g,2t+1) c2:(g+8,2t) c3:(g+8,2t+1)).
//                 Fixed-order scalar routine per D element: the 16 products A(r,k)*B(k,c) (exact:
//                 bf16*bf16 and fp16*fp16 products fit in binary64, and in fact in fp32), summed in
//                 ascending k in binary64 (exact unless the products' exponents span > ~30
//                 binades), + C in binary64, then rounded to fp32 (nearest even).
//                 The tensor core aligns the products to the largest exponent and truncates, so
//                 its bits can differ from this routine in the last place of a k16 step: the
//                 simulator checks the kernels' logic (fragment indexing, masking, tails, tile
//                 boundaries, the K order), not the tensor core's internal rounding.
#pragma once

#ifndef BI_CUDA_SIM
#error "sim_mma.h is part of the simulator shim: compile with -DBI_CUDA_SIM"
#endif

#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "sim.h"

namespace bi {
namespace cuda {
namespace sim {

struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;                 // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> groups;  // committed, oldest first
  const unsigned char* smem = nullptr;         // the block these copies belong to
  uint3 block{0, 0, 0};
  dim3 grid{0, 0, 0};
};
// Pending copies of each fiber of the launch in progress on this OS thread.
inline std::unordered_map<const ThreadCtx*, AsyncCopies>& async_copies() {
  static thread_local std::unordered_map<const ThreadCtx*, AsyncCopies> m;
  return m;
}
inline AsyncCopies& my_async_copies() {
  AsyncCopies& a = async_copies()[&ctx()];
  const uint3 b = ctx().block_idx;
  const dim3 g = ctx().grid_dim;
  const unsigned char* smem = dynamic_smem_ptr();
  if (a.smem != smem || a.block.x != b.x || a.block.y != b.y || a.block.z != b.z || a.grid.x != g.x ||
      a.grid.y != g.y || a.grid.z != g.z) {
    // another block (or launch) on this fiber slot: copies left over by a thread that returned
    // without retiring them (or by an aborted launch) are dropped, never written
    a.open.clear();
    a.groups.clear();
    a.smem = smem;
    a.block = b;
    a.grid = g;
  }
  return a;
}

inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  AsyncCopy c;
  c.dst = static_cast<unsigned char*>(smem_dst);
  const int n = src_bytes < 0 ? 0 : (src_bytes > 16 ? 16 : src_bytes);
  if (n) std::memcpy(c.data, gmem_src, size_t(n));
  if (n < 16) std::memset(c.data + n, 0, size_t(16 - n));
  my_async_copies().open.push_back(c);
}
inline void cp_async_commit() {
  AsyncCopies& a = my_async_copies();
  a.groups.push_back(std::move(a.open));
  a.open.clear();
}
inline void cp_async_wait(int pending) {
  AsyncCopies& a = my_async_copies();
  while (int(a.groups.size()) > pending) {
    for (const AsyncCopy& c : a.groups.front()) std::memcpy(c.dst, c.data, 16);
    a.groups.pop_front();
  }
  if (a.groups.empty() && a.open.empty()) async_copies().erase(&ctx());  // nothing pending: no state kept
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint64_t* all = warp_exchange(uint64_t(reinterpret_cast<uintptr_t>(smem_row)), kWarpShfl);
  uint64_t rows[32];
  std::memcpy(rows, all, sizeof(rows));
  const int l = lane();
  for (int i = 0; i < 4; ++i) {
    const unsigned char* row = reinterpret_cast<const unsigned char*>(uintptr_t(rows[8 * i + l / 4]));
    if (row == nullptr) throw std::runtime_error("cuda sim: ldmatrix with a lane of the warp not taking part");
    std::memcpy(&r[i], row + 4 * (l % 4), 4);
  }
}

inline double mma_elem_to_double(uint32_t bits16, bool bf16) {
  if (bf16) {
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return double(f);
  }
  __half_raw h;
  h.x = static_cast<unsigned short>(bits16);
  return double(__half2float(__half(h)));
}

// 16-bit element `half` (0: low, 1: high) of a 32-bit register.
inline uint32_t mma_half(uint64_t pair, int reg_hi, int half) {
  const uint32_t reg = uint32_t(reg_hi ? (pair >> 32) : pair);
  return half ? (reg >> 16) : (reg & 0xffffu);
}

inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         bool bf16) {
  uint64_t a01[32], a23[32], b01[32];
  std::memcpy(a01, warp_exchange(uint64_t(a[0]) | (uint64_t(a[1]) << 32), kWarpShfl), sizeof(a01));
  std::memcpy(a23, warp_exchange(uint64_t(a[2]) | (uint64_t(a[3]) << 32), kWarpShfl), sizeof(a23));
  std::memcpy(b01, warp_exchange(uint64_t(b[0]) | (uint64_t(b[1]) << 32), kWarpShfl), sizeof(b01));
  const int l = lane();
  const int g = l / 4, t = l % 4;
  // A rows g and g + 8 (k = 0..15): lane 4g + (k%8)/2, register a0/a2 (row g) or a1/a3 (row g+8)
  double arow[2][16], bcol[2][16];
  for (int k = 0; k < 16; ++k) {
    const int src = 4 * g + (k % 8) / 2, half = k % 2;
    const uint64_t* pair = k < 8 ? a01 : a23;
    arow[0][k] = mma_elem_to_double(mma_half(pair[src], 0, half), bf16);
    arow[1][k] = mma_elem_to_double(mma_half(pair[src], 1, half), bf16);
  }
  // B columns n = 2t and 2t + 1: lane 4n + (k%8)/2, register b0 (k < 8) or b1
  for (int j = 0; j < 2; ++j) {
    const int n = 2 * t + j;
    for (int k = 0; k < 16; ++k)
      bcol[j][k] = mma_elem_to_double(mma_half(b01[4 * n + (k % 8) / 2], k >= 8, k % 2), bf16);
  }
  for (int i = 0; i < 4; ++i) {
    const double* ar = arow[i / 2];
    const double* bc = bcol[i % 2];
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += ar[k] * bc[k];
    d[i] = float(s + double(c[i]));
  }
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
