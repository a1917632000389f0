// Launchers of the CUDA row kernels: rms_norm, fused_add_rms_norm (kernels/rms_norm.cuh) and
// log_softmax, softmax, row_mean (kernels/row_softmax.cuh). One block per row (grid = rows), the
// block size a function of the row length only (never of the row count), the current CUDA stream
// of the inputs' device. Contracts and returns: launchers.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "kernels/rms_norm.cuh"
#include "kernels/row_softmax.cuh"
#include "launch_utils.h"
#include "launchers.h"

namespace bi {
namespace cuda {
namespace {

using launch::Tag;
using launch::ptr;

void check_weight(const at::Tensor& w, const at::Tensor& x, const char* op) {
  launch::check_cuda(w, op, "weight");
  launch::check_same_device(w, "weight", x, "x", op);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), op, ": weight must be 1-d [H] with H = ",
              x.size(1), " (x: ", launch::describe(x), "), got ", launch::describe(w));
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, op,
              ": weight dtype must be x's dtype (", x.scalar_type(), ") or float32, got ",
              launch::describe(w));
  TORCH_CHECK(w.size(0) <= 1 || w.stride(0) == 1, op, ": weight must be contiguous, got strides ",
              w.strides(), ", ", launch::describe(w));
}

void check_hidden(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.size(1) <= int64_t(std::numeric_limits<int>::max()), op,
              ": the hidden size must fit in int, got ", launch::describe(x));
}

// out = rms_norm(z) with z = x, or z = round(x + residual) written to residual_out.
void launch_rms_norm(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                     const at::Tensor& out, const at::Tensor* residual_out, double eps, const char* op) {
  const int64_t rows = x.size(0);
  const int hidden = int(x.size(1));
  const unsigned grid = launch::grid_for_rows(rows, op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  const int threads = rms_norm_threads(hidden);
  launch::dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto run = [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      RmsNormArgs<T, W> a{};
      a.x = ptr<const T>(x);
      a.x_stride = x.stride(0);
      a.residual = residual ? ptr<const T>(*residual) : nullptr;
      a.residual_stride = residual ? residual->stride(0) : 0;
      a.residual_out = residual_out ? ptr<T>(*residual_out) : nullptr;
      a.residual_out_stride = residual_out ? residual_out->stride(0) : 0;
      a.weight = ptr<const W>(weight);
      a.out = ptr<T>(out);
      a.out_stride = out.stride(0);
      a.rows = rows;
      a.hidden = hidden;
      a.eps = float(eps);
      dispatch_threads(threads, [&](auto nt) {
        constexpr int kThreads = decltype(nt)::value;
        rms_norm_kernel<T, W, kThreads><<<grid, kThreads, 0, stream>>>(a);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (weight.scalar_type() == at::kFloat) run(Tag<float>{});
    else run(Tag<T>{});
  });
}

enum class RowOp { kLogSoftmax, kSoftmax, kMean };

const char* row_op_name(RowOp kind) {
  switch (kind) {
    case RowOp::kLogSoftmax: return "log_softmax";
    case RowOp::kSoftmax: return "softmax";
    default: return "row_mean";
  }
}

at::Tensor row_op(const at::Tensor& x, at::ScalarType out_dtype, RowOp kind) {
  const char* op = row_op_name(kind);
  launch::check_rows(x, op, "x", "[T, V]");
  launch::check_out_dtype(out_dtype, x, op);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto opts = x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = kind == RowOp::kMean ? at::empty({rows}, opts) : at::empty({rows, cols}, opts);
  if (rows == 0) return out;
  if (cols == 0) {
    if (kind == RowOp::kMean) out.fill_(std::numeric_limits<double>::quiet_NaN());  // 0 / 0
    return out;
  }
  const unsigned grid = launch::grid_for_rows(rows, op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  const int threads = row_softmax_threads(cols);
  launch::dispatch_in_out(x.scalar_type(), out_dtype, op, [&](auto itag, auto otag) {
    using I = typename decltype(itag)::type;
    using O = typename decltype(otag)::type;
    RowSoftmaxArgs<I, O> a{};
    a.x = ptr<const I>(x);
    a.x_stride = x.stride(0);
    a.out = ptr<O>(out);
    a.out_stride = kind == RowOp::kMean ? 1 : out.stride(0);
    a.rows = rows;
    a.cols = cols;
    dispatch_threads(threads, [&](auto nt) {
      constexpr int kThreads = decltype(nt)::value;
      switch (kind) {
        case RowOp::kLogSoftmax: log_softmax_kernel<I, O, kThreads><<<grid, kThreads, 0, stream>>>(a); break;
        case RowOp::kSoftmax: softmax_kernel<I, O, kThreads><<<grid, kThreads, 0, stream>>>(a); break;
        case RowOp::kMean: row_mean_kernel<I, O, kThreads><<<grid, kThreads, 0, stream>>>(a); break;
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  launch::check_rows(x, op, "x", "[T, H]");
  check_weight(weight, x, op);
  check_hidden(x, op);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({rows, hidden}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0 || hidden == 0) return out;
  launch_rms_norm(x, nullptr, weight, out, nullptr, eps, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  constexpr const char* op = "fused_add_rms_norm";
  launch::check_rows(x, op, "x", "[T, H]");
  launch::check_rows(residual, op, "residual", "[T, H]");
  launch::check_same_device(residual, "residual", x, "x", op);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(), op,
              ": residual must match x in shape and dtype, got x: ", launch::describe(x),
              "; residual: ", launch::describe(residual));
  check_weight(weight, x, op);
  check_hidden(x, op);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t rows = x.size(0), hidden = x.size(1);
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({rows, hidden}, opts);
  at::Tensor residual_out = at::empty({rows, hidden}, opts);
  if (rows == 0 || hidden == 0) return {out, residual_out};
  launch_rms_norm(x, &residual, weight, out, &residual_out, eps, op);
  return {out, residual_out};
}

at::Tensor log_softmax(const at::Tensor& x, at::ScalarType out_dtype) {
  return row_op(x, out_dtype, RowOp::kLogSoftmax);
}

at::Tensor softmax(const at::Tensor& x, at::ScalarType out_dtype) {
  return row_op(x, out_dtype, RowOp::kSoftmax);
}

at::Tensor row_mean(const at::Tensor& x, at::ScalarType out_dtype) {
  return row_op(x, out_dtype, RowOp::kMean);
}

}  // namespace cuda
}  // namespace bi
