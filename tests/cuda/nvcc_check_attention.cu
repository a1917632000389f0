// Compile check of the CUDA paged attention kernel header (kernels/attention.cuh) for the device
// (tests/cuda/test_cuda_sim_attention.py runs `nvcc -c` on this file for sm_80 and sm_90a and
// checks the PTX). Instantiations: every dtype, the single-register head (NPL 1, D <= 32), a
// masked one (NPL 2), the common D = 128 (NPL 4) and the largest (NPL 8, D = 256); NPL only sizes
// the per-lane arrays, the code path is shared. The split-parallel path's kernels. Plus the
// host-side dispatch and path choice.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../../csrc/cuda/kernels/attention.cuh"

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

int host_attention_dispatch_check(int D) {
  int got = 0;
  dispatch_attention_npl(attention_lanes_per_thread(D), [&](auto n) { got = decltype(n)::value; });
  return got;
}

bool host_attention_path_check(int64_t T, int64_t ctx) {
  return attention_use_split(kAttnPathAuto, T, 32, 128, attention_max_splits(ctx, contract::ATTN_SPLIT), 132);
}

}  // namespace cuda
}  // namespace bi
