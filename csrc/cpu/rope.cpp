// Launcher: rotary embedding (vLLM cos_sin_cache layout). Kernel body: kernels/rope.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "kernels/rope.h"
#include "dispatch.h"
#include "launchers.h"

namespace bi {
namespace cpu {

namespace {

// View x ([T, H*hs] or [T, H, hs]) as (t stride, head stride, H); inner dim must be contiguous.
struct Layout { int64_t st, sh, H; };
Layout layout_of(const at::Tensor& x, const char* name, int64_t T, int64_t hs) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rotary_embedding: ", name, " must be [T, H*head_size] or [T, H, head_size], got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.size(0) == T, "rotary_embedding: ", name, " has ", x.size(0), " tokens, positions has ", T);
  if (x.dim() == 2) {
    TORCH_CHECK(x.size(1) % hs == 0, "rotary_embedding: ", name, " width ", x.size(1), " is not a multiple of head_size ", hs);
    TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "rotary_embedding: ", name, " inner dim must be contiguous, strides ", x.strides());
    return {x.stride(0), hs, x.size(1) / hs};
  }
  TORCH_CHECK(x.size(2) == hs, "rotary_embedding: ", name, " head size ", x.size(2), " != head_size ", hs);
  TORCH_CHECK(x.size(2) == 0 || x.stride(2) == 1, "rotary_embedding: ", name, " inner dim must be contiguous, strides ", x.strides());
  return {x.stride(0), x.stride(1), x.size(1)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                                                    const at::Tensor& k, int64_t head_size,
                                                    const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(positions.device().is_cpu() && q.device().is_cpu() && k.device().is_cpu() &&
                  cos_sin_cache.device().is_cpu(),
              "rotary_embedding: all tensors must be on the CPU");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1,
              "rotary_embedding: positions must be int64 [T], got ", positions.sizes(), " ", positions.scalar_type());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2,
              "rotary_embedding: cos_sin_cache must be float32 [max_pos, rot_dim], got ", cos_sin_cache.sizes(), " ",
              cos_sin_cache.scalar_type());
  TORCH_CHECK(head_size > 0, "rotary_embedding: head_size must be positive, got ", head_size);
  const int64_t T = positions.size(0), max_pos = cos_sin_cache.size(0), rot_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size, "rotary_embedding: rot_dim ", rot_dim,
              " (cos_sin_cache ", cos_sin_cache.sizes(), ") must be even, > 0 and <= head_size ", head_size);
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rotary_embedding: q ", q.scalar_type(), " and k ",
              k.scalar_type(), " must share one dtype");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "rotary_embedding: unsupported dtype ", dt);
  const Layout lq = layout_of(q, "q", T, head_size), lk = layout_of(k, "k", T, head_size);
  at::Tensor pos_c = positions.contiguous();
  at::Tensor cache_c = cos_sin_cache.stride(1) == 1 ? cos_sin_cache : cos_sin_cache.contiguous();
  const int64_t* pos = pos_c.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rotary_embedding: positions[", t, "] = ", pos[t],
                " out of range [0, ", max_pos, ")");
  at::Tensor q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor k_out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0) return {q_out, k_out};
  const bool avx = is_neox && active_isa() != Isa::kPortable && BI_X86;
  dispatch_float(dt, [&](auto tag) {
    using E = typename decltype(tag)::type;
    rope::Rope<E> R{pos, cache_c.data_ptr<float>(), cache_c.stride(0), int(rot_dim), int(head_size), is_neox};
    const E* qp = reinterpret_cast<const E*>(q.data_ptr());
    const E* kp = reinterpret_cast<const E*>(k.data_ptr());
    E* qo = reinterpret_cast<E*>(q_out.data_ptr());
    E* ko = reinterpret_cast<E*>(k_out.data_ptr());
    const int64_t Hq = lq.H, Hk = lk.H, H = Hq + Hk;
    at::parallel_for(0, T * H, 64, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t t = row / H, h = row % H;
        const E* src = h < Hq ? qp + t * lq.st + h * lq.sh : kp + t * lk.st + (h - Hq) * lk.sh;
        E* dst = h < Hq ? qo + (t * Hq + h) * head_size : ko + (t * Hk + (h - Hq)) * head_size;
#if BI_X86
        if (avx) { rope::rope_row_neox_avx<E>(R, t, src, dst); continue; }
#endif
        rope::rope_row_portable<E>(R, t, src, dst);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace cpu
}  // namespace bi
