// Host side of the CUDA paged attention forward, shared by the device launcher
// (csrc/cuda/launch_attention.cu) and the simulator (csrc/cuda/sim/sim_attention.cpp) so that both
// run the same plan: which kernels (tensor-core attention_mma.cuh for bf16 / fp16 with
// attention_mma_head(D), else the SIMT kernels of attention.cuh), sequential vs split-parallel,
// grids, workspace, shared memory, the K load path, and the launch sequence (attention_run, through
// a caller-supplied launch). Every choice is a function of the shapes (never of metadata values:
// no host sync) and none changes bits: the per-row operation sequence is fixed by (p, D, dtype).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "attention.cuh"
#include "attention_mma.cuh"

namespace bi {
namespace cuda {

constexpr const char* kAttnPathEnv = "BATCH_INVARIANT_CUDA_ATTN_PATH";

// The AttnPath kAttnPathEnv asks for (unset, empty or "auto": auto); -1 with *error set for another
// value (the callers raise it).
inline int attention_path_from_env(std::string* error) {
  const char* v = std::getenv(kAttnPathEnv);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return kAttnPathAuto;
  if (std::strcmp(v, "sequential") == 0) return kAttnPathSequential;
  if (std::strcmp(v, "split") == 0) return kAttnPathSplit;
  *error = std::string(kAttnPathEnv) + " must be auto, sequential or split, got '" + v + "'";
  return -1;
}

// Whether the tensor-core kernels run: bf16 / fp16 and a supported head size (a function of the
// dtype and D only, so a row's bits never depend on the launch).
template <typename T>
inline bool attention_uses_mma(int64_t D) {
  return !std::is_same<T, float>::value && attention_mma_head(D);
}

struct AttnPlan {
  bool mma = false;       // tensor-core kernels (else SIMT)
  bool split = false;     // split-parallel path (+ combine kernel)
  bool zero_out = false;  // out / lse must be zero-filled before the launch (padding tokens)
  int64_t ws_splits = 1, ws_floats = 0;
  dim3 grid, block, combine_grid;
  size_t smem = 0;        // dynamic shared memory of the main kernel
  std::string error;      // non-empty: a grid limit is exceeded
};

// The plan of a launch: T tokens, B sequences, Hq / Hk heads, head size D, block-table capacity
// max_ctx = block_table.size(1) * block_size (bounds every seq_len: sizes the workspace), keys per
// split, the path request and the SM count. Auto takes the split-parallel path when rows can have
// >= 2 splits, the sequential grid fills less than half of sm_count * kAttnSplitBlocksPerSm blocks
// and the workspace stays under kAttnMaxWorkspaceBytes.
template <typename T>
inline AttnPlan attention_plan(int path, int64_t Ttok, int64_t B, int64_t Hq, int64_t Hk, int64_t D, int64_t max_ctx,
                               int split, int sm_count) {
  AttnPlan pl;
  pl.ws_splits = attention_max_splits(max_ctx, split);
  pl.mma = attention_uses_mma<T>(D);
  const unsigned comb_y = unsigned((Hq + kAttnWarps - 1) / kAttnWarps);
  pl.combine_grid = dim3(unsigned(Ttok), comb_y);
  int64_t blocks;
  if (pl.mma) {
    const int64_t group = Hq / Hk, hpt = group < kAttnMmaRows ? group : kAttnMmaRows;
    const int64_t chunks = (group + hpt - 1) / hpt, bq = kAttnMmaRows / hpt;
    const int64_t q_tiles = Ttok / bq + B, gy = Hk * chunks;
    if (q_tiles > 0x7fffffff || gy > 65535) {
      pl.error = "the tensor-core attention grid (" + std::to_string(q_tiles) + " x " + std::to_string(gy) +
                 ") exceeds the grid limits";
      return pl;
    }
    pl.grid = dim3(unsigned(q_tiles), unsigned(gy));
    pl.block = dim3(kAttnMmaThreads);
    blocks = q_tiles * gy;
  } else {
    pl.grid = dim3(unsigned(Ttok), comb_y);
    pl.block = dim3(kAttnThreads);
    blocks = Ttok * int64_t(comb_y);
  }
  if (comb_y > 65535u) {
    pl.error = "too many heads for the grid (" + std::to_string(Hq) + ")";
    return pl;
  }
  const int64_t ws_floats = attention_workspace_floats(Ttok, Hq, D, pl.ws_splits);
  if (pl.ws_splits <= 65535 && path != kAttnPathSequential) {
    pl.split = path == kAttnPathSplit ||
               (pl.ws_splits >= 2 && 2 * blocks < int64_t(sm_count) * kAttnSplitBlocksPerSm &&
                ws_floats * int64_t(sizeof(float)) <= kAttnMaxWorkspaceBytes);
  }
  if (pl.split) pl.ws_floats = ws_floats;
  if (pl.mma) pl.smem = attention_mma_smem_bytes<T>(int(D), /*fold=*/!pl.split);
  pl.zero_out = pl.mma && !pl.split;
  return pl;
}

// Whether K / V tiles may be staged by 16-byte copies: every key and value row start 16-byte aligned.
template <typename T>
inline bool attention_kv_vec(const AttentionArgs<T>& a) {
  constexpr int64_t V = 16 / int64_t(sizeof(T));
  auto rows_ok = [](const void* p, int64_t sb, int64_t ss, int64_t sh) {
    return sb % V == 0 && ss % V == 0 && sh % V == 0 && (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
  };
  return a.D % V == 0 && rows_ok(a.kc, a.kc_sb, a.kc_ss, a.kc_sh) && rows_ok(a.vc, a.vc_sb, a.vc_ss, a.vc_sh);
}

// Runs a plan without error through launch(grid, block, dynamic_smem_bytes, kernel, args). `a` is
// complete except ws / ws_splits / kv_vec (set here); ws holds plan.ws_floats floats (split path).
// The caller zero-fills out / lse first when plan.zero_out.
template <typename T, typename Launch>
inline void attention_run(const AttnPlan& pl, AttentionArgs<T> a, float* ws, Launch&& launch) {
  a.ws = pl.split ? ws : nullptr;
  a.ws_splits = pl.split ? pl.ws_splits : 0;
  a.kv_vec = attention_kv_vec<T>(a) ? 1 : 0;
  const dim3 split_grid(pl.grid.x, pl.grid.y, unsigned(pl.ws_splits));
  if (pl.mma) {
    if constexpr (!std::is_same<T, float>::value) {
      dispatch_attention_mma_head(a.D, [&](auto dc) {
        constexpr int D = decltype(dc)::value;
        if (!pl.split) {
          launch(pl.grid, pl.block, pl.smem, &attention_mma_kernel<T, D>, a);
          return;
        }
        launch(split_grid, pl.block, pl.smem, &attention_mma_split_kernel<T, D>, a);
        launch(pl.combine_grid, dim3(kAttnThreads), size_t(0), &attention_combine_kernel<T, D / kWarp>, a);
      });
    }
    return;
  }
  dispatch_attention_npl(attention_lanes_per_thread(a.D), [&](auto nc) {
    constexpr int NPL = decltype(nc)::value;
    if (!pl.split) {
      launch(pl.grid, pl.block, size_t(0), &attention_fwd_kernel<T, NPL>, a);
      return;
    }
    launch(split_grid, pl.block, size_t(0), &attention_split_kernel<T, NPL>, a);
    launch(pl.combine_grid, pl.block, size_t(0), &attention_combine_kernel<T, NPL>, a);
  });
}

}  // namespace cuda
}  // namespace bi
