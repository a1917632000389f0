// Launcher: top_k_top_p_mask (kernel body in kernels/sampling.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "launchers.h"
#include "kernels/sampling.h"

namespace bi {
namespace cpu {

at::Tensor top_k_top_p_mask(const at::Tensor& logits, const at::Tensor& top_k, const at::Tensor& top_p) {
  TORCH_CHECK(logits.device().is_cpu() && top_k.device().is_cpu() && top_p.device().is_cpu(),
              "top_k_top_p_mask: all tensors must be on the CPU, got logits on ", logits.device(),
              ", top_k on ", top_k.device(), ", top_p on ", top_p.device());
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "logits must be a 2-d float32 tensor [T, V], got shape ", logits.sizes(), ", dtype ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits must have a contiguous last dim, got shape ", logits.sizes(), ", strides ",
              logits.strides());
  const int64_t T = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V <= int64_t(UINT32_MAX), "logits: V = ", V, " is too large");
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == T && top_k.scalar_type() == at::kLong,
              "top_k must be a 1-d int64 tensor with one entry per row of logits (", T,
              "), got shape ", top_k.sizes(), ", dtype ", top_k.scalar_type());
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == T && top_p.scalar_type() == at::kFloat,
              "top_p must be a 1-d float32 tensor with one entry per row of logits (", T,
              "), got shape ", top_p.sizes(), ", dtype ", top_p.scalar_type());
  at::Tensor out = at::empty({T, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || V == 0) return out;
  at::Tensor k = top_k.contiguous();
  at::Tensor p = top_p.contiguous();
  const bool avx = active_isa() != Isa::kPortable;
  const float* zp = logits.data_ptr<float>();
  const int64_t zs = logits.stride(0);
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* pp = p.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    kernels::top_k_top_p_rows(zp, zs, kp, pp, op, V, V, b, e, avx);
  });
  return out;
}

}  // namespace cpu
}  // namespace bi
