// Paged attention forward (kernels/attention.cuh, kernels/attention_mma.cuh) through the CPU
// simulator (see sim_ops.h): the device launcher's plan and launch sequence (attention_plan /
// attention_run of kernels/attention_plan.cuh); the split-parallel path's workspace is a host vector
// here and the zero fill of the sequential tensor-core path a host memset.
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../kernels/attention_plan.cuh"
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
  int ran = kAttnPathSequential;
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const AttnPlan plan =
        attention_plan<T>(c.path, c.T, c.B, c.Hq, c.Hk, c.D, c.bt_cols * c.block_size, split, kAttnSimSmCount);
    if (!plan.error.empty()) throw std::invalid_argument("cuda sim attention: " + plan.error);
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
    if (plan.zero_out) {  // the device launcher allocates them with at::zeros
      std::memset(reinterpret_cast<void*>(c.out), 0, size_t(c.T) * c.Hq * c.D * sizeof(T));
      if (c.lse) std::memset(reinterpret_cast<void*>(c.lse), 0, size_t(c.T) * c.Hq * sizeof(float));
    }
    // NaN-filled: a slot the combine reads without the split pass having written it shows up
    std::vector<float> ws(size_t(plan.ws_floats), std::numeric_limits<float>::quiet_NaN());
    attention_run(plan, a, ws.data(), [](dim3 grid, dim3 block, size_t smem, auto kernel, const auto& args) {
      launch_with_smem(grid, block, smem, kernel, args);
    });
    ran = plan.split ? kAttnPathSplit : kAttnPathSequential;
  });
  return ran;
}

int attention_uses_mma_kernels(int dtype, int D) {
  int r = 0;
  dispatch_dtype(dtype, [&](auto tag) { r = attention_uses_mma<typename decltype(tag)::type>(D) ? 1 : 0; });
  return r;
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
