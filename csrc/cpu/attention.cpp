// Launchers: KV-cache write and batch-invariant paged attention (CPU). Kernel bodies and the exact
// per-row arithmetic: kernels/attention.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"
#include "kernels/attention.h"
#include "dispatch.h"
#include "launchers.h"

namespace bi {
namespace cpu {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void write_kv_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                    const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.device().is_cpu() && value.device().is_cpu() && key_cache.device().is_cpu() &&
                  value_cache.device().is_cpu() && slot_mapping.device().is_cpu(),
              "write_kv_cache: all tensors must be on the CPU");
  TORCH_CHECK(key_cache.dim() == 4, "write_kv_cache: key_cache must be [num_blocks, block_size, num_kv_heads, head_size], got ",
              key_cache.sizes(), " ", key_cache.scalar_type());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "write_kv_cache: value_cache shape ", value_cache.sizes(),
              " != key_cache shape ", key_cache.sizes());
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), Hk = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(key.dim() == 3 && key.size(1) == Hk && key.size(2) == D,
              "write_kv_cache: key must be [T, ", Hk, ", ", D, "], got ", key.sizes(), " ", key.scalar_type());
  TORCH_CHECK(value.sizes() == key.sizes(), "write_kv_cache: value shape ", value.sizes(), " != key shape ",
              key.sizes());
  const int64_t T = key.size(0);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == T,
              "write_kv_cache: slot_mapping must be [", T, "], got ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
              "write_kv_cache: slot_mapping must be int64 (or int32), got ", slot_mapping.scalar_type());
  const auto dt = key_cache.scalar_type();
  TORCH_CHECK(is_supported_dtype(dt), "write_kv_cache: unsupported cache dtype ", dt);
  TORCH_CHECK(value_cache.scalar_type() == dt && key.scalar_type() == dt && value.scalar_type() == dt,
              "write_kv_cache: key ", key.scalar_type(), ", value ", value.scalar_type(), ", key_cache ", dt,
              ", value_cache ", value_cache.scalar_type(), " must share one dtype");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "write_kv_cache: key/value inner dim must be contiguous, strides ",
              key.strides(), " / ", value.strides());
  TORCH_CHECK(key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "write_kv_cache: cache inner dim must be contiguous, strides ", key_cache.strides(), " / ",
              value_cache.strides());
  if (T == 0) return;
  at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t nslots = NB * BS;
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sl[t] < nslots, "write_kv_cache: slot_mapping[", t, "] = ", sl[t],
                " out of range for a cache of ", NB, " blocks x ", BS, " slots");
  dispatch_float(dt, [&](auto tag) {
    using E = typename decltype(tag)::type;
    attn::KvWrite<E> w{ptr<E>(key), key.stride(0), key.stride(1),
                       ptr<E>(value), value.stride(0), value.stride(1),
                       ptr<E>(key_cache), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                       ptr<E>(value_cache), value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
                       sl, Hk, D, BS};
    // Distinct tokens write distinct slots (duplicates would race; vLLM never produces them).
    at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) { attn::write_kv_rows<E>(w, b, e); });
  });
}

