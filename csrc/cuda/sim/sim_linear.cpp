// linear / bmm_nt through the CPU simulator (see sim_ops.h): the same kernels, grid, block size,
// dynamic shared memory and load-path choice as the device launcher (csrc/cuda/launch_linear.cu).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "../kernels/linear.cuh"
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
  if (c.out_dtype != c.dtype && c.out_dtype != kF32)
    throw std::invalid_argument("cuda sim: out dtype must be the input dtype or float32");
  if (c.M > 0x7fffffff || c.N > 0x7fffffff || c.K > 0x7fffffff)
    throw std::invalid_argument("cuda sim: M, N, K must fit in int");
  if (c.batches == 0 || c.M == 0 || c.N == 0) return;
  dispatch_dtype(c.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Tile = LinearTile<T>;
    auto run = [&](auto otag) {
      using O = typename decltype(otag)::type;
      LinearArgs<T, O> a{};
      a.x = reinterpret_cast<const T*>(c.x);
      a.x_stride = c.x_stride;
      a.x_batch_stride = c.x_bstride;
      a.w = reinterpret_cast<const T*>(c.w);
      a.w_stride = c.w_stride;
      a.w_batch_stride = c.w_bstride;
      a.bias = reinterpret_cast<const float*>(c.bias);
      a.out = reinterpret_cast<O*>(c.out);
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
    };
    if (c.out_dtype == kF32) run(Tag<float>{});
    else run(Tag<T>{});
  });
}

}  // namespace sim
}  // namespace cuda
}  // namespace bi
