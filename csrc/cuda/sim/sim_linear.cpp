// linear / bmm_nt through the CPU simulator (see sim_ops.h): the device launcher's plan and launch
// sequence (kernels/linear_plan.cuh: load path, fused vs split-parallel path, grids, workspace
// layout), with the SM count a parameter (the simulator has none; the tests pass a small one so
// that the auto choice switches within small shapes) and the workspace a host vector.
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/linear_plan.cuh"
#include "sim_tensors.h"

namespace bi {
namespace cuda {
namespace sim {

int linear_block_k(int dtype) {
  int v = 0;
  dispatch_dtype(dtype, [&](auto tag) { v = LinearTile<typename decltype(tag)::type>::BK; });
  return v;
}
int linear_block_m(int dtype) {
  int v = 0;
  dispatch_dtype(dtype, [&](auto tag) { v = LinearTile<typename decltype(tag)::type>::BM; });
  return v;
}
int linear_block_n(int dtype) {
  int v = 0;
  dispatch_dtype(dtype, [&](auto tag) { v = LinearTile<typename decltype(tag)::type>::BN; });
  return v;
}

int linear_k_chunk() { return kLinearKChunk; }

LinearPlanInfo linear_plan_info(int dtype, int path, int64_t batches, int64_t M, int64_t N, int64_t K, int sm_count) {
  LinearPlanInfo info;
  dispatch_dtype(dtype, [&](auto tag) {
    const LinearPlan pl = linear_plan<typename decltype(tag)::type>(path, batches, M, N, K, sm_count);
    info = LinearPlanInfo{pl.path, pl.m_tiles, pl.n_tiles, pl.chunks, pl.ws_floats, int64_t(pl.combine_blocks),
                          pl.error};
  });
  return info;
}

int launch_linear(const LinearCall& c) {
  check_dtype_pair(c.dtype, c.out_dtype, "out");  // before the empty-shape return
  if (c.M > 0x7fffffff || c.N > 0x7fffffff || c.K > 0x7fffffff)
    throw std::invalid_argument("cuda sim: M, N, K must fit in int");
  int path = c.path;
  if (path < 0) {  // the device launcher's knob
    std::string error;
    path = linear_path_from_env(&error);
    if (path < 0) throw std::invalid_argument("cuda sim linear: " + error);
  }
  if (path > kLinearPathSplit) throw std::invalid_argument("cuda sim linear: bad path " + std::to_string(path));
  if (c.batches == 0 || c.M == 0 || c.N == 0) return kLinearPathFused;
  int ran = kLinearPathFused;
  dispatch_dtype_pair(c.dtype, c.out_dtype, "out", [&](auto tag, auto otag) {
    using T = typename decltype(tag)::type;
    using O = typename decltype(otag)::type;
    LinearArgs<T, O> a{};
    a.x = Addr{c.x};
    a.x_stride = c.x_stride;
    a.x_batch_stride = c.x_bstride;
    a.w = Addr{c.w};
    a.w_stride = c.w_stride;
    a.w_batch_stride = c.w_bstride;
    a.bias = Addr{c.bias};
    a.out = Addr{c.out};
    a.out_stride = c.out_stride;
    a.out_batch_stride = c.out_bstride;
    a.M = int(c.M);
    a.N = int(c.N);
    a.K = int(c.K);
    const LinearPlan plan = linear_plan<T>(path, c.batches, c.M, c.N, c.K, c.sm_count);
    if (!plan.error.empty()) throw std::invalid_argument("cuda sim linear: " + plan.error);
    const bool vec = linear_vec_ok<T>(a.x, a.x_stride, a.x_batch_stride, a.w, a.w_stride, a.w_batch_stride,
                                      c.batches, a.K);
    // NaN-filled: a chunk sum the combine reads without a partial kernel having written it shows up.
    std::vector<float> ws(size_t(plan.ws_floats), std::numeric_limits<float>::quiet_NaN());
    linear_run(plan, a, c.batches, vec, ws.data(),
               [](dim3 grid, dim3 block, size_t smem, auto kernel, const auto& args) {
                 launch_with_smem(grid, block, smem, kernel, args);
               });
    ran = plan.path;
  });
  return ran;
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
