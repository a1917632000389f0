// log_softmax / softmax / row mean through the CPU simulator (see sim_ops.h), and the host entry
// to the deterministic exp / log routines.
#include <stdexcept>
#include <string>

#include "../kernels/row_softmax.cuh"
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

int row_op_block(int64_t cols) { return row_softmax_threads(cols); }

int launch_row_op(const RowOpCall& c) {
  const int threads = c.threads > 0 ? c.threads : row_softmax_threads(c.cols);
  if (c.rows == 0 || c.cols == 0) return threads;
  if (c.out_dtype != c.dtype && c.out_dtype != kF32)
    throw std::invalid_argument("cuda sim: out dtype must be x's dtype or float32");
  if (c.op < kLogSoftmax || c.op > kRowMean)
    throw std::invalid_argument("cuda sim: unknown row op " + std::to_string(c.op));
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto otag) {
      using O = typename decltype(otag)::type;
      RowSoftmaxArgs<T, O> a;
      a.x = reinterpret_cast<const T*>(c.x);
      a.x_stride = c.x_stride;
      a.out = reinterpret_cast<O*>(c.out);
      a.out_stride = c.out_stride;
      a.rows = c.rows;
      a.cols = c.cols;
      dispatch_threads(threads, [&](auto tc) {
        constexpr int THREADS = decltype(tc)::value;
        const dim3 grid(unsigned(c.rows)), block(THREADS);
        if (c.op == kLogSoftmax) launch(grid, block, &log_softmax_kernel<T, O, THREADS>, a);
        else if (c.op == kSoftmax) launch(grid, block, &softmax_kernel<T, O, THREADS>, a);
        else launch(grid, block, &row_mean_kernel<T, O, THREADS>, a);
      });
    };
    if (c.out_dtype == kF32) run(Tag<float>{});
    else run(Tag<T>{});
  });
  return threads;
}

void math_f32(int which, const float* in, float* out, int64_t n) {
  if (which == 0)
    for (int64_t i = 0; i < n; ++i) out[i] = exp_f32(in[i]);
  else
    for (int64_t i = 0; i < n; ++i) out[i] = log_f32(in[i]);
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
