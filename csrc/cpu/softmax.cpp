// Launchers: log_softmax, softmax, row_mean (kernel bodies in kernels/softmax.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "common.h"
#include "dispatch.h"
#include "launchers.h"
#include "kernels/softmax.h"

namespace bi {
namespace cpu {
namespace {

void check_input(const at::Tensor& x, at::ScalarType out_dtype, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device(), " (shape ",
              x.sizes(), ", dtype ", x.scalar_type(), ")");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-d [T, V], got shape ", x.sizes(), ", dtype ",
              x.scalar_type());
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", st, " (shape ", x.sizes(), ")");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x must have a contiguous last dim, got shape ",
              x.sizes(), ", strides ", x.strides(), ", dtype ", st);
  TORCH_CHECK(out_dtype == st || out_dtype == at::kFloat, op, ": out_dtype must be x's dtype (", st,
              ") or float32, got ", out_dtype);
}

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// Calls f(Tag<In>, Tag<Out>) for x's dtype and out_dtype (x's dtype or float32).
template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, F&& f) {
  dispatch_float(in, [&](auto itag) {
    using I = typename decltype(itag)::type;
    if (out == at::kFloat) f(itag, Tag<float>{});
    else f(itag, Tag<I>{});
  });
}

}  // namespace

at::Tensor log_softmax(const at::Tensor& x, at::ScalarType out_dtype) {
  check_input(x, out_dtype, "log_softmax");
  const int64_t T = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({T, V}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || V == 0) return out;
  const bool avx = active_isa() != Isa::kPortable;
  const int64_t xs = x.stride(0);
  dispatch_in_out(x.scalar_type(), out_dtype, [&](auto itag, auto otag) {
    using I = typename decltype(itag)::type;
    using O = typename decltype(otag)::type;
    const I* xp = reinterpret_cast<const I*>(x.data_ptr());
    O* op = reinterpret_cast<O*>(out.data_ptr());
    at::parallel_for(0, T, grain_for(V), [&](int64_t b, int64_t e) {
      kernels::log_softmax_rows<I, O>(xp, xs, op, V, V, b, e, avx);
    });
  });
  return out;
}

at::Tensor softmax(const at::Tensor& x, at::ScalarType out_dtype) {
  check_input(x, out_dtype, "softmax");
  const int64_t T = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({T, V}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (T == 0 || V == 0) return out;
  const bool avx = active_isa() != Isa::kPortable;
  const int64_t xs = x.stride(0);
  dispatch_in_out(x.scalar_type(), out_dtype, [&](auto itag, auto otag) {
    using I = typename decltype(itag)::type;
    using O = typename decltype(otag)::type;
    const I* xp = reinterpret_cast<const I*>(x.data_ptr());
    O* op = reinterpret_cast<O*>(out.data_ptr());
    at::parallel_for(0, T, grain_for(V), [&](int64_t b, int64_t e) {
      std::vector<float> scratch(std::is_same<O, float>::value ? 0 : size_t(V));
      kernels::softmax_rows<I, O>(xp, xs, op, V, V, b, e, avx, scratch.data());
    });
  });
  return out;
}

at::Tensor row_mean(const at::Tensor& x, at::ScalarType out_dtype) {
  check_input(x, out_dtype, "row_mean");
  const int64_t T = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({T}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (T == 0) return out;
  const bool avx = active_isa() != Isa::kPortable;
  const int64_t xs = x.stride(0);
  dispatch_in_out(x.scalar_type(), out_dtype, [&](auto itag, auto otag) {
    using I = typename decltype(itag)::type;
    using O = typename decltype(otag)::type;
    const I* xp = reinterpret_cast<const I*>(x.data_ptr());
    O* op = reinterpret_cast<O*>(out.data_ptr());
    at::parallel_for(0, T, grain_for(V), [&](int64_t b, int64_t e) {
      kernels::row_mean_rows<I, O>(xp, xs, op, V, b, e, avx);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace bi
