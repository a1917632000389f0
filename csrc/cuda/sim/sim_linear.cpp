// linear / bmm_nt through the CPU simulator (see sim_ops.h): the same kernels, grid, block size,
// dynamic shared memory and load-path choice as the device launcher (csrc/cuda/launch_linear.cu).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "../kernels/linear.cuh"
#include "sim_tensors.h"

namespace bi {
namespace cuda {
namespace sim {
namespace {

constexpr int64_t kMaxGridZ = 65535;

}  // namespace

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

void launch_linear(const LinearCall& c) {
  check_dtype_pair(c.dtype, c.out_dtype, "out");  // before the empty-shape return
  if (c.M > 0x7fffffff || c.N > 0x7fffffff || c.K > 0x7fffffff)
    throw std::invalid_argument("cuda sim: M, N, K must fit in int");
  if (c.batches == 0 || c.M == 0 || c.N == 0) return;
  dispatch_dtype_pair(c.dtype, c.out_dtype, "out", [&](auto tag, auto otag) {
    using T = typename decltype(tag)::type;
    using O = typename decltype(otag)::type;
    using Tile = LinearTile<T>;
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
    const bool vec = linear_vec_ok<T>(a.x, a.x_stride, a.x_batch_stride, a.w, a.w_stride, a.w_batch_stride,
                                      c.batches, a.K);
    auto kernel = linear_kernel_for<T, O>(vec);
    const dim3 grid(unsigned((c.M + Tile::BM - 1) / Tile::BM), unsigned((c.N + Tile::BN - 1) / Tile::BN), 1);
    for (int64_t b0 = 0; b0 < c.batches; b0 += kMaxGridZ) {
      a.batch0 = b0;
      const dim3 g(grid.x, grid.y, unsigned(std::min<int64_t>(kMaxGridZ, c.batches - b0)));
      launch_with_smem(g, dim3(Tile::THREADS), Tile::kDynamicSmem, kernel, a);
    }
  });
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
