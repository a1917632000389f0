// Paged attention forward (kernels/attention.cuh) through the CPU simulator (see sim_ops.h): the
// same grid / block / NPL and path choice as the device launcher csrc/cuda/launch_attention.cu
// (the split-parallel path's workspace is a host vector here).
#include <limits>
#include <stdexcept>
#include <vector>

#include "../kernels/attention.cuh"
#include "sim_tensors.h"

namespace bi {
namespace cuda {
namespace sim {
namespace {

// The SM count the auto path choice assumes in the simulator (an H100 / H200 SXM): the choice
// never changes bits, only which kernels run.
constexpr int kAttnSimSmCount = 132;

}  // namespace

int launch_attention(const AttentionCall& c) {
  if (c.T == 0 || c.Hq == 0) return kAttnPathSequential;
  if (c.D < 1 || c.D > kAttnMaxHead) throw std::invalid_argument("cuda sim attention: head size 1..256");
  if (c.Hk < 1 || c.Hq % c.Hk != 0) throw std::invalid_argument("cuda sim attention: Hq % Hk != 0");
  if (c.path < kAttnPathAuto || c.path > kAttnPathSplit) throw std::invalid_argument("cuda sim attention: bad path");
  const int split = c.split > 0 ? c.split : contract::ATTN_SPLIT;
  if (split % kAttnTile != 0) throw std::invalid_argument("cuda sim attention: split must be a multiple of the tile");
  const int64_t splits = attention_max_splits(c.bt_cols * c.block_size, split);
  const bool use_split = attention_use_split(c.path, c.T, c.Hq, c.D, splits, kAttnSimSmCount);
  std::vector<float> ws;
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    AttentionArgs<T> a{};
    a.q = Addr{c.q}; a.q_st = c.q_st; a.q_sh = c.q_sh;
    a.kc = Addr{c.kc}; a.kc_sb = c.kc_sb; a.kc_ss = c.kc_ss; a.kc_sh = c.kc_sh;
    a.vc = Addr{c.vc}; a.vc_sb = c.vc_sb; a.vc_ss = c.vc_ss; a.vc_sh = c.vc_sh;
    a.qsl = Addr{c.qsl};
    a.seq_lens = Addr{c.seq_lens};
    a.bt = Addr{c.bt}; a.bt_s = c.bt_s;
    a.T_tokens = c.T; a.B = c.B; a.Hq = c.Hq; a.Hk = c.Hk; a.D = c.D; a.block_size = c.block_size;
    a.split = split;
    a.scale = c.scale;
    a.out = Addr{c.out}; a.o_st = int64_t(c.Hq) * c.D; a.o_sh = c.D;
    a.lse = Addr{c.lse}; a.lse_st = c.Hq;
    const dim3 grid(unsigned(c.T), unsigned((c.Hq + kAttnWarps - 1) / kAttnWarps)), block(kAttnThreads);
    dispatch_attention_npl(attention_lanes_per_thread(c.D), [&](auto nc) {
      constexpr int NPL = decltype(nc)::value;
      if (!use_split) {
        launch(grid, block, &attention_fwd_kernel<T, NPL>, a);
        return;
      }
      // NaN-filled: a slot the combine reads without the split pass having written it shows up
      ws.assign(size_t(attention_workspace_floats(c.T, c.Hq, c.D, splits)), std::numeric_limits<float>::quiet_NaN());
      a.ws = ws.data();
      a.ws_splits = splits;
      launch(dim3(grid.x, grid.y, unsigned(splits)), block, &attention_split_kernel<T, NPL>, a);
      launch(grid, block, &attention_combine_kernel<T, NPL>, a);
    });
  });
  return use_split ? kAttnPathSplit : kAttnPathSequential;
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
