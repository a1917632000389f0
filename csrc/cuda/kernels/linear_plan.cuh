// Host side of the CUDA GEMM (kernels/linear.cuh), shared by the device launcher
// (csrc/cuda/launch_linear.cu) and the simulator (csrc/cuda/sim/sim_linear.cpp) so that both run
// the same plan: the load path (linear_vec_ok), the kernels (linear_kernel_for /
// linear_partial_kernel_for), the fused vs split-parallel choice, grids and workspace layout
// (linear_plan), and the launch sequence itself (linear_run, through a caller-supplied launch).
// Nothing here changes bits: every choice selects between realisations of one operation order.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "linear.cuh"

namespace bi {
namespace cuda {

// Whether the 16-byte cp.async path applies: every row start of x and w 16-byte aligned.
template <typename T>
inline bool linear_vec_ok(const void* x, int64_t x_stride, int64_t x_batch_stride, const void* w, int64_t w_stride,
                          int64_t w_batch_stride, int64_t batches, int K) {
  constexpr int64_t V = 16 / int64_t(sizeof(T));
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  return K % V == 0 && x_stride % V == 0 && w_stride % V == 0 &&
         (batches <= 1 || (x_batch_stride % V == 0 && w_batch_stride % V == 0)) && aligned(x) && aligned(w);
}

// The fused kernel for (T, O) and the load path; the same signature for every choice.
template <typename T, typename O>
inline void (*linear_kernel_for(bool vec))(LinearArgs<T, O>) {
  if constexpr (std::is_same<T, float>::value) {
    (void)vec;
    return &linear_simt_kernel<O, false>;
  } else {
    return vec ? &linear_mma_kernel<T, O, true, false> : &linear_mma_kernel<T, O, false, false>;
  }
}

// The split-parallel path's chunk-sum kernel for T and the load path (fp32 output: the workspace).
template <typename T>
inline void (*linear_partial_kernel_for(bool vec))(LinearArgs<T, float>) {
  if constexpr (std::is_same<T, float>::value) {
    (void)vec;
    return &linear_simt_kernel<float, true>;
  } else {
    return vec ? &linear_mma_kernel<T, float, true, true> : &linear_mma_kernel<T, float, false, true>;
  }
}

// Path: kLinearPathAuto lets linear_plan choose; Fused / Split force one (tests, benchmarks; the
// bits are the same). kLinearPathEnv=auto|fused|split sets it for the device launcher (and for
// the simulator when its caller passes no path).
enum LinearPath : int { kLinearPathAuto = 0, kLinearPathFused = 1, kLinearPathSplit = 2 };
constexpr const char* kLinearPathEnv = "BATCH_INVARIANT_CUDA_LINEAR_PATH";

// The LinearPath kLinearPathEnv asks for (unset or empty: auto); -1 with *error set for a value
// that is not auto, fused or split (the callers raise it: TORCH_CHECK / std::invalid_argument).
inline int linear_path_from_env(std::string* error) {
  const char* v = std::getenv(kLinearPathEnv);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return kLinearPathAuto;
  if (std::strcmp(v, "fused") == 0) return kLinearPathFused;
  if (std::strcmp(v, "split") == 0) return kLinearPathSplit;
  *error = std::string(kLinearPathEnv) + " must be auto, fused or split, got '" + v + "'";
  return -1;
}

// Auto path: the workspace round trip (B * chunks * M * N floats written and read once) stays
// below this; beyond it the fused kernel runs (same bits).
constexpr int64_t kLinearMaxWorkspaceBytes = int64_t(256) << 20;
constexpr int64_t kLinearMaxGridX = 0x7fffffff, kLinearMaxGridYZ = 65535, kLinearMaxCombineBlocks = 65535;

struct LinearPlan {
  int path = kLinearPathFused;  // the path that runs: kLinearPathFused or kLinearPathSplit
  int64_t m_tiles = 0, n_tiles = 0;
  int64_t chunks = 1;           // K chunks: ceil(K / K_CHUNK), at least 1 (K = 0: one empty chunk)
  int64_t ws_floats = 0;        // split: fp32 workspace [B][chunks][M][N]; fused: 0
  unsigned combine_blocks = 0;  // split: grid.x of linear_combine_kernel (grid-stride loop)
  std::string error;            // non-empty: the launch exceeds a grid limit; the reason
};

// The plan of a B x (M x K) @ (N x K)^T launch, a function of the shapes, the path request and the
// SM count only (it never changes bits: both paths run the contract's operations). Auto takes the
// split-parallel path when K has more than one chunk and the fused grid (output tiles x batches)
// fills at most half of the SMs, the partial grid fits and the workspace stays under
// kLinearMaxWorkspaceBytes; else fused. Wave model (one block per SM): fused is one wave of
// full-K blocks, split ceil(tiles x chunks / SMs) waves of 1/chunks the work - at least 2x faster
// below half the SMs, no faster near a full wave. The Triton backend uses the same rule.
template <typename T>
inline LinearPlan linear_plan(int path, int64_t B, int64_t M, int64_t N, int64_t K, int sm_count) {
  using Tile = LinearTile<T>;
  LinearPlan pl;
  pl.m_tiles = (M + Tile::BM - 1) / Tile::BM;
  pl.n_tiles = (N + Tile::BN - 1) / Tile::BN;
  pl.chunks = K <= 0 ? 1 : (K + kLinearKChunk - 1) / kLinearKChunk;
  if (pl.n_tiles > kLinearMaxGridYZ) {
    pl.error = "N = " + std::to_string(N) + " needs " + std::to_string(pl.n_tiles) +
               " column tiles (grid.y limit 65535)";
    return pl;
  }
  const bool split_fits = pl.m_tiles * pl.chunks <= kLinearMaxGridX;
  const int64_t ws_floats = B * pl.chunks * M * N;
  bool split = path == kLinearPathSplit;
  if (path == kLinearPathAuto)
    split = pl.chunks > 1 && 2 * pl.m_tiles * pl.n_tiles * B <= int64_t(sm_count) && split_fits &&
            ws_floats * int64_t(sizeof(float)) <= kLinearMaxWorkspaceBytes;
  if (split && !split_fits) {
    pl.error = "the split path needs " + std::to_string(pl.m_tiles) + " row tiles x " + std::to_string(pl.chunks) +
               " K chunks = " + std::to_string(pl.m_tiles * pl.chunks) + " blocks in grid.x (limit 2^31 - 1; M = " +
               std::to_string(M) + ", K = " + std::to_string(K) + ")";
    return pl;
  }
  if (split) {
    pl.path = kLinearPathSplit;
    pl.ws_floats = ws_floats;
    const int64_t blocks = (M * N + kLinearCombineThreads - 1) / kLinearCombineThreads;
    pl.combine_blocks = unsigned(blocks < kLinearMaxCombineBlocks ? blocks : kLinearMaxCombineBlocks);
  }
  return pl;
}

// Runs a plan without error: every launch goes through launch(grid, block, dynamic_smem_bytes,
// kernel, args) - the device launcher's <<<>>> or the simulator's launch_with_smem - so both run
// the same kernels on the same grids. `a` is filled except batch0 and out_chunk_stride; ws holds
// plan.ws_floats floats (split path). Batches are sliced into grid.z chunks of 65535 (batch0).
template <typename T, typename O, typename Launch>
inline void linear_run(const LinearPlan& pl, LinearArgs<T, O> a, int64_t B, bool vec, float* ws, Launch&& launch) {
  using Tile = LinearTile<T>;
  const dim3 block(Tile::THREADS);
  for (int64_t b0 = 0; b0 < B; b0 += kLinearMaxGridYZ) {
    const unsigned gz = unsigned(B - b0 < kLinearMaxGridYZ ? B - b0 : kLinearMaxGridYZ);
    if (pl.path != kLinearPathSplit) {
      a.batch0 = b0;
      a.out_chunk_stride = 0;
      launch(dim3(unsigned(pl.m_tiles), unsigned(pl.n_tiles), gz), block, Tile::kDynamicSmem,
             linear_kernel_for<T, O>(vec), a);
      continue;
    }
    const int64_t elems = int64_t(a.M) * a.N;
    LinearArgs<T, float> pa{a.x, a.x_stride, a.x_batch_stride, a.w, a.w_stride, a.w_batch_stride,
                            /*bias=*/nullptr, ws, /*out_stride=*/a.N, /*out_batch_stride=*/pl.chunks * elems,
                            /*out_chunk_stride=*/elems, a.M, a.N, a.K, b0};
    launch(dim3(unsigned(pl.m_tiles * pl.chunks), unsigned(pl.n_tiles), gz), block, Tile::kDynamicSmem,
           linear_partial_kernel_for<T>(vec), pa);
    LinearCombineArgs<O> ca{ws, a.bias, a.out, a.out_stride, a.out_batch_stride, a.M, a.N, int(pl.chunks), b0};
    launch(dim3(pl.combine_blocks, 1, gz), dim3(kLinearCombineThreads), size_t(0), &linear_combine_kernel<O>, ca);
  }
}

}  // namespace cuda
}  // namespace bi
