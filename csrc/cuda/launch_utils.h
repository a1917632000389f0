// Helpers shared by the CUDA launchers (csrc/cuda/launch_*.cu only; never by kernel headers):
// input checks whose messages name the op, the tensor, its shape, dtype and device; the dtype
// dispatch onto the CUDA element types; the row-grid size check.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <sstream>
#include <string>

namespace bi {
namespace cuda {
namespace launch {

template <typename T> struct Tag { using type = T; };

// The launch callback the shared host plans (linear_run, attention_run) call for each kernel: a
// kernel asking for more than 48 KiB of dynamic shared memory is opted in first; launched on
// `stream`, then the launch error checked.
inline auto stream_launcher(cudaStream_t stream) {
  return [stream](dim3 grid, dim3 block, size_t smem, auto kernel, const auto& args) {
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, block, smem, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
}

// "shape [2, 4], dtype BFloat16, device cuda:0"
inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

// A CUDA tensor (a CPU tensor here is the usual mistake, and the only one possible without a GPU).
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", describe(t),
              " (the cuda backend runs on CUDA tensors only)");
}

// `t` lives on the device of `ref` (both already known to be CUDA tensors).
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " and ", ref_name,
              " must be on the same device, got ", name, ": ", describe(t), "; ", ref_name, ": ",
              describe(ref));
}

// A 2-d float tensor [rows, cols] on CUDA with a contiguous inner dim.
inline void check_rows(const at::Tensor& t, const char* op, const char* name, const char* dims) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-d ", dims, ", got ", describe(t));
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", describe(t));
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have a contiguous last dim, got strides ", t.strides(), ", ", describe(t));
}

// out_dtype of the row ops: the input dtype or float32.
inline void check_out_dtype(at::ScalarType out_dtype, const at::Tensor& x, const char* op) {
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kFloat, op,
              ": out_dtype must be x's dtype (", x.scalar_type(), ") or float32, got ", out_dtype,
              " (x: ", describe(x), ")");
}

// One block per row: gridDim.x is at most 2^31 - 1.
inline unsigned grid_for_rows(int64_t rows, const char* op) {
  TORCH_CHECK(rows >= 0 && rows <= int64_t(INT_MAX), op, ": ", rows,
              " rows exceed the grid limit of the one-block-per-row launch (", INT_MAX, ")");
  return unsigned(rows);
}

// Calls f(Tag<E>{}) with E = float, __nv_bfloat16 or __half for the tensor dtype `st`.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", st, " (bfloat16, float16, float32)");
  }
}

// Calls f(Tag<In>{}, Tag<Out>{}) for the input dtype and `out` (the input dtype or float32).
template <typename F>
void dispatch_in_out(at::ScalarType in, at::ScalarType out, const char* op, F&& f) {
  dispatch_float(in, op, [&](auto itag) {
    using I = typename decltype(itag)::type;
    if (out == at::kFloat) f(itag, Tag<float>{});
    else f(itag, Tag<I>{});
  });
}

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace launch
}  // namespace cuda
}  // namespace bi
