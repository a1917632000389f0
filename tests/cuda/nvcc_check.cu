// Compile check of the torch-free CUDA kernel headers for the device (tests/cuda/
// test_cuda_sim_rows.py runs `nvcc -c` on this file for sm_80 and sm_90a). Explicit
// instantiations of every kernel for every (T, W / O) pair the launchers dispatch to at a
// multi-warp block size (64), the single-warp path (32) for one pair, and dispatch_threads from
// host code. (All block sizes share one code path beyond that: THREADS only sizes loops/arrays.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../csrc/cuda/kernels/rms_norm.cuh"
#include "../../csrc/cuda/kernels/row_softmax.cuh"

namespace bi {
namespace cuda {

#define BI_RMS(T, W, N) template __global__ void rms_norm_kernel<T, W, N>(RmsNormArgs<T, W>);
#define BI_ROW(T, O, N)                                                            \
  template __global__ void log_softmax_kernel<T, O, N>(RowSoftmaxArgs<T, O>);    \
  template __global__ void softmax_kernel<T, O, N>(RowSoftmaxArgs<T, O>);        \
  template __global__ void row_mean_kernel<T, O, N>(RowSoftmaxArgs<T, O>);
#define BI_ALL(N)                                                                                  \
  BI_RMS(float, float, N) BI_RMS(__nv_bfloat16, __nv_bfloat16, N) BI_RMS(__nv_bfloat16, float, N) \
  BI_RMS(__half, __half, N) BI_RMS(__half, float, N)                                              \
  BI_ROW(float, float, N) BI_ROW(__nv_bfloat16, __nv_bfloat16, N) BI_ROW(__nv_bfloat16, float, N) \
  BI_ROW(__half, __half, N) BI_ROW(__half, float, N)

BI_ALL(64)
BI_RMS(__nv_bfloat16, float, 32)
BI_ROW(__nv_bfloat16, float, 32)

// Every wrapper of intrinsics.cuh on the device path (votes, shuffles of each type, barriers,
// dynamic shared memory, bit casts, conversions).
__global__ void intrinsics_check(float* out, unsigned* bits) {
  float* smem = dynamic_smem<float>();
  const int lane = int(threadIdx.x) & 31;
  smem[threadIdx.x] = float(lane);
  block_sync();
  warp_sync();
  const unsigned b = warp_ballot(lane & 1);
  const bool any = warp_any(lane == 3), all = warp_all(lane < 32);
  const int si = warp_shfl_xor(lane, 1) + warp_shfl(lane, 0);
  const unsigned su = warp_shfl_xor(unsigned(lane), 2) + warp_shfl(unsigned(lane), 1);
  const float f = add_rn(warp_shfl_xor(smem[threadIdx.x], 4), warp_shfl(1.0f, 2));
  const float h = add_rn(to_f32(from_f32<__half>(f)), to_f32(from_f32<__nv_bfloat16>(f)));
  const float g = fma_rn(h, rint_rn(f), sqrt_rn(div_rn(sub_rn(f, 1.0f), mul_rn(f, 2.0f))));
  out[threadIdx.x] = add_rn(add_rn(g, exp_f32(f)), add_rn(log_f32(add_rn(f, 1.0f)), uint_as_float(float_as_uint(f))));
  bits[threadIdx.x] = b + unsigned(any) + unsigned(all) + unsigned(si) + su;
}

int host_dispatch_check(int hidden) {
  int got = 0;
  dispatch_threads(rms_norm_threads(hidden), [&](auto t) { got = decltype(t)::value; });
  return got + row_softmax_threads(hidden);
}

}  // namespace cuda
}  // namespace bi
