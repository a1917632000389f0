// Compile check of kernels/linear.cuh for the device (tests/cuda/test_cuda_sim_linear.py runs
// `nvcc -c` on this file for sm_80 and sm_90a): every kernel the launcher dispatches to, (T, O) in
// {bf16, fp16} x {T, float} x {cp.async, element-wise loads} and fp32 x fp32, plus the host-side
// plan (linear_kernel_for / linear_vec_ok) as launch_linear.cu uses it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../csrc/cuda/kernels/linear.cuh"

namespace bi {
namespace cuda {

#define BI_MMA(T, O)                                                         \
  template __global__ void linear_mma_kernel<T, O, true>(LinearArgs<T, O>);  \
  template __global__ void linear_mma_kernel<T, O, false>(LinearArgs<T, O>);
BI_MMA(__nv_bfloat16, __nv_bfloat16)
BI_MMA(__nv_bfloat16, float)
BI_MMA(__half, __half)
BI_MMA(__half, float)
template __global__ void linear_simt_kernel<float>(LinearArgs<float, float>);

void linear_plan_check(LinearArgs<__nv_bfloat16, float> a, LinearArgs<float, float> f, cudaStream_t s) {
  const bool vec = linear_vec_ok<__nv_bfloat16>(a.x, a.x_stride, 0, a.w, a.w_stride, 0, 1, a.K);
  linear_kernel_for<__nv_bfloat16, float>(vec)<<<dim3(1, 1, 1), LinearTile<__nv_bfloat16>::THREADS,
                                                 LinearTile<__nv_bfloat16>::kDynamicSmem, s>>>(a);
  linear_kernel_for<float, float>(true)<<<dim3(1, 1, 1), LinearTile<float>::THREADS, 0, s>>>(f);
}

}  // namespace cuda
}  // namespace bi
