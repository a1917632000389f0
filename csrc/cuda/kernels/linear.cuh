// Batch-invariant GEMM: out[b, m, n] = sum_k x[b, m, k] * w[b, n, k] (+ bias[n]), the kernel body
// of linear (B = 1) and bmm_nt. Torch-free; launched by csrc/cuda/launch_linear.cu and, on the
// CPU, by csrc/cuda/sim/sim_linear.cpp.
//
// Contract (DESIGN.md section 1, contract.py GPU_MATMUL_BLOCK_K): every output element has one
// fp32 accumulator, starting from +0; K is walked from 0 upward in steps of BLOCK_K (LinearBlockK
// below: 64 for bf16 / fp16, 32 for fp32), the part of a step beyond K zero-filled; the bias (fp32)
// is added after the full K sum; one rounding to the output dtype. The order depends on (K, dtype,
// arch) only:
//   * bf16 / fp16: tensor cores, mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 on
//     every sm_80+ target (sm_90a too: mma.sync, not wgmma). Inside a BLOCK_K step the k16 MMAs run
//     in ascending k, each one D = A*B + C on the accumulator fragment. One tile configuration for
//     every M (MmaTile: 128 x 128 x BLOCK_K, 8 warps of 64 x 32, 3-stage cp.async pipeline,
//     ldmatrix fragments): no GEMV path, no M buckets; rows beyond M are zero-filled in shared
//     memory and never stored. Which rows / columns share a tile changes no element's arithmetic.
//   * fp32: SIMT, IEEE fp32 fma (fma_rn) per k in ascending order on one accumulator per element
//     (never TF32): acc = fma(x[m,k], w[n,k], acc) for k = 0..K-1 (SimtTile: 64 x 64 x BLOCK_K).
// Loads: 16-byte cp.async when every row start is 16-byte aligned (VEC; 2-byte types: K, the row
// and batch strides multiples of 8 and aligned base pointers), else element-wise loads; the choice
// moves data only, the arithmetic is the same.
// Grid: x = M tiles, y = N tiles, z = batches (the launcher slices z above 65535: batch0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../intrinsics.cuh"

