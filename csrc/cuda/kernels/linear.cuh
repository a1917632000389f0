// Batch-invariant GEMM: out[b, m, n] = sum_k x[b, m, k] * w[b, n, k] (+ bias[n]), the kernel body
// of linear (B = 1) and bmm_nt. Torch-free; launched by csrc/cuda/launch_linear.cu and, on the
// CPU, by csrc/cuda/sim/sim_linear.cpp.
//
// Contract (DESIGN.md section 1, contract.py GPU_MATMUL_BLOCK_K / GPU_MATMUL_K_CHUNK): K is cut
// into chunks of KC = GPU_MATMUL_K_CHUNK (1024) elements from k = 0, the last one possibly short
// (an empty K counts as one empty chunk). Each chunk is summed on one fp32 accumulator per output
// element starting from +0, walking the chunk from its first k upward in steps of BLOCK_K
// (LinearBlockK below: 64 for bf16 / fp16, 32 for fp32; KC is a multiple of each), the part of a
// step beyond K zero-filled. The chunk sums are added left to right to a total that starts at
// -0.0f (total = add_rn(total, chunk_sum): -0 is IEEE's additive identity, -0 + x == x for every x,
// signed zeros included, so the first add is exact and K <= KC gives the single-accumulator bits).
// The bias (fp32) is added to the total after the last chunk; one rounding to the output dtype.
// The order depends on (K, dtype, arch) only:
//   * bf16 / fp16: tensor cores, mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 on
//     every sm_80+ target (sm_90a too: mma.sync, not wgmma). Inside a BLOCK_K step the k16 MMAs run
//     in ascending k, each one D = A*B + C on the chunk accumulator fragment. One tile configuration
//     for every M (MmaTile: 128 x 128 x BLOCK_K, 8 warps of 64 x 32, 3-stage cp.async pipeline,
//     ldmatrix fragments): no GEMV path, no M buckets; rows beyond M are zero-filled in shared
//     memory and never stored. Which rows / columns share a tile changes no element's arithmetic.
//   * fp32: SIMT, IEEE fp32 fma (fma_rn) per k in ascending order on the chunk accumulator (never
//     TF32): acc = fma(x[m,k], w[n,k], acc) for k of the chunk (SimtTile: 64 x 64 x BLOCK_K).
// Two realisations of the chunks, the same bits (tests/cuda/test_cuda_sim_linear.py checks it):
//   * fused (PARTIAL = false): one block per output tile walks all of K; besides the chunk
//     accumulator it keeps the total per element, and after the last k-step of each chunk does
//     total = add_rn(total, acc), acc = +0. Epilogue: bias, one rounding.
//   * split-parallel (few output tiles: most SMs would idle): one block per (tile, chunk) sums its
//     chunk exactly as the fused kernel does (PARTIAL = true) and stores the fp32 chunk sum to a
//     workspace [B][chunks][M][N] (no bias, no rounding); linear_combine_kernel then adds each
//     element's chunk sums left to right from -0.0f, adds the bias and rounds once.
//   linear_plan() (host, linear_plan.cuh) chooses from the shapes and the SM count only.
// Loads: 16-byte cp.async when every row start is 16-byte aligned (VEC; 2-byte types: K, the row
// and batch strides multiples of 8 and aligned base pointers), else element-wise loads; the choice
// moves data only, the arithmetic is the same.
// Grid: x = M tiles (split-parallel partials: M tiles x chunks, chunk = blockIdx.x / M tiles),
// y = N tiles, z = batches (the launcher slices z above 65535: batch0).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../generated/bi_contract.h"
#include "../intrinsics.cuh"

