// Launchers of the CPU backend: ATen-facing functions (checks, dtype dispatch, threading with
// at::parallel_for over independent outputs only). Kernel bodies live in csrc/cpu/kernels/*.h
// and know nothing of ATen. The Python layer (python/batch_invariant/ops/) validates user input
// and raises ValueError/TypeError; the TORCH_CHECKs here are a second line of defence.
//
// Supported dtypes unless said otherwise: bfloat16, float16, float32 (all tensors of an op share
// one dtype). Every function allocates its outputs (functional), except write_kv_cache.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace bi {
namespace cpu {

// ---- linear.cpp ------------------------------------------------------------------------------
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) with the contract's CPU K order, fp32 accumulate,
// bias added in fp32 after the full sum, one rounding to out_dtype (x's dtype or float32).
// x: [M, K], w: [N, K]; inner dim contiguous, any row stride. bias: [N], weight dtype or fp32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::ScalarType out_dtype);
// Batched: a [B, M, K], b_t [B, N, K] (b transposed) -> [B, M, N]; each batch as linear().
at::Tensor bmm_nt(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType out_dtype);

// ---- norm.cpp --------------------------------------------------------------------------------
// x: [T, H] (row stride any, inner contiguous), weight: [H] (x dtype or fp32).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// z = round_to_x_dtype(x + residual) is the new residual; out = rms_norm(z).
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);

// ---- activation.cpp --------------------------------------------------------------------------
// x: [T, 2D] -> [T, D]: out = round(silu(a) * b), a = x[:, :D], b = x[:, D:], fp32 math,
// silu(a) = a / (1 + exp(-a)).
at::Tensor silu_and_mul(const at::Tensor& x);

// ---- softmax.cpp -----------------------------------------------------------------------------
// Row-wise over the last dim of a [T, V] tensor, fp32 math, contract lane order.
at::Tensor log_softmax(const at::Tensor& x, at::ScalarType out_dtype);
at::Tensor softmax(const at::Tensor& x, at::ScalarType out_dtype);
// mean over the last dim: fp32 sum (contract lane order) / V, one rounding to out_dtype.
at::Tensor row_mean(const at::Tensor& x, at::ScalarType out_dtype);

// ---- sampling.cpp ----------------------------------------------------------------------------
// vLLM's top-k / top-p semantics, deterministic: logits fp32 [T, V]; top_k int64 [T] (<= 0 or
// >= V: off); top_p fp32 [T] (>= 1: off). Returns fp32 [T, V] with removed entries = -inf.
at::Tensor top_k_top_p_mask(const at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p);

// ---- rope.cpp --------------------------------------------------------------------------------
// positions int64 [T]; q [T, Hq*head_size], k [T, Hk*head_size] (or 3-d [T, H, head_size]);
// cos_sin_cache fp32 [max_pos, rot_dim] = [cos(rot_dim/2) | sin(rot_dim/2)]; rot_dim <= head_size,
// the dims after rot_dim pass through. is_neox: rotate halves (NeoX) vs interleaved pairs (GPT-J).
// fp32 math: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin (no fma contraction), one rounding.
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                                                    const at::Tensor& k, int64_t head_size,
                                                    const at::Tensor& cos_sin_cache, bool is_neox);

// ---- attention.cpp ---------------------------------------------------------------------------
// Caches: [num_blocks, block_size, num_kv_heads, head_size]. key/value: [T, num_kv_heads, head_size].
// slot_mapping int64 [T]: slot = block * block_size + offset; slots < 0 are skipped (padding).
void write_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                    const at::Tensor& value_cache, const at::Tensor& slot_mapping);
// q [T, Hq, D]; query_start_loc int32 [B+1]; seq_lens int32 [B] (context incl. the new tokens);
// block_table int32 [B, max_blocks]. Query i of sequence b sits at position
// seq_lens[b] - q_len_b + i and attends causally to keys 0..pos (contract tiling and splits).
at::Tensor attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     const at::Tensor& block_table, double scale);

// ---- attention backward (attention_bwd.cpp) ---------------------------------------------------
// (attention_with_lse is defined in attention.cpp: it is attention() with the lse store enabled.)
// Same arguments as attention(). Returns (out, lse): out bitwise equal to attention(...); lse fp32
// [T, Hq] = M + log(L) (natural log, fp32) of the final combined online-softmax state, i.e. the
// log-sum-exp of the scaled scores over keys 0..pos. Padding rows (tokens outside
// [query_start_loc[0], query_start_loc[B])) get lse = 0 and out = 0.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache,
                                                      const at::Tensor& query_start_loc,
                                                      const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                      double scale);
// Deterministic backward of attention() (recomputation, no atomics, thread-count independent).
// grad_out, out: [T, Hq, D] in q's dtype; lse: fp32 [T, Hq] from attention_with_lse. Returns
// (grad_q [T, Hq, D] in q's dtype, grad_key_cache, grad_value_cache with the caches' shape and
// dtype). Cache slots no sequence references get 0; padding rows of grad_q get 0. Slots shared by
// several sequences (same block in several block-table rows) get the per-sequence fp32 partial
// sums added in ascending sequence order before the one rounding. Exact order: kernels/attention_bwd.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
    const at::Tensor& block_table, double scale);

}  // namespace cpu
}  // namespace bi