namespace bi {
namespace cuda {

// contract.py GPU_MATMUL_BLOCK_K (reported by the modules as linear_block_k(dtype) and compared
// with contract.py by the tests).
template <typename T> struct LinearBlockK;
template <> struct LinearBlockK<__nv_bfloat16> { static constexpr int value = 64; };
template <> struct LinearBlockK<__half> { static constexpr int value = 64; };
template <> struct LinearBlockK<float> { static constexpr int value = 32; };

// bf16 / fp16 tensor-core tile (one configuration for every M, N, K).
struct MmaTile {
  static constexpr int BM = 128, BN = 128;
  static constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 64 x 32 per warp
  static constexpr int MI = WM / 16, NI = WN / 8;             // m16 x n8 fragments per warp
  static constexpr int STAGES = 3;
  static constexpr int PAD = 8;  // row padding (elements): 16-byte rows, conflict-free ldmatrix
};
// fp32 SIMT tile: 256 threads as 16 x 16, each 4 x 4 outputs (rows ty + 16 i, columns tx + 16 j).
struct SimtTile {
  static constexpr int BM = 64, BN = 64, THREADS = 256, TM = 4, TN = 4;
};

template <typename T>
struct LinearTile : MmaTile {
  static constexpr int BK = LinearBlockK<T>::value;
  static constexpr int LD = BK + PAD;
  static constexpr size_t kDynamicSmem = size_t(STAGES) * (BM + BN) * LD * sizeof(T);
};
template <>
struct LinearTile<float> : SimtTile {
  static constexpr int BK = LinearBlockK<float>::value;
  static constexpr size_t kDynamicSmem = 0;  // static shared memory
};

template <typename T, typename O>
struct LinearArgs {
  const T* x;            // [B][M][K] rows of stride x_stride (elements), batches x_batch_stride
  int64_t x_stride;
  int64_t x_batch_stride;
  const T* w;            // [B][N][K]
  int64_t w_stride;
  int64_t w_batch_stride;
  const float* bias;     // [N] fp32 (every batch) or nullptr
  O* out;                // [B][M][N]
  int64_t out_stride;
  int64_t out_batch_stride;
  int M, N, K;
  int64_t batch0;        // batch of blockIdx.z == 0
};

// ------------------------------------------------------------------------------------------
// bf16 / fp16: mma.sync kernel.
template <typename T, typename O, bool VEC>
__global__ void __launch_bounds__(MmaTile::THREADS) linear_mma_kernel(LinearArgs<T, O> p) {
  using Tile = LinearTile<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, LD = Tile::LD, THREADS = Tile::THREADS;
  constexpr int STAGES = Tile::STAGES, MI = Tile::MI, NI = Tile::NI;
  constexpr int STAGE_ELEMS = (BM + BN) * LD;
  static_assert(BK % 16 == 0 && NI % 2 == 0, "tile shape");

  T* smem = dynamic_smem<T>();
  const int tid = int(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int wm0 = (warp / Tile::WARPS_N) * Tile::WM, wn0 = (warp % Tile::WARPS_N) * Tile::WN;
  const int64_t batch = p.batch0 + int64_t(blockIdx.z);
  const int m0 = int(blockIdx.x) * BM, n0 = int(blockIdx.y) * BN;
  const T* x = p.x + batch * p.x_batch_stride;
  const T* w = p.w + batch * p.w_batch_stride;
  const int M = p.M, N = p.N, K = p.K;
  const int ktiles = (K + BK - 1) / BK;

  // Copies K step kt into stage `stage` (rows beyond M / N and columns beyond K: zeros).
  auto load_tile = [&](int kt, int stage) {
    T* sA = smem + stage * STAGE_ELEMS;
    T* sB = sA + BM * LD;
    const int k0 = kt * BK;
    if (VEC) {
      constexpr int CPR = BK / 8;  // 16-byte chunks per row
      for (int c = tid; c < BM * CPR; c += THREADS) {
        const int r = c / CPR, kc = (c % CPR) * 8;
        const bool ok = m0 + r < M && k0 + kc < K;
        const T* src = ok ? x + int64_t(m0 + r) * p.x_stride + (k0 + kc) : x;
        cp_async_16(sA + r * LD + kc, src, ok ? 16 : 0);
      }
      for (int c = tid; c < BN * CPR; c += THREADS) {
        const int r = c / CPR, kc = (c % CPR) * 8;
        const bool ok = n0 + r < N && k0 + kc < K;
        const T* src = ok ? w + int64_t(n0 + r) * p.w_stride + (k0 + kc) : w;
        cp_async_16(sB + r * LD + kc, src, ok ? 16 : 0);
      }
    } else {
      const T zero = from_f32<T>(0.0f);
      for (int e = tid; e < BM * BK; e += THREADS) {
        const int r = e / BK, kk = e % BK;
        const bool ok = m0 + r < M && k0 + kk < K;
        sA[r * LD + kk] = ok ? x[int64_t(m0 + r) * p.x_stride + (k0 + kk)] : zero;
      }
      for (int e = tid; e < BN * BK; e += THREADS) {
        const int r = e / BK, kk = e % BK;
        const bool ok = n0 + r < N && k0 + kk < K;
        sB[r * LD + kk] = ok ? w[int64_t(n0 + r) * p.w_stride + (k0 + kk)] : zero;
      }
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // Pipeline: STAGES - 1 steps in flight; one commit group per step (possibly empty).
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of step kt have landed
    block_sync();                 // everyone's; and step kt - 1's stage is free again
    if (kt + STAGES - 1 < ktiles) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
    cp_async_commit();
    const T* sA = smem + (kt % STAGES) * STAGE_ELEMS;
    const T* sB = sA + BM * LD;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {  // k16 steps in ascending k
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i)  // lanes 0-15: rows 0-15 at k 0; lanes 16-31: rows 0-15 at k 8
        ldmatrix_x4(af[i], sA + (wm0 + i * 16 + lane % 16) * LD + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int j = 0; j < NI / 2; ++j) {  // matrices: (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15)
        const int mat = lane / 8;
        uint32_t r[4];
        ldmatrix_x4(r, sB + (wn0 + j * 16 + (mat / 2) * 8 + lane % 8) * LD + ks * 16 + (mat % 2) * 8);
        bfr[2 * j][0] = r[0];
        bfr[2 * j][1] = r[1];
        bfr[2 * j + 1][0] = r[2];
        bfr[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bfr[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: fragment (i, j) element e is row g (+8 for e >= 2), column 2t + (e & 1).
  O* out = p.out + batch * p.out_batch_stride;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm0 + i * 16 + g + 8 * h;
      if (row >= M) continue;
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + wn0 + j * 8 + 2 * t + e;
          if (col >= N) continue;
          float v = acc[i][j][2 * h + e];
          if (p.bias != nullptr) v = add_rn(v, p.bias[col]);
          out[int64_t(row) * p.out_stride + col] = from_f32<O>(v);
        }
    }
}

// ------------------------------------------------------------------------------------------
// fp32: SIMT kernel, one fma_rn per (element, k), k ascending.
template <typename O>
__global__ void __launch_bounds__(SimtTile::THREADS) linear_simt_kernel(LinearArgs<float, O> p) {
  using Tile = LinearTile<float>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, THREADS = Tile::THREADS;
  constexpr int TM = Tile::TM, TN = Tile::TN;
  static_assert(THREADS == (BM / TM) * (BN / TN) && BM / TM == 16 && BN / TN == 16, "tile shape");
  __shared__ float sA[BK][BM + 1];
  __shared__ float sB[BK][BN + 1];

  const int tid = int(threadIdx.x);
  const int ty = tid / 16, tx = tid % 16;
  const int64_t batch = p.batch0 + int64_t(blockIdx.z);
  const int m0 = int(blockIdx.x) * BM, n0 = int(blockIdx.y) * BN;
  const float* x = p.x + batch * p.x_batch_stride;
  const float* w = p.w + batch * p.w_batch_stride;
  const int M = p.M, N = p.N, K = p.K;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int r = e / BK, kk = e % BK;
      sA[kk][r] = (m0 + r < M && k0 + kk < K) ? x[int64_t(m0 + r) * p.x_stride + (k0 + kk)] : 0.0f;
    }
    for (int e = tid; e < BN * BK; e += THREADS) {
      const int r = e / BK, kk = e % BK;
      sB[kk][r] = (n0 + r < N && k0 + kk < K) ? w[int64_t(n0 + r) * p.w_stride + (k0 + kk)] : 0.0f;
    }
    block_sync();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = sA[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = sB[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma_rn(a[i], b[j], acc[i][j]);
    }
    block_sync();
  }

  O* out = p.out + batch * p.out_batch_stride;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int row = m0 + ty + 16 * i;
    if (row >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int col = n0 + tx + 16 * j;
      if (col >= N) continue;
      float v = acc[i][j];
      if (p.bias != nullptr) v = add_rn(v, p.bias[col]);
      out[int64_t(row) * p.out_stride + col] = from_f32<O>(v);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Launch plan, shared by the device launcher and the simulator (host code).

// Whether the 16-byte cp.async path applies: every row start of x and w 16-byte aligned.
template <typename T>
inline bool linear_vec_ok(const void* x, int64_t x_stride, int64_t x_batch_stride, const void* w, int64_t w_stride,
                          int64_t w_batch_stride, int64_t batches, int K) {
  constexpr int64_t V = 16 / int64_t(sizeof(T));
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  return K % V == 0 && x_stride % V == 0 && w_stride % V == 0 &&
         (batches <= 1 || (x_batch_stride % V == 0 && w_batch_stride % V == 0)) && aligned(x) && aligned(w);
}

// The kernel for (T, O) and the load path; the same signature for every choice.
template <typename T, typename O>
inline void (*linear_kernel_for(bool vec))(LinearArgs<T, O>) {
  if constexpr (std::is_same<T, float>::value) {
    (void)vec;
    return &linear_simt_kernel<O>;
  } else {
    return vec ? &linear_mma_kernel<T, O, true> : &linear_mma_kernel<T, O, false>;
  }
}

}  // namespace cuda
}  // namespace bi
