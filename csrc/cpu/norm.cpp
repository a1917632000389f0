// Launchers: rms_norm, fused_add_rms_norm (kernel bodies in kernels/norm.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "dispatch.h"
#include "launchers.h"
#include "kernels/norm.h"

namespace bi {
namespace cpu {
namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device(), " (shape ",
              t.sizes(), ", dtype ", t.scalar_type(), ")");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-d [T, H], got shape ", t.sizes(), ", dtype ",
              t.scalar_type());
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", st, " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim, got shape ",
              t.sizes(), ", strides ", t.strides(), ", dtype ", st);
}

void check_weight(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.device().is_cpu(), "weight must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "weight must be 1-d [H] with H = ", x.size(1),
              ", got shape ", w.sizes(), ", dtype ", w.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat,
              "weight dtype must be x's dtype (", x.scalar_type(), ") or float32, got ",
              w.scalar_type(), " (shape ", w.sizes(), ")");
  TORCH_CHECK(w.size(0) <= 1 || w.stride(0) == 1, "weight must be contiguous, got shape ", w.sizes(),
              ", strides ", w.strides());
}

int64_t grain_for(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({T, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || H == 0) return out;
  const bool avx = active_isa() != Isa::kPortable;
  const float eps_f = float(eps);
  const int64_t xs = x.stride(0);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    auto run = [&](auto wtag) {
      using W_ = typename decltype(wtag)::type;
      const T_* xp = reinterpret_cast<const T_*>(x.data_ptr());
      const W_* wp = reinterpret_cast<const W_*>(weight.data_ptr());
      T_* op = reinterpret_cast<T_*>(out.data_ptr());
      at::parallel_for(0, T, grain_for(H), [&](int64_t b, int64_t e) {
        kernels::rms_norm_rows<T_, W_>(xp, xs, wp, op, H, H, eps_f, b, e, avx);
      });
    };
    if (weight.scalar_type() == at::kFloat) run(Tag<float>{});
    else run(Tag<T_>{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must match x: x has shape ", x.sizes(), ", dtype ", x.scalar_type(),
              "; residual has shape ", residual.sizes(), ", dtype ", residual.scalar_type());
  check_weight(weight, x);
  const int64_t T = x.size(0), H = x.size(1);
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({T, H}, opts);
  at::Tensor res_out = at::empty({T, H}, opts);
  if (T == 0 || H == 0) return {out, res_out};
  const bool avx = active_isa() != Isa::kPortable;
  const float eps_f = float(eps);
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    auto run = [&](auto wtag) {
      using W_ = typename decltype(wtag)::type;
      const T_* xp = reinterpret_cast<const T_*>(x.data_ptr());
      const T_* rp = reinterpret_cast<const T_*>(residual.data_ptr());
      const W_* wp = reinterpret_cast<const W_*>(weight.data_ptr());
      T_* op = reinterpret_cast<T_*>(out.data_ptr());
      T_* rop = reinterpret_cast<T_*>(res_out.data_ptr());
      at::parallel_for(0, T, grain_for(H), [&](int64_t b, int64_t e) {
        kernels::fused_add_rms_norm_rows<T_, W_>(xp, xs, rp, rs, wp, op, H, rop, H, H, eps_f, b, e,
                                                 avx);
      });
    };
    if (weight.scalar_type() == at::kFloat) run(Tag<float>{});
    else run(Tag<T_>{});
  });
  return {out, res_out};
}

}  // namespace cpu
}  // namespace bi