namespace bi {
namespace cuda {

// contract.py GPU_MATMUL_BLOCK_K (reported by the modules as linear_block_k(dtype) and compared
// with contract.py by the tests).
template <typename T> struct LinearBlockK;
template <> struct LinearBlockK<__nv_bfloat16> { static constexpr int value = 64; };
template <> struct LinearBlockK<__half> { static constexpr int value = 64; };
template <> struct LinearBlockK<float> { static constexpr int value = 32; };

// contract.py GPU_MATMUL_K_CHUNK: chunk boundaries must fall on BLOCK_K step boundaries, so that a
// k-step never straddles two chunks.
constexpr int kLinearKChunk = contract::GPU_MATMUL_K_CHUNK;
static_assert(kLinearKChunk % LinearBlockK<__nv_bfloat16>::value == 0 &&
                  kLinearKChunk % LinearBlockK<__half>::value == 0 && kLinearKChunk % LinearBlockK<float>::value == 0,
              "GPU_MATMUL_K_CHUNK must be a multiple of every BLOCK_K");

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
  const float* bias;     // [N] fp32 (every batch) or nullptr; fused kernels only
  O* out;                // [B][M][N]; split-parallel partials: the workspace [B][chunks][M][N]
  int64_t out_stride;
  int64_t out_batch_stride;
  int64_t out_chunk_stride;  // split-parallel partials only: M * N
  int M, N, K;
  int64_t batch0;        // batch of blockIdx.z == 0
};

// Whether the chunk accumulator is flushed after K step kt: the next k, (kt + 1) * BK, starts a new
// chunk (K_CHUNK is a multiple of BK; the last chunk is flushed after the last step instead).
template <int BK>
BI_DEV bool linear_chunk_ends_after(int kt) {
  return (kt + 1) % (kLinearKChunk / BK) == 0;
}


// What one block of either kernel computes: its batch, output tile origin (m0, n0), its K chunk
// (partial kernels: blockIdx.x = chunk * m_tiles + M tile; fused: chunk 0) and the K steps
// [kt0, kt1) it walks (fused: all of K; partial: its chunk), ktiles = all steps of K.
struct LinearBlock {
  int64_t batch;
  int m0, n0, chunk, kt0, kt1, ktiles;
};
template <bool PARTIAL, int BM, int BN, int BK, typename Args>
BI_DEV LinearBlock linear_block(const Args& p) {
  constexpr int CHUNK_STEPS = kLinearKChunk / BK;
  LinearBlock b;
  b.batch = p.batch0 + int64_t(blockIdx.z);
  const int m_tiles = (p.M + BM - 1) / BM;
  b.chunk = PARTIAL ? int(blockIdx.x) / m_tiles : 0;
  b.m0 = (PARTIAL ? int(blockIdx.x) % m_tiles : int(blockIdx.x)) * BM;
  b.n0 = int(blockIdx.y) * BN;
  b.ktiles = (p.K + BK - 1) / BK;
  b.kt0 = PARTIAL ? b.chunk * CHUNK_STEPS : 0;
  b.kt1 = PARTIAL ? (b.kt0 + CHUNK_STEPS < b.ktiles ? b.kt0 + CHUNK_STEPS : b.ktiles) : b.ktiles;
  return b;
}

// ------------------------------------------------------------------------------------------
// bf16 / fp16: mma.sync kernel. PARTIAL = false: fused (all of K, chunk totals in registers, bias,
// rounding to O); PARTIAL = true: chunk blockIdx.x / m_tiles only, its fp32 sum stored to out
// (the workspace; O = float).
template <typename T, typename O, bool VEC, bool PARTIAL>
__global__ void __launch_bounds__(MmaTile::THREADS) linear_mma_kernel(LinearArgs<T, O> p) {
  using Tile = LinearTile<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, LD = Tile::LD, THREADS = Tile::THREADS;
  constexpr int STAGES = Tile::STAGES, MI = Tile::MI, NI = Tile::NI;
  constexpr int STAGE_ELEMS = (BM + BN) * LD;
  static_assert(BK % 16 == 0 && NI % 2 == 0, "tile shape");
  static_assert(!PARTIAL || std::is_same<O, float>::value, "chunk partials are fp32");

  T* smem = dynamic_smem<T>();
  const int tid = int(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int wm0 = (warp / Tile::WARPS_N) * Tile::WM, wn0 = (warp % Tile::WARPS_N) * Tile::WN;
  const int M = p.M, N = p.N, K = p.K;
  const LinearBlock blk = linear_block<PARTIAL, BM, BN, BK>(p);
  const int64_t batch = blk.batch;
  const int chunk = blk.chunk, m0 = blk.m0, n0 = blk.n0, ktiles = blk.ktiles, kt0 = blk.kt0, kt1 = blk.kt1;
  const T* x = p.x + batch * p.x_batch_stride;
  const T* w = p.w + batch * p.w_batch_stride;
  const int nk = kt1 - kt0;

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

  // acc: the running chunk's sum (from +0); total: the chunk sums added so far (fused only).
  float acc[MI][NI][4], total[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[i][j][e] = 0.0f;
        total[i][j][e] = -0.0f;
      }
  // End of a chunk (fused): total += acc (left to right), the next chunk starts from +0.
  auto flush_chunk = [&]() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          total[i][j][e] = add_rn(total[i][j][e], acc[i][j][e]);
          acc[i][j][e] = 0.0f;
        }
  };

  // Pipeline: STAGES - 1 steps in flight; one commit group per step (possibly empty).
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_tile(kt0 + s, s);
    cp_async_commit();
  }
  for (int step = 0; step < nk; ++step) {
    const int kt = kt0 + step;
    cp_async_wait<STAGES - 2>();  // this thread's copies of step kt have landed
    block_sync();                 // everyone's; and step kt - 1's stage is free again
    if (step + STAGES - 1 < nk) load_tile(kt + STAGES - 1, (step + STAGES - 1) % STAGES);
    cp_async_commit();
    const T* sA = smem + (step % STAGES) * STAGE_ELEMS;
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
    if (!PARTIAL && kt + 1 < ktiles && linear_chunk_ends_after<BK>(kt)) flush_chunk();
  }
  cp_async_wait<0>();
  if (!PARTIAL) flush_chunk();  // the last chunk (K = 0: the one empty chunk, +0)

  // Epilogue: fragment (i, j) element e is row g (+8 for e >= 2), column 2t + (e & 1).
  O* out = p.out + batch * p.out_batch_stride + (PARTIAL ? chunk * p.out_chunk_stride : 0);
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
          if (PARTIAL) {
            out[int64_t(row) * p.out_stride + col] = from_f32<O>(acc[i][j][2 * h + e]);  // fp32: as is
          } else {
            float v = total[i][j][2 * h + e];
            if (p.bias != nullptr) v = add_rn(v, p.bias[col]);
            out[int64_t(row) * p.out_stride + col] = from_f32<O>(v);
          }
        }
    }
}

