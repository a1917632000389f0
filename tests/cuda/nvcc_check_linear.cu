// Compile check of kernels/linear.cuh and linear_plan.cuh for the device
// (tests/cuda/test_cuda_sim_linear.py runs `nvcc -c` on this file for sm_80 and sm_90a): every
// kernel the launcher dispatches to - the fused kernels, (T, O) in {bf16, fp16} x {T, float} x
// {cp.async, element-wise loads} and fp32 x fp32; the split-parallel path's chunk-sum kernels
// (fp32 output) and combine kernels (O in {bf16, fp16, float}) - plus the host-side plan and launch
// sequence (linear_plan / linear_run) with a <<<>>> launch as launch_linear.cu uses them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../csrc/cuda/kernels/linear_plan.cuh"

namespace bi {
namespace cuda {

#define BI_MMA(T, O)                                                                \
  template __global__ void linear_mma_kernel<T, O, true, false>(LinearArgs<T, O>);  \
  template __global__ void linear_mma_kernel<T, O, false, false>(LinearArgs<T, O>);
BI_MMA(__nv_bfloat16, __nv_bfloat16)
BI_MMA(__nv_bfloat16, float)
BI_MMA(__half, __half)
BI_MMA(__half, float)
#define BI_MMA_PARTIAL(T)                                                                  \
  template __global__ void linear_mma_kernel<T, float, true, true>(LinearArgs<T, float>);  \
  template __global__ void linear_mma_kernel<T, float, false, true>(LinearArgs<T, float>);
BI_MMA_PARTIAL(__nv_bfloat16)
BI_MMA_PARTIAL(__half)
template __global__ void linear_simt_kernel<float, false>(LinearArgs<float, float>);
template __global__ void linear_simt_kernel<float, true>(LinearArgs<float, float>);
template __global__ void linear_combine_kernel<__nv_bfloat16>(LinearCombineArgs<__nv_bfloat16>);
template __global__ void linear_combine_kernel<__half>(LinearCombineArgs<__half>);
template __global__ void linear_combine_kernel<float>(LinearCombineArgs<float>);

template <typename T, typename O>
void linear_plan_check(LinearArgs<T, O> a, float* ws, cudaStream_t s) {
  std::string error;
  const LinearPlan plan = linear_plan<T>(linear_path_from_env(&error), 1, a.M, a.N, a.K, 132);
  const bool vec = linear_vec_ok<T>(a.x, a.x_stride, 0, a.w, a.w_stride, 0, 1, a.K);
  linear_run(plan, a, 1, vec, ws, [&](dim3 grid, dim3 block, size_t smem, auto kernel, const auto& args) {
    kernel<<<grid, block, smem, s>>>(args);
  });
}
template void linear_plan_check(LinearArgs<__nv_bfloat16, float>, float*, cudaStream_t);
template void linear_plan_check(LinearArgs<__half, __half>, float*, cudaStream_t);
template void linear_plan_check(LinearArgs<float, float>, float*, cudaStream_t);

}  // namespace cuda
}  // namespace bi
