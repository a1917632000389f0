// CUDA row-wise softmax family: log_softmax, softmax, row mean (torch-free; nvcc, or g++
// -DBI_CUDA_SIM for the CPU simulator). One block per row, THREADS = row_softmax_threads(cols).
//
// Interface (used by the launcher csrc/cuda/*.cu and the simulator module csrc/cuda/sim/):
//   template <typename T, typename O> struct RowSoftmaxArgs {
//     const T* x; int64_t x_stride; O* out; int64_t out_stride; int64_t rows; int64_t cols; };
//   int row_softmax_threads(int64_t cols);  // block size: a function of cols only
//   template <typename T, typename O, int THREADS> __global__ void log_softmax_kernel(RowSoftmaxArgs<T, O>);
//   template <typename T, typename O, int THREADS> __global__ void softmax_kernel(RowSoftmaxArgs<T, O>);
//   template <typename T, typename O, int THREADS> __global__ void row_mean_kernel(RowSoftmaxArgs<T, O>);
//       out[row] (out_stride unused)
//   grid = rows, block = THREADS, no dynamic shared memory; dispatch_threads: row_common.cuh.
// T in {float, __half, __nv_bfloat16}; O is T or float. Strides in elements, cols contiguous;
// cols >= 1 (the launcher returns early for empty tensors).
//
// Per row z[0..V) (fp32 values of x), in this backend's reduction order (row_common.cuh):
//   mx  = max of z (MaxOp, per thread from -inf, block_reduce<MaxOp>)
//   s   = sum of exp_f32(z_v - mx) (add_rn per thread from +0, block_reduce<SumOp>)
//   log_softmax: out_v = round_O((z_v - mx) - log_f32(s))
//   softmax:     out_v = round_O(exp_f32(z_v - mx) / s)       (exp recomputed: the same bits)
//   row_mean:    out   = round_O(sum_v z_v / (float)V)         (sum: add_rn, block_reduce<SumOp>)
// exp_f32 is the CPU backend's polynomial, log_f32 this backend's own (row_common.cuh); both are
// plain _rn arithmetic, so device and simulator give the same bits. -inf logits give exp = +0 and
// log_softmax -inf; an all -inf row gives mx = -inf, z - mx = NaN: NaN outputs (as torch).
#pragma once

#include <cstdint>

#include "row_common.cuh"

namespace bi {
namespace cuda {

template <typename T, typename O>
struct RowSoftmaxArgs {
  const T* x;
  int64_t x_stride;
  O* out;
  int64_t out_stride;
  int64_t rows;
  int64_t cols;
};

inline int row_softmax_threads(int64_t cols) { return row_threads_for(cols); }

namespace detail {

// Calls f(c, n, z) for each chunk c of this thread (c = threadIdx.x, + THREADS, ...) in
// increasing order, with z[0..n) the chunk's values in fp32 (z[n..VEC) = 0).
template <typename T, int THREADS, typename F>
BI_DEV void for_each_chunk(const T* x, int64_t V, bool x_al, F&& f) {
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t nchunks = (V + VEC - 1) / VEC;
  for (int64_t c = int(threadIdx.x); c < nchunks; c += THREADS) {
    const int n = int(V - c * VEC < VEC ? V - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
    f(c, n, z);
  }
}

// The row's reduction (order: row_common.cuh): per thread acc = Op::apply(acc, g(z_v)) over its
// elements from `init`, then block_reduce<Op>. Every thread returns the same bits.
template <typename Op, typename T, int THREADS, typename G>
BI_DEV float row_fold(const T* x, int64_t V, bool x_al, float init, G g, float* scratch) {
  constexpr int VEC = Chunk<T>::VEC;
  float acc = init;
  for_each_chunk<T, THREADS>(x, V, x_al, [&](int64_t, int n, const float (&z)[VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) acc = Op::apply(acc, g(z[j]));
  });
  return block_reduce<Op, THREADS>(acc, scratch);
}

struct Identity {
  BI_DEV float operator()(float v) const { return v; }
};
struct ExpShifted {  // exp_f32(v - mx)
  float mx;
  BI_DEV float operator()(float v) const { return exp_f32(sub_rn(v, mx)); }
};

// log_softmax (LOG) / softmax of one row (block = THREADS threads; red_max / red_sum: the two
// reductions' shared-memory scratch).
template <bool LOG, typename T, typename O, int THREADS>
BI_DEV void softmax_row(const RowSoftmaxArgs<T, O>& a, float* red_max, float* red_sum) {
  const int64_t row = blockIdx.x;
  if (row >= a.rows) return;  // block-uniform
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t V = a.cols;
  const T* x = a.x + row * a.x_stride;
  O* out = a.out + row * a.out_stride;
  const bool x_al = aligned16(x), out_al = aligned16(out);

  const float mx = row_fold<MaxOp, T, THREADS>(x, V, x_al, uint_as_float(0xff800000u) /* -inf */, Identity{},
                                               red_max);
  const float s = row_fold<SumOp, T, THREADS>(x, V, x_al, 0.0f, ExpShifted{mx}, red_sum);
  const float lse = LOG ? log_f32(s) : 0.0f;
  for_each_chunk<T, THREADS>(x, V, x_al, [&](int64_t c, int n, float (&z)[VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = LOG ? sub_rn(sub_rn(z[j], mx), lse) : div_rn(exp_f32(sub_rn(z[j], mx)), s);
    store_chunk<VEC>(out, c, n, out_al, z);
  });
}

}  // namespace detail

template <typename T, typename O, int THREADS>
__global__ void __launch_bounds__(THREADS) log_softmax_kernel(RowSoftmaxArgs<T, O> a) {
  __shared__ float red_max[THREADS / kWarp];
  __shared__ float red_sum[THREADS / kWarp];
  detail::softmax_row<true, T, O, THREADS>(a, red_max, red_sum);
}

template <typename T, typename O, int THREADS>
__global__ void __launch_bounds__(THREADS) softmax_kernel(RowSoftmaxArgs<T, O> a) {
  __shared__ float red_max[THREADS / kWarp];
  __shared__ float red_sum[THREADS / kWarp];
  detail::softmax_row<false, T, O, THREADS>(a, red_max, red_sum);
}

template <typename T, typename O, int THREADS>
__global__ void __launch_bounds__(THREADS) row_mean_kernel(RowSoftmaxArgs<T, O> a) {
  __shared__ float red_sum[THREADS / kWarp];
  const int64_t row = blockIdx.x;
  if (row >= a.rows) return;  // block-uniform
  const T* x = a.x + row * a.x_stride;
  const float sum = detail::row_fold<SumOp, T, THREADS>(x, a.cols, aligned16(x), 0.0f, detail::Identity{}, red_sum);
  if (threadIdx.x == 0) a.out[row] = from_f32<O>(div_rn(sum, float(a.cols)));
}

}  // namespace cuda
}  // namespace bi
