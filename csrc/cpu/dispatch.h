// ATen-facing helpers shared by the CPU launchers (not included by the framework-free kernels).
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace bi {
namespace cpu {

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<E>{}) with E = float, bf16_t or fp16_t for the tensor dtype `st`.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kBFloat16: f(Tag<bf16_t>{}); break;
    case at::kHalf: f(Tag<fp16_t>{}); break;
    default: TORCH_CHECK(false, "batch_invariant cpu kernels: unsupported dtype ", st,
                         " (bfloat16, float16, float32)");
  }
}

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace cpu
}  // namespace bi
