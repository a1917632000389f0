// The simulator launchers' shared glue (sim_norm.cpp, sim_softmax.cpp, sim_linear.cpp,
// sim_attention.cpp): raw addresses from the pybind calls to typed kernel pointers, and the
// dtype-code dispatch to the kernels' element types (see sim_ops.h for the codes).
//   Addr{u}                          converts to any T* (a.x = Addr{c.x};)
//   dispatch_dtype(code, f)          f(Tag<T>{}) for T in {float, __nv_bfloat16, __half}
//   dispatch_dtype_pair(code, code2, what, f)
//                                    f(Tag<T>{}, Tag<O>{}) with O = float if code2 == kF32, else
//                                    O = T (code2 must be code or kF32, else check_dtype_pair throws
//                                    naming `what`)
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../intrinsics.cuh"
#include "sim_ops.h"

namespace bi {
namespace cuda {
namespace sim {

struct Addr {
  uintptr_t v;
  template <typename P>
  operator P*() const { return reinterpret_cast<P*>(v); }
};

template <typename T>
struct Tag { using type = T; };

template <typename F>
void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kF32: f(Tag<float>{}); break;
    case kBF16: f(Tag<__nv_bfloat16>{}); break;
    case kF16: f(Tag<__half>{}); break;
    default: throw std::invalid_argument("cuda sim: unknown dtype code " + std::to_string(code));
  }
}

inline void check_dtype_pair(int code, int code2, const char* what) {
  if (code2 != code && code2 != kF32)
    throw std::invalid_argument(std::string("cuda sim: ") + what + " dtype must be the input dtype or float32");
}

template <typename F>
void dispatch_dtype_pair(int code, int code2, const char* what, F&& f) {
  check_dtype_pair(code, code2, what);
  dispatch_dtype(code, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (code2 == kF32) f(tag, Tag<float>{});
    else f(tag, Tag<T>{});
  });
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