namespace {

// attention() and attention_with_lse(): one kernel; with_lse only adds the per-row store of
// lse = M + log(L) (fp32 [T, Hq]; rows of padding tokens, t >= query_start_loc[B] or t <
// query_start_loc[0], get 0). `out` is bitwise the same either way.
std::tuple<at::Tensor, at::Tensor> attention_impl(const at::Tensor& q, const at::Tensor& key_cache,
                                                  const at::Tensor& value_cache,
                                                  const at::Tensor& query_start_loc,
                                                  const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                  double scale, bool with_lse) {
  for (const at::Tensor* t : {&q, &key_cache, &value_cache, &query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->device().is_cpu(), "attention: all tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3, "attention: q must be [T, Hq, D], got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(key_cache.dim() == 4, "attention: key_cache must be [num_blocks, block_size, Hk, D], got ",
              key_cache.sizes(), " ", key_cache.scalar_type());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "attention: value_cache shape ", value_cache.sizes(),
              " != key_cache shape ", key_cache.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(is_supported_dtype(dt), "attention: unsupported q dtype ", dt);
  TORCH_CHECK(key_cache.scalar_type() == dt && value_cache.scalar_type() == dt, "attention: q ", dt,
              ", key_cache ", key_cache.scalar_type(), ", value_cache ", value_cache.scalar_type(),
              " must share one dtype");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), Hk = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "attention: head size of key_cache ", key_cache.sizes(), " != q's ", D);
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "attention: num_heads ", Hq, " must be a multiple of num_kv_heads ", Hk);
  TORCH_CHECK(D > 0 && BS > 0, "attention: empty head size / block size");
  TORCH_CHECK(q.stride(2) == 1 && key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "attention: inner (head) dim of q ", q.strides(), ", key_cache ", key_cache.strides(),
              ", value_cache ", value_cache.strides(), " must be contiguous");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.dim() == 1 && query_start_loc.size(0) >= 1,
              "attention: query_start_loc must be int32 [B+1], got ", query_start_loc.sizes(), " ",
              query_start_loc.scalar_type());
  const int64_t B = query_start_loc.size(0) - 1;
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == B,
              "attention: seq_lens must be int32 [", B, "], got ", seq_lens.sizes(), " ", seq_lens.scalar_type());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == B,
              "attention: block_table must be int32 [", B, ", max_blocks], got ", block_table.sizes(), " ",
              block_table.scalar_type());
  TORCH_CHECK(block_table.size(1) == 0 || block_table.stride(1) == 1, "attention: block_table rows must be contiguous");
  at::Tensor qsl_c = query_start_loc.contiguous(), sl_c = seq_lens.contiguous();
  const int32_t* qsl = qsl_c.data_ptr<int32_t>();
  const int32_t* sls = sl_c.data_ptr<int32_t>();
  const int32_t* btp = block_table.data_ptr<int32_t>();
  const int64_t bt_s = block_table.stride(0), maxb = block_table.size(1);
  TORCH_CHECK(qsl[0] >= 0 && qsl[B] <= T, "attention: query_start_loc [", qsl[0], ", ..., ", qsl[B],
              "] does not fit q's ", T, " tokens");
  int max_ctx = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int qlen = qsl[b + 1] - qsl[b], ctx = sls[b];
    TORCH_CHECK(qlen >= 0, "attention: query_start_loc must be nondecreasing (sequence ", b, ")");
    TORCH_CHECK(ctx >= qlen, "attention: seq_lens[", b, "] = ", ctx, " < query length ", qlen);
    if (qlen == 0) continue;
    const int64_t nblk = (ctx + BS - 1) / BS;
    TORCH_CHECK(nblk <= maxb, "attention: sequence ", b, " needs ", nblk, " blocks, block_table has ", maxb);
    for (int64_t i = 0; i < nblk; ++i) {
      const int32_t blk = btp[b * bt_s + i];
      TORCH_CHECK(blk >= 0 && blk < NB, "attention: block_table[", b, ", ", i, "] = ", blk, " out of range [0, ",
                  NB, ")");
    }
    max_ctx = std::max(max_ctx, ctx);
  }

  at::Tensor out = at::zeros({T, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = with_lse ? at::zeros({T, Hq}, q.options().dtype(at::kFloat)) : at::Tensor();
  if (B == 0 || T == 0 || max_ctx == 0) return {out, lse};

  const int G = int(Hq / Hk);
  const int Dp = int((D + 15) / 16 * 16);
  // Query block: about 64 rows (queries x GQA heads) share each K/V tile load.
  const int QB = std::max(1, 64 / G);
  const int nsplit_max = (max_ctx - 1) / attn::kSplit + 1;
  const int nthreads = at::get_num_threads();

  // Work items. Decode-like sequences (few rows per kv head) take all kv heads in one item, so the
  // K/V slots are read in memory order; longer query blocks take one kv head (64 rows share each
  // K/V tile). Only the work split changes, never the per-row arithmetic.
  std::vector<attn::Item> items;
  int64_t maxR = 1;
  for (int b = 0; b < B; ++b) {
    const int qlen = qsl[b + 1] - qsl[b];
    if (qlen == 0) continue;
    if (qlen * G <= 16) {
      items.push_back({b, 0, int(Hk), 0, qlen, 0, 1 << 30, true});
      maxR = std::max<int64_t>(maxR, int64_t(qlen) * G * Hk);
      continue;
    }
    for (int g = 0; g < Hk; ++g)
      for (int i0 = 0; i0 < qlen; i0 += QB) {
        const int i1 = std::min(qlen, i0 + QB);
        items.push_back({b, g, g + 1, i0, i1, 0, 1 << 30, true});
        maxR = std::max<int64_t>(maxR, int64_t(i1 - i0) * G);
      }
  }
  // Split-parallel mode (long contexts, few work items): one item per split, then an ordered
  // combine pass. The bits are the same either way (same per-split states, same combine order).
  bool split_mode = nsplit_max > 1 && int64_t(items.size()) < 2 * nthreads;
  if (const char* env = std::getenv("BATCH_INVARIANT_ATTN_SPLIT_PARALLEL")) {  // testing hook
    if (env[0] == '1') split_mode = nsplit_max > 1;
    if (env[0] == '0') split_mode = false;
  }
  at::Tensor part;
  if (split_mode) {
    std::vector<attn::Item> split_items;
    for (const auto& it : items) {
      const int ctx = sls[it.b], qlen = qsl[it.b + 1] - qsl[it.b];
      const int pmax = ctx - qlen + it.qi1 - 1;
      for (int s = 0; s <= pmax / attn::kSplit; ++s)
        split_items.push_back({it.b, it.g0, it.g1, it.qi0, it.qi1, s, s + 1, false});
    }
    items.swap(split_items);
    part = at::empty({T * Hq * nsplit_max * (Dp + 2)}, at::kFloat);
  }
  // Longest items first (cost ~ queries x keys), handed out dynamically.
  auto cost = [&](const attn::Item& it) {
    const int ctx = sls[it.b], qlen = qsl[it.b + 1] - qsl[it.b];
    const int64_t pmax = ctx - qlen + it.qi1 - 1;
    const int64_t lo = int64_t(it.s_lo) * attn::kSplit;
    const int64_t hi = std::min<int64_t>(pmax + 1, int64_t(it.s_hi) * attn::kSplit);
    return int64_t(it.qi1 - it.qi0) * (it.g1 - it.g0) * std::max<int64_t>(0, hi - lo);
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const attn::Item& a, const attn::Item& b) { return cost(a) > cost(b); });

  const bool use_avx = active_isa() != Isa::kPortable && BI_X86;
  const float fscale = static_cast<float>(scale);

  dispatch_float(dt, [&](auto tag) {
    using E = typename decltype(tag)::type;
    attn::Problem<E> P;
    P.q = ptr<E>(q); P.q_st = q.stride(0); P.q_sh = q.stride(1);
    P.kc = ptr<E>(key_cache); P.kc_sb = key_cache.stride(0); P.kc_ss = key_cache.stride(1); P.kc_sh = key_cache.stride(2);
    P.vc = ptr<E>(value_cache); P.vc_sb = value_cache.stride(0); P.vc_ss = value_cache.stride(1); P.vc_sh = value_cache.stride(2);
    P.qsl = qsl; P.seq_lens = sls; P.bt = btp; P.bt_s = bt_s;
    P.Hq = int(Hq); P.Hk = int(Hk); P.D = int(D); P.Dp = Dp; P.block_size = int(BS);
    P.scale = fscale;
    P.out = ptr<E>(out); P.o_st = out.stride(0); P.o_sh = out.stride(1);
    P.part = split_mode ? part.data_ptr<float>() : nullptr;
    P.nsplit_max = nsplit_max;
    P.lse = with_lse ? lse.data_ptr<float>() : nullptr;
    P.lse_st = Hq;

    const int64_t nitems = int64_t(items.size());
    std::atomic<int64_t> next{0};
    const int64_t nworkers = std::min<int64_t>(nthreads, nitems);
    at::parallel_for(0, nworkers, 1, [&](int64_t wb, int64_t we) {
      std::vector<float> fbuf(static_cast<size_t>(attn::scratch_floats(maxR, Dp)));
      std::vector<int> ibuf(static_cast<size_t>(attn::row_stride(maxR)));
      const attn::Scratch S = attn::Scratch::carve(fbuf.data(), ibuf.data(), maxR, Dp);
      for (int64_t w = wb; w < we; ++w) {
        for (int64_t i = next.fetch_add(1); i < nitems; i = next.fetch_add(1)) {
          if (use_avx) attn::run_item<E, true>(P, items[size_t(i)], S);
          else attn::run_item<E, false>(P, items[size_t(i)], S);
        }
      }
    });
    if (split_mode) {
      // second pass: rows (t, h) of every sequence, splits combined in order
      std::vector<int> tok_seq(size_t(T), -1);
      for (int b = 0; b < B; ++b)
        for (int t = qsl[b]; t < qsl[b + 1]; ++t) tok_seq[size_t(t)] = b;
      at::parallel_for(0, T * Hq, 16, [&](int64_t rb, int64_t re) {
        std::vector<float> acc(static_cast<size_t>(Dp));
        for (int64_t row = rb; row < re; ++row) {
          const int t = int(row / Hq), h = int(row % Hq);
          const int b = tok_seq[size_t(t)];
          if (b < 0) continue;
          const int p = sls[b] - (qsl[b + 1] - qsl[b]) + (t - qsl[b]);
          if (use_avx) attn::combine_partials<E, true>(P, t, h, p, acc.data());
          else attn::combine_partials<E, false>(P, t, h, p, acc.data());
        }
      });
    }
  });
  return {out, lse};
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                     const at::Tensor& block_table, double scale) {
  return std::get<0>(attention_impl(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale,
                                    /*with_lse=*/false));
}

// Declared in launchers.h, section "attention backward".
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache,
                                                      const at::Tensor& query_start_loc,
                                                      const at::Tensor& seq_lens, const at::Tensor& block_table,
                                                      double scale) {
  return attention_impl(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale,
                        /*with_lse=*/true);
}

}  // namespace cpu
}  // namespace bi
