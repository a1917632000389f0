// top-k / top-p mask (framework-free), the deterministic version of vLLM's native
// apply_top_k_top_p (vllm/v1/sample/ops/topk_topp_sampler.py). Per row of fp32 logits z[0..V):
//  1. order: indices sorted by logit ascending, stable (ties keep index order). -0 and +0 compare
//     equal; NaN sorts above +inf (all NaNs equal), as torch.sort does. Implemented as an LSD radix
//     sort (stable) of an order-preserving 32-bit key, so ties are in index order by construction.
//  2. top-k (0 < k < V): thr = sorted[V - k]; entries with logit < thr are removed (ties kept).
//  3. top-p (p < 1): over the sorted row after top-k (removed = -inf): mx = contract max, s =
//     contract sum of exp_f32(sorted_i - mx) (lane = sorted position % 16, see softmax.h),
//     prob_i = exp_f32(sorted_i - mx) / s, c_0 = prob_0, c_i = c_{i-1} + prob_i (fp32, ascending);
//     entry i is removed when c_i <= (1.0f - p), except the last (largest) entry.
//  4. removed entries become -inf in the output at their original position; kept entries are
//     copied unchanged. k <= 0 or k >= V: top-k off; p >= 1: top-p off (both off: plain copy).
// Leading -inf entries of the sorted row (those removed by top-k or -inf in the input) contribute
// exactly +0 (max: -inf) to the lane sums, so whole 16-chunks of them are skipped: same bits.
#pragma once

#include <cstdint>
#include <vector>

#include "../common.h"
#include "softmax.h"

