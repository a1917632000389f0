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

constexpr uint32_t kNanKey = 0xffc00000u;  // sort_key(NaN)

// Stable ascending sort of n (key, index) pairs given in index order (LSD radix, digits of 11, 11
// and 10 bits; stable, so equal keys stay in index order). Result in s.key[0..n), s.idx[0..n).
static inline void radix_sort_pairs(int64_t n, TopKTopPScratch& s) {
  uint32_t* k = s.key.data();
  uint32_t* i = s.idx.data();
  uint32_t* k2 = s.key2.data();
  uint32_t* i2 = s.idx2.data();
  static const int kShift[3] = {0, 11, 22};
  static const uint32_t kMask[3] = {0x7ffu, 0x7ffu, 0x3ffu};
  s.hist.assign(3 * 2048, 0u);
  uint32_t* hist = s.hist.data();
  for (int64_t v = 0; v < n; ++v) {
    uint32_t key = k[v];
    hist[(key & 0x7ffu)]++;
    hist[2048 + ((key >> 11) & 0x7ffu)]++;
    hist[4096 + ((key >> 22) & 0x3ffu)]++;
  }
  for (int pass = 0; pass < 3; ++pass) {
    uint32_t* h = hist + 2048 * pass;
    const int shift = kShift[pass];
    const uint32_t mask = kMask[pass];
    // Skip a pass whose digit is the same for every key (the stable pass would be the identity).
    if (h[(k[0] >> shift) & mask] == uint32_t(n)) continue;
    uint32_t sum = 0;
    for (int d = 0; d < 2048; ++d) { uint32_t c = h[d]; h[d] = sum; sum += c; }
    for (int64_t v = 0; v < n; ++v) {
      uint32_t key = k[v];
      uint32_t pos = h[(key >> shift) & mask]++;
      k2[pos] = key;
      i2[pos] = i[v];
    }
    uint32_t* t = k; k = k2; k2 = t;
    t = i; i = i2; i2 = t;
  }
  if (k != s.key.data()) {
    for (int64_t v = 0; v < n; ++v) { s.key[size_t(v)] = k[v]; s.idx[size_t(v)] = i[v]; }
  }
}

// The key of ascending rank r (0-based) among key[0..V) (radix select, 11/11/10-bit digits from
// the top). Uses s.key2 as candidate buffer and s.hist.
static inline uint32_t radix_select(const uint32_t* key, int64_t V, int64_t r, TopKTopPScratch& s) {
  s.hist.assign(2048, 0u);
  uint32_t* h = s.hist.data();
  for (int64_t v = 0; v < V; ++v) h[key[v] >> 21]++;
  uint32_t b1 = 0;
  for (;; ++b1) { if (r < int64_t(h[b1])) break; r -= h[b1]; }
  uint32_t* cand = s.key2.data();
  int64_t n = 0;
  for (int64_t v = 0; v < V; ++v) if ((key[v] >> 21) == b1) cand[n++] = key[v];
  for (int d = 0; d < 2048; ++d) h[d] = 0;
  for (int64_t j = 0; j < n; ++j) h[(cand[j] >> 10) & 0x7ffu]++;
  uint32_t b2 = 0;
  for (;; ++b2) { if (r < int64_t(h[b2])) break; r -= h[b2]; }
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) if (((cand[j] >> 10) & 0x7ffu) == b2) cand[m++] = cand[j];
  for (int d = 0; d < 1024; ++d) h[d] = 0;
  for (int64_t j = 0; j < m; ++j) h[cand[j] & 0x3ffu]++;
  uint32_t b3 = 0;
  for (;; ++b3) { if (r < int64_t(h[b3])) break; r -= h[b3]; }
  return (b1 << 21) | (b2 << 10) | b3;
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
// Top-k does not need the full order: the threshold is the key of ascending rank V - k (radix
// select); the kept entries (key >= threshold, ties included) are exactly the last n_kept entries
// of the stable full order, in the same relative order, so only they are sorted and they sit at
// sorted positions [V - n_kept, V). Top-p then sees the same sorted row as with a full sort.
static inline void top_k_top_p_row(const float* z, float* out, int64_t V, int64_t k, float p,
                                   TopKTopPScratch& s, bool avx512) {
  for (int64_t v = 0; v < V; ++v) out[v] = z[v];
  const bool use_k = k > 0 && k < V;
  const bool use_p = !(p >= 1.0f);
  if (V == 0 || (!use_k && !use_p)) return;
  s.resize(V);
  uint32_t* key = s.key.data();
  uint32_t* idx = s.idx.data();
  int64_t base = 0;  // sorted positions [base, V) hold s.idx[0..V-base); positions < base are removed
  if (use_k) {
    for (int64_t v = 0; v < V; ++v) key[v] = sort_key(z[v]);
    // A NaN threshold removes nothing (x < NaN is false), as in the reference algorithm.
    const uint32_t thr = radix_select(key, V, V - k, s);
    if (thr != kNanKey) {
      int64_t n = 0;
      for (int64_t v = 0; v < V; ++v) {
        if (key[v] >= thr) { key[n] = key[v]; idx[n] = uint32_t(v); ++n; }
        else out[v] = -INFINITY;
      }
      base = V - n;
    } else {
      for (int64_t v = 0; v < V; ++v) idx[v] = uint32_t(v);
    }
  } else {
    for (int64_t v = 0; v < V; ++v) { key[v] = sort_key(z[v]); idx[v] = uint32_t(v); }
  }
  if (!use_p) return;
  radix_sort_pairs(V - base, s);
  idx = s.idx.data();
  float* sv = s.sorted.data();
  for (int64_t j = base; j < V; ++j) sv[j] = z[idx[j - base]];
  int64_t lead = base;  // leading -inf entries (removed by top-k, or -inf in the input)
  while (lead < V && sv[lead] == -INFINITY) ++lead;
  if (lead == V) return;  // all -inf: NaN probabilities, top-p removes nothing
  const int64_t c_begin = lead & ~int64_t(kLanes - 1);
  for (int64_t j = c_begin; j < base; ++j) sv[j] = -INFINITY;
  float* prob = s.prob.data();
  float sum = 0.0f;
#if BI_X86
  if (avx512) top_p_probs_avx512(sv, prob, V, c_begin, &sum);
  else top_p_probs_portable(sv, prob, V, c_begin, &sum);
#else
  (void)avx512;
  top_p_probs_portable(sv, prob, V, c_begin, &sum);
#endif
  const float limit = 1.0f - p;
  // Positions [0, c_begin) are -inf: prob = exp_f32(-inf - mx) / s = 0.0f / s (0, or NaN when s
  // is NaN), so the running sum there is that same value: c_0 = p0, c_i = c_{i-1} + p0 = p0.
  int64_t removed = 0;  // the top-p removed set is a prefix (c is non-decreasing, or NaN onwards)
  float c = 0.0f;
  int64_t v = 0;
  if (c_begin > 0) {
    c = 0.0f / sum;
    if (!(c <= limit)) v = V;  // nothing removed
    else { removed = c_begin; v = c_begin; }
  }
  for (; v < V - 1; ++v) {
    c = (v == 0) ? prob[0] : c + prob[v];
    if (!(c <= limit)) break;
    removed = v + 1;
  }
  for (int64_t j = base; j < removed; ++j) out[idx[j - base]] = -INFINITY;
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
