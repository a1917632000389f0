// rms_norm / fused_add_rms_norm through the CPU simulator (see sim_ops.h).
#include <stdexcept>
#include <string>

#include "../kernels/rms_norm.cuh"
#include "sim_ops.h"

namespace bi {
namespace cuda {
namespace sim {
namespace {

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

}  // namespace

int rms_norm_block(int hidden) { return rms_norm_threads(hidden); }

int launch_rms_norm(const RmsNormCall& c) {
  const int threads = c.threads > 0 ? c.threads : rms_norm_threads(c.hidden);
  if (c.rows == 0 || c.hidden == 0) return threads;
  if (c.weight_dtype != c.dtype && c.weight_dtype != kF32)
    throw std::invalid_argument("cuda sim: weight dtype must be x's dtype or float32");
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      RmsNormArgs<T, W> a;
      a.x = reinterpret_cast<const T*>(c.x);
      a.x_stride = c.x_stride;
      a.residual = reinterpret_cast<const T*>(c.residual);
      a.residual_stride = c.residual_stride;
      a.residual_out = reinterpret_cast<T*>(c.residual_out);
      a.residual_out_stride = c.residual_out_stride;
      a.weight = reinterpret_cast<const W*>(c.weight);
      a.out = reinterpret_cast<T*>(c.out);
      a.out_stride = c.out_stride;
      a.rows = c.rows;
      a.hidden = c.hidden;
      a.eps = c.eps;
      dispatch_threads(threads, [&](auto tc) {
        constexpr int THREADS = decltype(tc)::value;
        launch(dim3(unsigned(c.rows)), dim3(THREADS), &rms_norm_kernel<T, W, THREADS>, a);
      });
    };
    if (c.weight_dtype == kF32) run(Tag<float>{});
    else run(Tag<T>{});
  });
  return threads;
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
