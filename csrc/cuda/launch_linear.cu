// Launchers of the CUDA GEMM: linear and bmm_nt (kernels/linear.cuh). One tile configuration per
// dtype (bf16 / fp16: mma.sync 128 x 128 x 64, 256 threads, 3-stage cp.async pipeline in dynamic
// shared memory; fp32: SIMT fma 64 x 64 x 32), never chosen by M or N; the current CUDA stream of
// the inputs' device. K is summed in contract chunks (GPU_MATMUL_K_CHUNK) realised in one of two
// ways with the same bits (kernels/linear.cuh): fused (grid x = M tiles, y = N tiles, z = batches
// in slices of 65535) or, when K has several chunks and the output tiles x batches are fewer than
// the device's SMs, split-parallel (grid x = M tiles x chunks writing fp32 chunk sums to a torch
// workspace on the same stream, then the ordered combine kernel). linear_plan (kernels/
// linear_plan.cuh) decides from the shapes and the SM count; BATCH_INVARIANT_CUDA_LINEAR_PATH=
// auto|fused|split overrides it (tests, benchmarks). The checks / returns mirror
// csrc/cpu/linear.cpp (launchers.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>
#include <optional>
#include <string>

#include "kernels/linear_plan.cuh"
#include "launch_utils.h"
#include "launchers.h"

namespace bi {
namespace cuda {
namespace {

using launch::Tag;
using launch::ptr;

// A float CUDA tensor of `dim` dims with a contiguous last dim (any other strides).
void check_operand(const at::Tensor& t, const char* op, const char* name, int64_t dim, const char* dims) {
  launch::check_cuda(t, op, name);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-d ", dims, ", got ", launch::describe(t));
  TORCH_CHECK(launch::is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", launch::describe(t));
  TORCH_CHECK(t.size(dim - 1) <= 1 || t.stride(dim - 1) == 1, op, ": ", name,
              " must have a contiguous last dim, got strides ", t.strides(), ", ", launch::describe(t));
}

void check_sizes(int64_t M, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX, op, ": M = ", M, ", N = ", N, ", K = ", K,
              " must each fit in int");
}

// The path BATCH_INVARIANT_CUDA_LINEAR_PATH asks for (unset: auto); a bad value is an error. Read
// at every call (a getenv, no device work), as the attention launcher's path knob.
int linear_path_override(const char* op) {
  std::string error;
  const int path = linear_path_from_env(&error);
  TORCH_CHECK(path >= 0, op, ": ", error);
  return path;
}

// out[b] = x[b] @ w[b]^T (+ bias) for b < B; out contiguous [B, M, N]. x_name / w_name: the
// operands' names in the op's messages.
void run_gemm(const at::Tensor& x, int64_t x_stride, int64_t x_bstride, const at::Tensor& w, int64_t w_stride,
              int64_t w_bstride, const float* bias, const at::Tensor& out, int64_t B, int64_t M, int64_t N,
              int64_t K, const char* op, const char* x_name, const char* w_name) {
  const int path = linear_path_override(op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  launch::dispatch_in_out(x.scalar_type(), out.scalar_type(), op, [&](auto itag, auto otag) {
    using T = typename decltype(itag)::type;
    using O = typename decltype(otag)::type;
    LinearArgs<T, O> a{};
    a.x = ptr<const T>(x);
    a.x_stride = x_stride;
    a.x_batch_stride = x_bstride;
    a.w = ptr<const T>(w);
    a.w_stride = w_stride;
    a.w_batch_stride = w_bstride;
    a.bias = bias;
    a.out = ptr<O>(out);
    a.out_stride = N;
    a.out_batch_stride = M * N;
    a.M = int(M);
    a.N = int(N);
    a.K = int(K);
    const LinearPlan plan = linear_plan<T>(path, B, M, N, K, sm_count);
    TORCH_CHECK(plan.error.empty(), op, ": ", plan.error, " (", x_name, ": ", launch::describe(x), "; ", w_name,
                ": ", launch::describe(w), ")");
    const bool vec = linear_vec_ok<T>(a.x, x_stride, x_bstride, a.w, w_stride, w_bstride, B, a.K);
    // fp32 chunk sums of the split path: a torch allocation on the launch's stream (caching
    // allocator: freed when `ws` goes out of scope, reused only after the stream's kernels).
    at::Tensor ws;
    if (plan.ws_floats > 0) ws = at::empty({plan.ws_floats}, x.options().dtype(at::kFloat));
    linear_run(plan, a, B, vec, ws.defined() ? ws.data_ptr<float>() : nullptr, launch::stream_launcher(stream));
  });
}

void check_out_dtype(at::ScalarType out_dtype, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kFloat, op, ": out_dtype must be ", name,
              "'s dtype (", x.scalar_type(), ") or float32, got ", out_dtype, " (", name, ": ",
              launch::describe(x), ")");
}

}  // namespace

int linear_block_k(at::ScalarType dtype) {
  int v = 0;
  launch::dispatch_float(dtype, "linear_block_k", [&](auto tag) { v = LinearTile<typename decltype(tag)::type>::BK; });
  return v;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::ScalarType out_dtype) {
  constexpr const char* op = "linear";
  check_operand(x, op, "x", 2, "[M, K]");
  check_operand(weight, op, "weight", 2, "[N, K]");
  launch::check_same_device(weight, "weight", x, "x", op);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x's, got x: ",
              launch::describe(x), "; weight: ", launch::describe(weight));
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x [M, K] and weight [N, K] disagree on K, got x: ",
              launch::describe(x), "; weight: ", launch::describe(weight));
  check_out_dtype(out_dtype, x, op, "x");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  check_sizes(M, N, K, op);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor bias_f32;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    launch::check_cuda(b, op, "bias");
    launch::check_same_device(b, "bias", x, "x", op);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, op, ": bias must be 1-d [N] with N = ", N, " (weight: ",
                launch::describe(weight), "), got ", launch::describe(b));
    TORCH_CHECK(b.scalar_type() == weight.scalar_type() || b.scalar_type() == at::kFloat, op,
                ": bias dtype must be the weight dtype (", weight.scalar_type(), ") or float32, got ",
                launch::describe(b));
    bias_f32 = b.to(at::kFloat).contiguous();  // exact conversion
  }
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return out;
  const int64_t ldx = x.stride(0), ldw = weight.stride(0);
  run_gemm(x, ldx, 0, weight, ldw, 0, bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr, out, 1, M, N,
           K, op, "x", "weight");
  return out;
}