namespace bi {
namespace cpu {
namespace kernels {

struct TopKTopPScratch {
  std::vector<uint32_t> key, key2, idx, idx2;
  std::vector<float> sorted, prob;
  std::vector<uint32_t> hist;
  void resize(int64_t V) {
    size_t n = size_t(V);
    if (key.size() < n) {
      key.resize(n); key2.resize(n); idx.resize(n); idx2.resize(n); sorted.resize(n); prob.resize(n);
    }
  }
};

// Order-preserving key: -0 -> +0, every NaN -> the same key above +inf.
static inline uint32_t sort_key(float f) {
  uint32_t u = f32_to_bits(f);
  if (f != f) u = 0x7fc00000u;
  else if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Stable ascending sort of row indices by sort_key (LSD radix, digits of 11, 11, 10 bits).
// Result: s.idx[0..V) (sorted indices), s.sorted[0..V) (the logits in that order).
static inline void stable_argsort_row(const float* z, int64_t V, TopKTopPScratch& s) {
  uint32_t* k = s.key.data();
  uint32_t* i = s.idx.data();
  uint32_t* k2 = s.key2.data();
  uint32_t* i2 = s.idx2.data();
  static const int kShift[3] = {0, 11, 22};
  static const uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  s.hist.assign(3 * 2048, 0u);
  uint32_t* hist = s.hist.data();
  for (int64_t v = 0; v < V; ++v) {
    uint32_t key = sort_key(z[v]);
    k[v] = key;
    i[v] = uint32_t(v);
    hist[(key & 0x7ffu)]++;
    hist[2048 + ((key >> 11) & 0x7ffu)]++;
    hist[4096 + ((key >> 22) & 0x3ffu)]++;
  }
  for (int pass = 0; pass < 3; ++pass) {
    uint32_t* h = hist + 2048 * pass;
    const int shift = kShift[pass];
    const uint32_t mask = kMask[pass];
    // Skip a pass whose digit is the same for every key (the stable pass would be the identity).
    if (h[(k[0] >> shift) & mask] == uint32_t(V)) continue;
    uint32_t sum = 0;
    for (int d = 0; d < 2048; ++d) { uint32_t c = h[d]; h[d] = sum; sum += c; }
    for (int64_t v = 0; v < V; ++v) {
      uint32_t key = k[v];
      uint32_t pos = h[(key >> shift) & mask]++;
      k2[pos] = key;
      i2[pos] = i[v];
    }
    uint32_t* t = k; k = k2; k2 = t;
    t = i; i = i2; i2 = t;
  }
  if (i != s.idx.data()) {
    for (int64_t v = 0; v < V; ++v) s.idx[size_t(v)] = i[v];
  }
  float* out = s.sorted.data();
  const uint32_t* ix = s.idx.data();
  for (int64_t v = 0; v < V; ++v) out[v] = z[ix[v]];
}

// Top-p helpers: max, sum of exp, and probs over the sorted row from c_begin (multiple of 16).
static inline void top_p_probs_portable(const float* sv, float* prob, int64_t V, int64_t c_begin,
                                        float* s_out) {
  const float mx = row_max_portable(sv + c_begin, V - c_begin);
  const float s = row_sumexp_portable(sv + c_begin, V - c_begin, mx);
  for (int64_t v = c_begin; v < V; ++v) prob[v] = exp_f32(sv[v] - mx) / s;
  *s_out = s;
}

#if BI_X86
BI_AVX512 static void top_p_probs_avx512(const float* sv, float* prob, int64_t V, int64_t c_begin,
                                         float* s_out) {
  const float mx = row_max_avx512(sv + c_begin, V - c_begin);
  const float s = row_sumexp_avx512(sv + c_begin, V - c_begin, mx);
  const __m512 mxv = _mm512_set1_ps(mx), svv = _mm512_set1_ps(s);
  for (int64_t c0 = c_begin; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    __m512 e = exp_f32_v(_mm512_sub_ps(load16(sv + c0, m), mxv));
    store16(prob + c0, _mm512_div_ps(e, svv), m);
  }
  *s_out = s;
}
#endif

// One row. out may not alias z.
static inline void top_k_top_p_row(const float* z, float* out, int64_t V, int64_t k, float p,
                                   TopKTopPScratch& s, bool avx512) {
  for (int64_t v = 0; v < V; ++v) out[v] = z[v];
  const bool use_k = k > 0 && k < V;
  const bool use_p = !(p >= 1.0f);
  if (V == 0 || (!use_k && !use_p)) return;
  s.resize(V);
  stable_argsort_row(z, V, s);
  float* sv = s.sorted.data();
  int64_t n_removed = 0;  // the removed set is always a prefix of the sorted order
  if (use_k) {
    const float thr = sv[V - k];
    while (n_removed < V && sv[n_removed] < thr) sv[n_removed++] = -INFINITY;
  }
  if (use_p) {
    int64_t lead = n_removed;  // leading -inf entries (removed, or -inf in the input)
    while (lead < V && sv[lead] == -INFINITY) ++lead;
    if (lead < V) {  // an all -inf row has NaN probabilities: top-p removes nothing
      const int64_t c_begin = lead & ~int64_t(kLanes - 1);
      float* prob = s.prob.data();
      float sum = 0.0f;
#if BI_X86
      if (avx512) top_p_probs_avx512(sv, prob, V, c_begin, &sum);
      else top_p_probs_portable(sv, prob, V, c_begin, &sum);
#else
      top_p_probs_portable(sv, prob, V, c_begin, &sum);
#endif
      // Entries before c_begin are -inf: prob = exp_f32(-inf - mx) / s = 0.0f / s.
      const float p0 = 0.0f / sum;
      for (int64_t v = 0; v < c_begin; ++v) prob[v] = p0;
      const float limit = 1.0f - p;
      float c = 0.0f;
      int64_t removed_p = 0;
      for (int64_t v = 0; v < V - 1; ++v) {
        c = (v == 0) ? prob[0] : c + prob[v];
        if (!(c <= limit)) break;  // c is non-decreasing (or NaN from here on)
        removed_p = v + 1;
      }
      if (removed_p > n_removed) n_removed = removed_p;
    }
  }
  const uint32_t* ix = s.idx.data();
  for (int64_t i = 0; i < n_removed; ++i) out[ix[i]] = -INFINITY;
}

// Rows [r0, r1): logits row t at z + t * z_stride; top_k[t], top_p[t]; out row t at out + t * out_stride.
static inline void top_k_top_p_rows(const float* z, int64_t z_stride, const int64_t* top_k,
                                    const float* top_p, float* out, int64_t out_stride, int64_t V,
                                    int64_t r0, int64_t r1, bool avx512) {
  TopKTopPScratch scratch;
  for (int64_t t = r0; t < r1; ++t)
    top_k_top_p_row(z + t * z_stride, out + t * out_stride, V, top_k[t], top_p[t], scratch, avx512);
}

}  // namespace kernels
}  // namespace cpu
}  // namespace bi
