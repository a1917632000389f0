// Compile check of the CUDA paged attention kernel headers (kernels/attention.cuh, the SIMT
// kernels, and kernels/attention_mma.cuh, the tensor-core ones, through kernels/attention_plan.cuh) for the device
// (tests/cuda/test_cuda_sim_attention.py runs `nvcc -c` on this file for sm_80 and sm_90a and
// checks the PTX). Instantiations: every dtype, the single-register head (NPL 1, D <= 32), a
// masked one (NPL 2), the common D = 128 (NPL 4) and the largest (NPL 8, D = 256); NPL only sizes
// the per-lane arrays, the code path is shared. The split-parallel path's kernels. The
// tensor-core kernels for bf16 / fp16 and D = 64 / 128 (both paths). Plus the host-side dispatch
// and the plan.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../csrc/cuda/kernels/attention_plan.cuh"

namespace bi {
namespace cuda {

template __global__ void attention_fwd_kernel<__nv_bfloat16, 1>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_fwd_kernel<__nv_bfloat16, 4>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_fwd_kernel<__half, 2>(AttentionArgs<__half>);
template __global__ void attention_fwd_kernel<__half, 4>(AttentionArgs<__half>);
template __global__ void attention_fwd_kernel<float, 4>(AttentionArgs<float>);
template __global__ void attention_fwd_kernel<float, 8>(AttentionArgs<float>);
// the split-parallel path's two kernels (they share split_state / combine_split with the above)
template __global__ void attention_split_kernel<__nv_bfloat16, 4>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_combine_kernel<__nv_bfloat16, 4>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_split_kernel<float, 8>(AttentionArgs<float>);
template __global__ void attention_combine_kernel<float, 8>(AttentionArgs<float>);
// tensor-core kernels (the split path's combine is attention_combine_kernel<T, D / 32> above / below)
template __global__ void attention_mma_kernel<__nv_bfloat16, 64>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_mma_kernel<__nv_bfloat16, 128>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_mma_kernel<__half, 128>(AttentionArgs<__half>);
template __global__ void attention_mma_split_kernel<__nv_bfloat16, 128>(AttentionArgs<__nv_bfloat16>);
template __global__ void attention_mma_split_kernel<__half, 64>(AttentionArgs<__half>);
template __global__ void attention_combine_kernel<__half, 2>(AttentionArgs<__half>);

int host_attention_dispatch_check(int D) {
  int got = 0;
  dispatch_attention_npl(attention_lanes_per_thread(D), [&](auto n) { got = decltype(n)::value; });
  return got;
}

bool host_attention_path_check(int64_t T, int64_t ctx) {
  return attention_plan<__nv_bfloat16>(kAttnPathAuto, T, 1, 32, 8, 128, ctx, contract::ATTN_SPLIT, 132).split;
}

}  // namespace cuda
}  // namespace bi
