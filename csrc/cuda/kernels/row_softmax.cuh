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

template <typename T, int THREADS>
BI_DEV float row_max(const T* x, int64_t V, bool x_al, float* scratch) {
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t nchunks = (V + VEC - 1) / VEC;
  float acc = uint_as_float(0xff800000u);  // -inf
  for (int64_t c = int(threadIdx.x); c < nchunks; c += THREADS) {
    const int n = int(V - c * VEC < VEC ? V - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) acc = MaxOp::apply(acc, z[j]);
  }
  return block_reduce<MaxOp, THREADS>(acc, scratch);
}

template <typename T, int THREADS>
BI_DEV float row_sumexp(const T* x, int64_t V, bool x_al, float mx, float* scratch) {
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t nchunks = (V + VEC - 1) / VEC;
  float acc = 0.0f;
  for (int64_t c = int(threadIdx.x); c < nchunks; c += THREADS) {
    const int n = int(V - c * VEC < VEC ? V - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) acc = add_rn(acc, exp_f32(sub_rn(z[j], mx)));
  }
  return block_reduce<SumOp, THREADS>(acc, scratch);
}

}  // namespace detail

template <typename T, typename O, int THREADS>
__global__ void __launch_bounds__(THREADS) log_softmax_kernel(RowSoftmaxArgs<T, O> a) {
  __shared__ float red_max[THREADS / kWarp];
  __shared__ float red_sum[THREADS / kWarp];
  const int64_t row = blockIdx.x;
  if (row >= a.rows) return;  // block-uniform
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t V = a.cols;
  const int64_t nchunks = (V + VEC - 1) / VEC;
  const T* x = a.x + row * a.x_stride;
  O* out = a.out + row * a.out_stride;
  const bool x_al = aligned16(x), out_al = aligned16(out);

  const float mx = detail::row_max<T, THREADS>(x, V, x_al, red_max);
  const float lse = log_f32(detail::row_sumexp<T, THREADS>(x, V, x_al, mx, red_sum));
  for (int64_t c = int(threadIdx.x); c < nchunks; c += THREADS) {
    const int n = int(V - c * VEC < VEC ? V - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = sub_rn(sub_rn(z[j], mx), lse);
    store_chunk<VEC>(out, c, n, out_al, z);
  }
}

template <typename T, typename O, int THREADS>
__global__ void __launch_bounds__(THREADS) softmax_kernel(RowSoftmaxArgs<T, O> a) {
  __shared__ float red_max[THREADS / kWarp];
  __shared__ float red_sum[THREADS / kWarp];
  const int64_t row = blockIdx.x;
  if (row >= a.rows) return;  // block-uniform
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t V = a.cols;
  const int64_t nchunks = (V + VEC - 1) / VEC;
  const T* x = a.x + row * a.x_stride;
  O* out = a.out + row * a.out_stride;
  const bool x_al = aligned16(x), out_al = aligned16(out);

  const float mx = detail::row_max<T, THREADS>(x, V, x_al, red_max);
  const float s = detail::row_sumexp<T, THREADS>(x, V, x_al, mx, red_sum);
  for (int64_t c = int(threadIdx.x); c < nchunks; c += THREADS) {
    const int n = int(V - c * VEC < VEC ? V - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = div_rn(exp_f32(sub_rn(z[j], mx)), s);
    store_chunk<VEC>(out, c, n, out_al, z);
  }
}

template <typename T, typename O, int THREADS>
__global__ void __launch_bounds__(THREADS) row_mean_kernel(RowSoftmaxArgs<T, O> a) {
  __shared__ float red_sum[THREADS / kWarp];
  const int64_t row = blockIdx.x;
  if (row >= a.rows) return;  // block-uniform
  constexpr int VEC = Chunk<T>::VEC;
  const int64_t V = a.cols;
  const int64_t nchunks = (V + VEC - 1) / VEC;
  const T* x = a.x + row * a.x_stride;
  const bool x_al = aligned16(x);
  float acc = 0.0f;
  for (int64_t c = int(threadIdx.x); c < nchunks; c += THREADS) {
    const int n = int(V - c * VEC < VEC ? V - c * VEC : VEC);
    float z[VEC];
    load_chunk<VEC>(x, c, n, x_al, z);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) acc = add_rn(acc, z[j]);
  }
  const float sum = block_reduce<SumOp, THREADS>(acc, red_sum);
  if (threadIdx.x == 0) a.out[row] = from_f32<O>(div_rn(sum, float(V)));
}

}  // namespace cuda
}  // namespace bi
