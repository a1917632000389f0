// rms_norm / fused_add_rms_norm through the CPU simulator (see sim_ops.h).
#include "../kernels/rms_norm.cuh"
#include "sim_tensors.h"

namespace bi {
namespace cuda {
namespace sim {

int rms_norm_block(int hidden) { return rms_norm_threads(hidden); }

int launch_rms_norm(const RmsNormCall& c) {
  const int threads = c.threads > 0 ? c.threads : rms_norm_threads(c.hidden);
  if (c.rows == 0 || c.hidden == 0) return threads;
  dispatch_dtype_pair(c.dtype, c.weight_dtype, "weight", [&](auto tag, auto wtag) {
    using T = typename decltype(tag)::type;
    using W = typename decltype(wtag)::type;
    RmsNormArgs<T, W> a;
    a.x = Addr{c.x};
    a.x_stride = c.x_stride;
    a.residual = Addr{c.residual};
    a.residual_stride = c.residual_stride;
    a.residual_out = Addr{c.residual_out};
    a.residual_out_stride = c.residual_out_stride;
    a.weight = Addr{c.weight};
    a.out = Addr{c.out};
    a.out_stride = c.out_stride;
    a.rows = c.rows;
    a.hidden = c.hidden;
    a.eps = c.eps;
    dispatch_threads(threads, [&](auto tc) {
      constexpr int THREADS = decltype(tc)::value;
      launch(dim3(unsigned(c.rows)), dim3(THREADS), &rms_norm_kernel<T, W, THREADS>, a);
    });
  });
  return threads;
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
