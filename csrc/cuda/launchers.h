// Launchers of the CUDA backend (module batch_invariant._cuda): ATen-facing functions with the
// signatures and return values of the CPU extension's functions of the same names
// (csrc/cpu/launchers.h), so python/batch_invariant/ops/ registers either under one kernel name.
// Each one checks its inputs (TORCH_CHECK messages name the tensor, its shape, dtype and device),
// dispatches on dtype, allocates its outputs and launches one kernel on the current CUDA stream of
// the inputs' device. Kernel bodies live in csrc/cuda/kernels/*.cuh and know nothing of ATen.
//
// This header is included by the pybind module (compiled by the host compiler): ATen only, no
// CUDA headers. Supported dtypes: bfloat16, float16, float32. All tensors on one CUDA device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace bi {
namespace cuda {

// ---- launch_rows.cu ---------------------------------------------------------------------------
// x: [T, H] (row stride any, inner dim contiguous), weight: [H] (x's dtype or float32).
// One block per row. Returns a new contiguous [T, H] tensor of x's dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// z = round_to_x_dtype(x + residual) is the new residual; returns (rms_norm(z), z).
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);
// Row-wise over the last dim of x: [T, V] (inner dim contiguous); out_dtype: x's dtype or float32.
// log_softmax / softmax return [T, V]; row_mean returns [T] (fp32 sum / V, one rounding).
at::Tensor log_softmax(const at::Tensor& x, at::ScalarType out_dtype);
at::Tensor softmax(const at::Tensor& x, at::ScalarType out_dtype);
at::Tensor row_mean(const at::Tensor& x, at::ScalarType out_dtype);

// ---- launch_linear.cu -------------------------------------------------------------------------
// x: [M, K] (row stride any, inner dim contiguous), weight: [N, K] (same dtype, inner dim
// contiguous), bias: none or [N] (weight dtype or float32); out_dtype: x's dtype or float32.
// Returns a new contiguous [M, N] tensor. bmm_nt: a [B, M, K], b_t [B, N, K] -> [B, M, N].
// K order (kernels/linear.cuh; contract GPU_MATMUL_BLOCK_K, GPU_MATMUL_K_CHUNK): K in chunks of
// GPU_MATMUL_K_CHUNK from k = 0, each summed from +0 in BLOCK_K steps (k ascending) on one fp32
// accumulator, the chunk sums added left to right to a total starting at -0.0f, then the fp32 bias,
// one rounding. Realised fused (one block per output tile) or, for launches with few output tiles
// and several chunks, split-parallel (one block per tile and chunk + an ordered combine kernel,
// with an fp32 workspace): the same bits; BATCH_INVARIANT_CUDA_LINEAR_PATH=auto|fused|split forces
// one (any other value: an error). linear_block_k reports BLOCK_K.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::ScalarType out_dtype);
at::Tensor bmm_nt(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType out_dtype);
int linear_block_k(at::ScalarType dtype);

// ---- launch_attention.cu -----------------------------------------------------------------------
// Paged attention forward (causal, GQA), as the CPU extension's attention / attention_with_lse:
// q [T, Hq, D], key_cache / value_cache [NB, BS, Hk, D] (strided, head dim contiguous; D <= 256),
// query_start_loc int32 [B+1], seq_lens int32 [B], block_table int32 [B, max_blocks] (rows
// contiguous). Returns out [T, Hq, D] (q's dtype, contiguous; padding tokens 0) and, with lse,
// lse fp32 [T, Hq] = M + log(L) (padding tokens 0). No host synchronisation (metadata values are
// not validated on the host).
at::Tensor attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens, const at::Tensor& block_table,
                     double scale);
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache, const at::Tensor& query_start_loc,
                                                      const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                      double scale);

}  // namespace cuda
}  // namespace bi
