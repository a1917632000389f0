// Paged attention forward (kernels/attention.cuh) through the CPU simulator (see sim_ops.h): the
// same grid / block / NPL choice as the device launcher csrc/cuda/launch_attention.cu.
#include <stdexcept>
#include <string>

#include "../kernels/attention.cuh"
#include "sim_ops.h"

namespace bi {
namespace cuda {
namespace sim {
namespace {

template <typename T>
struct AttnTag { using type = T; };

template <typename F>
void attn_dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kF32: f(AttnTag<float>{}); break;
    case kBF16: f(AttnTag<__nv_bfloat16>{}); break;
    case kF16: f(AttnTag<__half>{}); break;
    default: throw std::invalid_argument("cuda sim: unknown dtype code " + std::to_string(code));
  }
}

}  // namespace

void launch_attention(const AttentionCall& c) {
  if (c.T == 0 || c.Hq == 0) return;
  if (c.D < 1 || c.D > kAttnMaxHead) throw std::invalid_argument("cuda sim attention: head size 1..256");
  if (c.Hk < 1 || c.Hq % c.Hk != 0) throw std::invalid_argument("cuda sim attention: Hq % Hk != 0");
  const int split = c.split > 0 ? c.split : contract::ATTN_SPLIT;
  if (split % kAttnTile != 0) throw std::invalid_argument("cuda sim attention: split must be a multiple of the tile");
  attn_dispatch_dtype(c.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    AttentionArgs<T> a{};
    a.q = reinterpret_cast<const T*>(c.q); a.q_st = c.q_st; a.q_sh = c.q_sh;
    a.kc = reinterpret_cast<const T*>(c.kc); a.kc_sb = c.kc_sb; a.kc_ss = c.kc_ss; a.kc_sh = c.kc_sh;
    a.vc = reinterpret_cast<const T*>(c.vc); a.vc_sb = c.vc_sb; a.vc_ss = c.vc_ss; a.vc_sh = c.vc_sh;
    a.qsl = reinterpret_cast<const int32_t*>(c.qsl);
    a.seq_lens = reinterpret_cast<const int32_t*>(c.seq_lens);
    a.bt = reinterpret_cast<const int32_t*>(c.bt); a.bt_s = c.bt_s;
    a.T_tokens = c.T; a.B = c.B; a.Hq = c.Hq; a.Hk = c.Hk; a.D = c.D; a.block_size = c.block_size;
    a.split = split;
    a.scale = c.scale;
    a.out = reinterpret_cast<T*>(c.out); a.o_st = int64_t(c.Hq) * c.D; a.o_sh = c.D;
    a.lse = reinterpret_cast<float*>(c.lse); a.lse_st = c.Hq;
    const dim3 grid(unsigned(c.T), unsigned((c.Hq + kAttnWarps - 1) / kAttnWarps)), block(kAttnThreads);
    dispatch_attention_npl(attention_lanes_per_thread(c.D), [&](auto nc) {
      constexpr int NPL = decltype(nc)::value;
      launch(grid, block, &attention_fwd_kernel<T, NPL>, a);
    });
  });
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
