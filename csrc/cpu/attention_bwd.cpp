// Launcher: deterministic backward of the batch-invariant paged attention (CPU). Kernel bodies and
// the exact per-element arithmetic: kernels/attention_bwd.h. attention_with_lse lives in
// attention.cpp (it shares the forward kernel).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"
#include "kernels/attention_bwd.h"
#include "dispatch.h"
#include "launchers.h"

namespace bi {
namespace cpu {

namespace {

// Runs f(item, scratch) over items (longest first, handed out dynamically). Only the assignment of
// items to threads varies; each item's arithmetic is fixed.
template <typename Item, typename F>
void run_items(const std::vector<Item>& items, int64_t maxR, int64_t Dp, F&& f) {
  const int64_t nitems = int64_t(items.size());
  if (nitems == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nworkers = std::min<int64_t>(at::get_num_threads(), nitems);
  at::parallel_for(0, nworkers, 1, [&](int64_t wb, int64_t we) {
    std::vector<float> fbuf(static_cast<size_t>(attn_bwd::scratch_floats(maxR, Dp)));
    std::vector<int> ibuf(static_cast<size_t>(attn_bwd::Scratch::ints(maxR)));
    const attn_bwd::Scratch S = attn_bwd::Scratch::carve(fbuf.data(), ibuf.data(), maxR, Dp);
    for (int64_t w = wb; w < we; ++w)
      for (int64_t i = next.fetch_add(1); i < nitems; i = next.fetch_add(1)) f(items[size_t(i)], S);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
    const at::Tensor& block_table, double scale) {
  for (const at::Tensor* t :
       {&grad_out, &q, &key_cache, &value_cache, &out, &lse, &query_start_loc, &seq_lens, &block_table})
    TORCH_CHECK(t->device().is_cpu(), "attention_backward: all tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3, "attention_backward: q must be [T, Hq, D], got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(key_cache.dim() == 4, "attention_backward: key_cache must be [num_blocks, block_size, Hk, D], got ",
              key_cache.sizes(), " ", key_cache.scalar_type());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "attention_backward: value_cache shape ",
              value_cache.sizes(), " != key_cache shape ", key_cache.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "attention_backward: unsupported q dtype ",
              dt);
  TORCH_CHECK(key_cache.scalar_type() == dt && value_cache.scalar_type() == dt && grad_out.scalar_type() == dt &&
                  out.scalar_type() == dt,
              "attention_backward: q ", dt, ", key_cache ", key_cache.scalar_type(), ", value_cache ",
              value_cache.scalar_type(), ", grad_out ", grad_out.scalar_type(), ", out ", out.scalar_type(),
              " must share one dtype");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), Hk = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "attention_backward: head size of key_cache ", key_cache.sizes(), " != q's ",
              D);
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "attention_backward: num_heads ", Hq, " must be a multiple of num_kv_heads ",
              Hk);
  TORCH_CHECK(D > 0 && BS > 0, "attention_backward: empty head size / block size");
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_backward: grad_out ",
              grad_out.sizes(), " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == T && lse.size(1) == Hq,
              "attention_backward: lse must be float32 [", T, ", ", Hq, "], got ", lse.sizes(), " ",
              lse.scalar_type());
  TORCH_CHECK(q.stride(2) == 1 && grad_out.stride(2) == 1 && out.stride(2) == 1 && key_cache.stride(3) == 1 &&
                  value_cache.stride(3) == 1,
              "attention_backward: inner (head) dim of q ", q.strides(), ", grad_out ", grad_out.strides(), ", out ",
              out.strides(), ", key_cache ", key_cache.strides(), ", value_cache ", value_cache.strides(),
              " must be contiguous");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.dim() == 1 && query_start_loc.size(0) >= 1,
              "attention_backward: query_start_loc must be int32 [B+1], got ", query_start_loc.sizes(), " ",
              query_start_loc.scalar_type());
  const int64_t B = query_start_loc.size(0) - 1;
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == B,
              "attention_backward: seq_lens must be int32 [", B, "], got ", seq_lens.sizes(), " ",
              seq_lens.scalar_type());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == B,
              "attention_backward: block_table must be int32 [", B, ", max_blocks], got ", block_table.sizes(), " ",
              block_table.scalar_type());
  TORCH_CHECK(block_table.size(1) == 0 || block_table.stride(1) == 1,
              "attention_backward: block_table rows must be contiguous");
  at::Tensor qsl_c = query_start_loc.contiguous(), sl_c = seq_lens.contiguous();
  const int32_t* qsl = qsl_c.data_ptr<int32_t>();
  const int32_t* sls = sl_c.data_ptr<int32_t>();
  const int32_t* btp = block_table.data_ptr<int32_t>();
  const int64_t bt_s = block_table.stride(0), maxb = block_table.size(1);
  TORCH_CHECK(qsl[0] >= 0 && qsl[B] <= T, "attention_backward: query_start_loc [", qsl[0], ", ..., ", qsl[B],
              "] does not fit q's ", T, " tokens");
  // References (sequence b with queries, logical block lb) -> physical block; count per block.
  std::vector<int32_t> nref_blk(size_t(NB), 0);
  for (int64_t b = 0; b < B; ++b) {
    const int qlen = qsl[b + 1] - qsl[b], ctx = sls[b];
    TORCH_CHECK(qlen >= 0, "attention_backward: query_start_loc must be nondecreasing (sequence ", b, ")");
    TORCH_CHECK(ctx >= qlen, "attention_backward: seq_lens[", b, "] = ", ctx, " < query length ", qlen);
    if (qlen == 0) continue;
    const int64_t nblk = (ctx + BS - 1) / BS;
    TORCH_CHECK(nblk <= maxb, "attention_backward: sequence ", b, " needs ", nblk, " blocks, block_table has ",
                maxb);
    for (int64_t i = 0; i < nblk; ++i) {
      const int32_t blk = btp[b * bt_s + i];
      TORCH_CHECK(blk >= 0 && blk < NB, "attention_backward: block_table[", b, ", ", i, "] = ", blk,
                  " out of range [0, ", NB, ")");
      nref_blk[size_t(blk)] += 1;
    }
  }

  const auto cont = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_q = at::zeros({T, Hq, D}, cont);
  at::Tensor grad_kc = at::zeros(key_cache.sizes(), cont);
  at::Tensor grad_vc = at::zeros(value_cache.sizes(), cont);
  if (B == 0 || T == 0) return {grad_q, grad_kc, grad_vc};

  const int G = int(Hq / Hk);
  const int Dp = int((D + 15) / 16 * 16);
  const int QB = std::max(1, 64 / G);  // queries per pass-1 item / pass-2 row block (~64 rows)
  const int64_t maxR = int64_t(QB) * G;

  // Shared blocks: reference ids in (sequence, logical block) order.
  std::vector<int64_t> ref_base(size_t(B), 0);
  std::vector<int32_t> ref_id;
  std::vector<int32_t> ref_ncov;                 // valid offsets of each reference
  std::vector<std::vector<int32_t>> blk_refs;    // per shared block: its references, ascending
  std::vector<int64_t> shared_blks;
  bool any_shared = false;
  for (int32_t c : nref_blk) any_shared = any_shared || c > 1;
  if (any_shared) {
    std::vector<int32_t> blk_slot(size_t(NB), -1);
    for (int64_t b = 0; b < B; ++b) {
      ref_base[size_t(b)] = int64_t(ref_id.size());
      const int qlen = qsl[b + 1] - qsl[b], ctx = sls[b];
      if (qlen == 0) continue;
      const int64_t nblk = (ctx + BS - 1) / BS;
      for (int64_t lb = 0; lb < nblk; ++lb) {
        const int32_t blk = btp[b * bt_s + lb];
        if (nref_blk[size_t(blk)] <= 1) { ref_id.push_back(-1); continue; }
        const int32_t id = int32_t(ref_ncov.size());
        ref_id.push_back(id);
        ref_ncov.push_back(int32_t(std::min<int64_t>(BS, ctx - lb * BS)));
        if (blk_slot[size_t(blk)] < 0) {
          blk_slot[size_t(blk)] = int32_t(blk_refs.size());
          blk_refs.emplace_back();
          shared_blks.push_back(blk);
        }
        blk_refs[size_t(blk_slot[size_t(blk)])].push_back(id);
      }
    }
  }
  at::Tensor part;
  if (!ref_ncov.empty())
    part = at::empty({2, int64_t(ref_ncov.size()) * Hk * BS * Dp}, at::kFloat);
  at::Tensor delta = at::empty({T * Hq}, at::kFloat);

  // Work items.
  std::vector<attn_bwd::Item1> items1;
  std::vector<attn_bwd::Item2> items2;
  for (int b = 0; b < B; ++b) {
    const int qlen = qsl[b + 1] - qsl[b], ctx = sls[b];
    if (qlen == 0) continue;
    for (int g = 0; g < Hk; ++g) {
      for (int i0 = 0; i0 < qlen; i0 += QB) items1.push_back({b, g, i0, std::min(qlen, i0 + QB)});
      for (int tile = 0; tile * attn::kTile < ctx; ++tile) items2.push_back({b, g, tile});
    }
  }
  auto cost1 = [&](const attn_bwd::Item1& it) {
    const int pmax = sls[it.b] - (qsl[it.b + 1] - qsl[it.b]) + it.qi1 - 1;
    return int64_t(it.qi1 - it.qi0) * (pmax + 1);
  };
  auto cost2 = [&](const attn_bwd::Item2& it) {
    const int qlen = qsl[it.b + 1] - qsl[it.b], pstart = sls[it.b] - qlen;
    const int k0 = it.tile * attn::kTile;
    return int64_t(qlen - std::max(0, k0 - pstart)) + 8;  // visible queries (+ fixed tile cost)
  };
  std::stable_sort(items1.begin(), items1.end(),
                   [&](const attn_bwd::Item1& a, const attn_bwd::Item1& b) { return cost1(a) > cost1(b); });
  std::stable_sort(items2.begin(), items2.end(),
                   [&](const attn_bwd::Item2& a, const attn_bwd::Item2& b) { return cost2(a) > cost2(b); });

  const bool use_avx = active_isa() != Isa::kPortable && BI_X86;
  dispatch_float(dt, [&](auto tag) {
    using E = typename decltype(tag)::type;
    attn_bwd::Problem<E> P;
    P.q = ptr<E>(q); P.q_st = q.stride(0); P.q_sh = q.stride(1);
    P.dout = ptr<E>(grad_out); P.do_st = grad_out.stride(0); P.do_sh = grad_out.stride(1);
    P.out = ptr<E>(out); P.o_st = out.stride(0); P.o_sh = out.stride(1);
    P.lse = lse.data_ptr<float>(); P.lse_st = lse.stride(0); P.lse_sh = lse.stride(1);
    P.kc = ptr<E>(key_cache); P.kc_sb = key_cache.stride(0); P.kc_ss = key_cache.stride(1); P.kc_sh = key_cache.stride(2);
    P.vc = ptr<E>(value_cache); P.vc_sb = value_cache.stride(0); P.vc_ss = value_cache.stride(1); P.vc_sh = value_cache.stride(2);
    P.qsl = qsl; P.seq_lens = sls; P.bt = btp; P.bt_s = bt_s;
    P.Hq = int(Hq); P.Hk = int(Hk); P.D = int(D); P.Dp = Dp; P.block_size = int(BS);
    P.scale = static_cast<float>(scale);
    P.dq = ptr<E>(grad_q); P.dq_st = grad_q.stride(0); P.dq_sh = grad_q.stride(1);
    P.dkc = ptr<E>(grad_kc); P.dkc_sb = grad_kc.stride(0); P.dkc_ss = grad_kc.stride(1); P.dkc_sh = grad_kc.stride(2);
    P.dvc = ptr<E>(grad_vc); P.dvc_sb = grad_vc.stride(0); P.dvc_ss = grad_vc.stride(1); P.dvc_sh = grad_vc.stride(2);
    P.delta = delta.data_ptr<float>();
    if (!ref_ncov.empty()) {
      P.ref_base = ref_base.data();
      P.ref_id = ref_id.data();
      P.part_k = part.data_ptr<float>();
      P.part_v = P.part_k + part.size(1);
    }
    // Pass 1: grad_q and Delta (rows independent).
    run_items(items1, maxR, Dp, [&](const attn_bwd::Item1& it, const attn_bwd::Scratch& S) {
      if (use_avx) attn_bwd::pass1_item<E, true>(P, it, S);
      else attn_bwd::pass1_item<E, false>(P, it, S);
    });
    // Pass 2: grad_k / grad_v (keys independent).
    run_items(items2, maxR, Dp, [&](const attn_bwd::Item2& it, const attn_bwd::Scratch& S) {
      if (use_avx) attn_bwd::pass2_item<E, true>(P, it, QB, S);
      else attn_bwd::pass2_item<E, false>(P, it, QB, S);
    });
    // Shared blocks: ordered sum of the per-reference partials.
    if (!shared_blks.empty()) {
      const int64_t nsb = int64_t(shared_blks.size());
      at::parallel_for(0, nsb * Hk, 1, [&](int64_t ib, int64_t ie) {
        std::vector<float> tmp(size_t(2 * Dp));
        std::vector<int32_t> ncov;
        for (int64_t i = ib; i < ie; ++i) {
          const auto& refs = blk_refs[size_t(i / Hk)];
          ncov.clear();
          for (int32_t id : refs) ncov.push_back(ref_ncov[size_t(id)]);
          if (use_avx)
            attn_bwd::finish_shared<E, true>(P, shared_blks[size_t(i / Hk)], int(i % Hk), refs.data(), ncov.data(),
                                             int(refs.size()), tmp.data());
          else
            attn_bwd::finish_shared<E, false>(P, shared_blks[size_t(i / Hk)], int(i % Hk), refs.data(), ncov.data(),
                                              int(refs.size()), tmp.data());
        }
      });
    }
  });
  return {grad_q, grad_kc, grad_vc};
}

}  // namespace cpu
}  // namespace bi