// ------------------------------------------------------------------------------------------
// fp32: SIMT kernel, one fma_rn per (element, k), k ascending; PARTIAL as linear_mma_kernel.
template <typename O, bool PARTIAL>
__global__ void __launch_bounds__(SimtTile::THREADS) linear_simt_kernel(LinearArgs<float, O> p) {
  using Tile = LinearTile<float>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, THREADS = Tile::THREADS;
  constexpr int TM = Tile::TM, TN = Tile::TN;
  static_assert(THREADS == (BM / TM) * (BN / TN) && BM / TM == 16 && BN / TN == 16, "tile shape");
  static_assert(!PARTIAL || std::is_same<O, float>::value, "chunk partials are fp32");
  __shared__ float sA[BK][BM + 1];
  __shared__ float sB[BK][BN + 1];

  const int tid = int(threadIdx.x);
  const int ty = tid / 16, tx = tid % 16;
  const int M = p.M, N = p.N, K = p.K;
  const LinearBlock blk = linear_block<PARTIAL, BM, BN, BK>(p);
  const int64_t batch = blk.batch;
  const int chunk = blk.chunk, m0 = blk.m0, n0 = blk.n0, ktiles = blk.ktiles, kt0 = blk.kt0, kt1 = blk.kt1;
  const float* x = p.x + batch * p.x_batch_stride;
  const float* w = p.w + batch * p.w_batch_stride;

  float acc[TM][TN], total[TM][TN];  // as in linear_mma_kernel
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      acc[i][j] = 0.0f;
      total[i][j] = -0.0f;
    }
  auto flush_chunk = [&]() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        total[i][j] = add_rn(total[i][j], acc[i][j]);
        acc[i][j] = 0.0f;
      }
  };

  for (int kt = kt0; kt < kt1; ++kt) {
    const int k0 = kt * BK;
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
    if (!PARTIAL && kt + 1 < ktiles && linear_chunk_ends_after<BK>(kt)) flush_chunk();
  }
  if (!PARTIAL) flush_chunk();  // the last chunk (K = 0: the one empty chunk, +0)

  O* out = p.out + batch * p.out_batch_stride + (PARTIAL ? chunk * p.out_chunk_stride : 0);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int row = m0 + ty + 16 * i;
    if (row >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int col = n0 + tx + 16 * j;
      if (col >= N) continue;
      float v = PARTIAL ? acc[i][j] : total[i][j];
      if (!PARTIAL && p.bias != nullptr) v = add_rn(v, p.bias[col]);
      out[int64_t(row) * p.out_stride + col] = from_f32<O>(v);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Split-parallel path, pass 2: per element of batch batch0 + blockIdx.z, the chunk sums of the
// workspace added left to right from -0.0f (the fused kernel's flushes, operation for operation),
// then the bias, then one rounding. Grid-stride over the M * N elements of a batch.
template <typename O>
struct LinearCombineArgs {
  const float* ws;          // [B][chunks][M][N] fp32 chunk sums (the partial kernels' output)
  const float* bias;        // [N] fp32 or nullptr
  O* out;                   // [B][M][N]
  int64_t out_stride, out_batch_stride;
  int64_t M, N;
  int chunks;
  int64_t batch0;
};
constexpr int kLinearCombineThreads = 256;

template <typename O>
__global__ void __launch_bounds__(kLinearCombineThreads) linear_combine_kernel(LinearCombineArgs<O> p) {
  const int64_t batch = p.batch0 + int64_t(blockIdx.z);
  const int64_t elems = p.M * p.N;
  const float* ws = p.ws + batch * p.chunks * elems;
  O* out = p.out + batch * p.out_batch_stride;
  const int64_t step = int64_t(gridDim.x) * kLinearCombineThreads;
  for (int64_t e = int64_t(blockIdx.x) * kLinearCombineThreads + threadIdx.x; e < elems; e += step) {
    float total = -0.0f;
    for (int c = 0; c < p.chunks; ++c) total = add_rn(total, ws[c * elems + e]);
    const int64_t row = e / p.N, col = e % p.N;
    if (p.bias != nullptr) total = add_rn(total, p.bias[col]);
    out[row * p.out_stride + col] = from_f32<O>(total);
  }
}

}  // namespace cuda
}  // namespace bi