at::Tensor bmm_nt(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType out_dtype) {
  constexpr const char* op = "bmm_nt";
  check_operand(a, op, "a", 3, "[B, M, K]");
  check_operand(b_t, op, "b_t", 3, "[B, N, K]");
  launch::check_same_device(b_t, "b_t", a, "a", op);
  TORCH_CHECK(b_t.scalar_type() == a.scalar_type(), op, ": b_t dtype must equal a's, got a: ", launch::describe(a),
              "; b_t: ", launch::describe(b_t));
  TORCH_CHECK(a.size(0) == b_t.size(0) && a.size(2) == b_t.size(2), op,
              ": a [B, M, K] and b_t [B, N, K] disagree on B or K, got a: ", launch::describe(a), "; b_t: ",
              launch::describe(b_t));
  check_out_dtype(out_dtype, a, op, "a");
  const int64_t B = a.size(0), M = a.size(1), N = b_t.size(1), K = a.size(2);
  check_sizes(M, N, K, op);
  const at::cuda::OptionalCUDAGuard guard(a.device());
  at::Tensor out =
      at::empty({B, M, N}, a.options().dtype(out_dtype).memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || M == 0 || N == 0) return out;
  run_gemm(a, a.stride(1), a.stride(0), b_t, b_t.stride(1), b_t.stride(0), nullptr, out, B, M, N, K, op, "a", "b_t");
  return out;
}

}  // namespace cuda
}  // namespace bi
