// Launcher: silu_and_mul (kernel body in kernels/activation.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "dispatch.h"
#include "launchers.h"
#include "kernels/activation.h"

namespace bi {
namespace cpu {
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device(), " (shape ", x.sizes(),
              ", dtype ", x.scalar_type(), ")");
  TORCH_CHECK(x.dim() == 2, "x must be 2-d [T, 2D], got shape ", x.sizes(), ", dtype ", x.scalar_type());
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "x must be float32, bfloat16 or float16, got ", st, " (shape ", x.sizes(), ")");
  TORCH_CHECK(x.size(1) % 2 == 0, "x's last dim must be even ([T, 2D]), got shape ", x.sizes(),
              ", dtype ", st);
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have a contiguous last dim, got shape ",
              x.sizes(), ", strides ", x.strides(), ", dtype ", st);
  const int64_t T = x.size(0), D = x.size(1) / 2;
  at::Tensor out = at::empty({T, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || D == 0) return out;
  const bool avx = active_isa() != Isa::kPortable;
  const int64_t xs = x.stride(0);
  dispatch_float(st, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    const T_* xp = reinterpret_cast<const T_*>(x.data_ptr());
    T_* op = reinterpret_cast<T_*>(out.data_ptr());
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / D), [&](int64_t b, int64_t e) {
      kernels::silu_and_mul_rows<T_>(xp, xs, op, D, D, b, e, avx);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace bi
