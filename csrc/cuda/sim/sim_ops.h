// Launchers of the CUDA row kernels on the CPU simulator (framework-free: raw pointers, dtype
// codes). They mirror what the device launchers in csrc/cuda/*.cu do: grid = rows, block =
// rms_norm_threads(hidden) / row_softmax_threads(cols) (`threads` > 0 overrides it: tests only,
// e.g. the negative control), dtype dispatch over T in {float, bf16, fp16}, W / O = T or float.
// Used by sim_module.cpp (pybind11) and nothing else.
#pragma once

#include <cstdint>
#include <string>

namespace bi {
namespace cuda {
namespace sim {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct RmsNormCall {
  uintptr_t x; int64_t x_stride;
  uintptr_t residual; int64_t residual_stride;  // 0: plain rms_norm
  uintptr_t residual_out; int64_t residual_out_stride;
  uintptr_t weight; uintptr_t out; int64_t out_stride;
  int64_t rows; int hidden; float eps;
  int dtype; int weight_dtype;  // weight_dtype: dtype or kF32
  int threads;                  // <= 0: rms_norm_threads(hidden)
};
// Returns the block size used.
int launch_rms_norm(const RmsNormCall& c);

enum RowOp : int { kLogSoftmax = 0, kSoftmax = 1, kRowMean = 2 };
struct RowOpCall {
  int op;
  uintptr_t x; int64_t x_stride;
  uintptr_t out; int64_t out_stride;
  int64_t rows; int64_t cols;
  int dtype; int out_dtype;  // out_dtype: dtype or kF32
  int threads;               // <= 0: row_softmax_threads(cols)
};
int launch_row_op(const RowOpCall& c);

// The block sizes the launchers choose (rms_norm_threads / row_softmax_threads).
int rms_norm_block(int hidden);
int row_op_block(int64_t cols);

// Paged attention forward (sim_attention.cpp; the device launcher's plan, kernels/attention_plan.cuh:
// tensor-core kernels/attention_mma.cuh for bf16 / fp16 at D = 64 / 128, else the SIMT
// kernels/attention.cuh): q [T, Hq, D] (strides q_st, q_sh), caches [NB, BS, Hk, D] (strides sb,
// ss, sh), int32 qsl [B+1], seq_lens [B], block table rows (stride bt_s); out contiguous
// [T, Hq, D] of q's dtype; lse (0: none) fp32 [T, Hq].
// split <= 0: contract::ATTN_SPLIT (another value: the tests' negative control only).
struct AttentionCall {
  uintptr_t q; int64_t q_st, q_sh;
  uintptr_t kc; int64_t kc_sb, kc_ss, kc_sh;
  uintptr_t vc; int64_t vc_sb, vc_ss, vc_sh;
  uintptr_t qsl, seq_lens, bt; int64_t bt_s;
  int64_t T; int B, Hq, Hk, D, block_size;
  float scale; int dtype; int split;
  uintptr_t out, lse;
  int path;  // AttnPath: 0 auto (the device launcher's choice for kAttnSimSmCount SMs), 1 sequential, 2 split
  int64_t bt_cols;  // block_table.size(1): max_ctx = bt_cols * block_size sizes the split workspace
};
// Returns the path run (1 sequential, 2 split-parallel).
int launch_attention(const AttentionCall& c);
// Whether attention of this dtype code and head size runs the tensor-core kernels (1) or SIMT (0).
int attention_uses_mma_kernels(int dtype, int D);

// linear / bmm_nt (sim_linear.cpp, kernels/linear.cuh): out[b] = x[b] @ w[b]^T (+ bias), x
// [B, M, K], w [B, N, K] (inner dims contiguous, strides in elements), bias fp32 [N] or 0, out
// [B, M, N] of out_dtype (dtype or kF32). The device launcher's plan (kernels/linear_plan.cuh).
struct LinearCall {
  uintptr_t x; int64_t x_stride, x_bstride;
  uintptr_t w; int64_t w_stride, w_bstride;
  uintptr_t bias;
  uintptr_t out; int64_t out_stride, out_bstride;
  int64_t batches, M, N, K;
  int dtype, out_dtype;
  int path;      // LinearPath: 0 auto, 1 fused, 2 split; < 0: BATCH_INVARIANT_CUDA_LINEAR_PATH (the device's knob)
  int sm_count;  // the SM count the auto choice assumes
};
// Returns the path run (1 fused, 2 split-parallel).
int launch_linear(const LinearCall& c);
int linear_k_chunk();           // contract GPU_MATMUL_K_CHUNK as compiled into linear.cuh
// linear_plan<T> (kernels/linear_plan.cuh) for the dtype code, as plain values (tests of the rule).
struct LinearPlanInfo {
  int path; int64_t m_tiles, n_tiles, chunks, ws_floats, combine_blocks;
  std::string error;
};
LinearPlanInfo linear_plan_info(int dtype, int path, int64_t batches, int64_t M, int64_t N, int64_t K, int sm_count);
int linear_block_k(int dtype);  // contract GPU_MATMUL_BLOCK_K as compiled into linear.cuh
int linear_block_m(int dtype);  // rows of x per block (the same for every M)
int linear_block_n(int dtype);

// Simulator self-tests (sim_selftest.cpp): small kernels that misuse barriers / warp operations.
//   "missing_sync": reads a neighbour's shared-memory write without __syncthreads (its result
//                   depends on the schedule); returns the sum of what thread 0..n-1 read.
//   "divergent_shfl": a shuffle inside a lane-dependent branch (must raise).
//   "partial_sync": __syncthreads skipped by half the block (must raise).
//   "ballot": returns the ballot of (lane % 3 == 0) seen by lane 5 and any/all results.
double run_selftest(const char* name, int threads);

// exp_f32 / log_f32 (row_common.cuh) applied to n floats on the host (accuracy tests).
void math_f32(int which /*0 exp, 1 log*/, const float* in, float* out, int64_t n);

}  // namespace sim
}  // namespace cuda
}  // namespace bi
