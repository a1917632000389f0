// log_softmax / softmax / row mean through the CPU simulator (see sim_ops.h), and the host entry
// to the deterministic exp / log routines.
#include <stdexcept>
#include <string>

#include "../kernels/row_softmax.cuh"
#include "sim_tensors.h"

namespace bi {
namespace cuda {
namespace sim {

int row_op_block(int64_t cols) { return row_softmax_threads(cols); }

int launch_row_op(const RowOpCall& c) {
  const int threads = c.threads > 0 ? c.threads : row_softmax_threads(c.cols);
  if (c.rows == 0 || c.cols == 0) return threads;
  if (c.op < kLogSoftmax || c.op > kRowMean)
    throw std::invalid_argument("cuda sim: unknown row op " + std::to_string(c.op));
  dispatch_dtype_pair(c.dtype, c.out_dtype, "out", [&](auto tag, auto otag) {
    using T = typename decltype(tag)::type;
    using O = typename decltype(otag)::type;
    RowSoftmaxArgs<T, O> a;
    a.x = Addr{c.x};
    a.x_stride = c.x_stride;
    a.out = Addr{c.out};
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
