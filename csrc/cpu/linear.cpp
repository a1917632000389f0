// Launchers of the batch-invariant CPU GEMM (linear, bmm_nt). The kernel bodies live in
// kernels/linear.h; the per-element reduction order is fixed there and does not depend on how the
// output is tiled here (tiles in M and N, thread count), so any tiling below is invariant.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"
#include "kernels/linear.h"
#include "launchers.h"

namespace bi {
namespace cpu {
namespace {

namespace lk = linear_kernel;

struct TilePlan {
  int64_t mb;       // rows of x per task
  int64_t nb;       // rows of w per task
  int64_t nb_rows;  // rows of w per cache block inside a task
};

// Tiling only (never affects the bits). Tasks are (N-block, M-block) pairs ordered N-major so
// that each thread keeps its weight block in its own L2 while the M-blocks pass over it.
template <typename T>
TilePlan plan_tiles(int64_t M, int64_t N, int64_t K, int64_t batches, Isa isa) {
  const int64_t elem_size = int64_t(sizeof(T));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_bytes = std::max<int64_t>(1, K * elem_size);
  // weight rows per L2 block (~384 KiB), multiple of 8
  int64_t nb_rows = std::max<int64_t>(8, (int64_t(384) * 1024 / row_bytes) / 8 * 8);
  TilePlan p;
  if (M <= 4) {
    // memory bound on the weight: split N only, ~4 tasks per thread for balance
    p.mb = M;
    int64_t tasks = std::max<int64_t>(1, (threads * 4 + batches - 1) / batches);
    p.nb = std::max<int64_t>(8, ((N + tasks - 1) / tasks + 7) / 8 * 8);
    p.nb_rows = p.nb;
    return p;
  }
  p.mb = std::min<int64_t>(M, 256);
  // K blocked (see linear_tile): a task's weight block is only needed 4 KiB per row at a time
  if (lk::use_k_blocking<T>(isa, std::min<int64_t>(M, 5), K)) nb_rows = 64;
  p.nb = nb_rows;
  // enough tasks for the threads
  while (p.nb > 8 && batches * ((M + p.mb - 1) / p.mb) * ((N + p.nb - 1) / p.nb) < 2 * threads)
    p.nb = std::max<int64_t>(8, (p.nb / 2) / 8 * 8);
  p.nb_rows = std::min(p.nb, nb_rows);
  return p;
}

template <typename T, typename OutT>
void run_linear(const T* x, int64_t ldx, int64_t sbx, const T* w, int64_t ldw, int64_t sbw,
                const float* bias, OutT* y, int64_t ldy, int64_t sby, int64_t B, int64_t M,
                int64_t N, int64_t K) {
  if (B == 0 || M == 0 || N == 0) return;
  const Isa isa = active_isa();
  const TilePlan p = plan_tiles<T>(M, N, K, B, isa);
  const int64_t tm = (M + p.mb - 1) / p.mb, tn = (N + p.nb - 1) / p.nb;
  const int64_t ntasks = B * tn * tm;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (tn * tm);
      const int64_t r = t % (tn * tm);
      const int64_t in = r / tm, im = r % tm;
      const int64_t m0 = im * p.mb, m1 = std::min(M, m0 + p.mb);
      const int64_t n0 = in * p.nb, n1 = std::min(N, n0 + p.nb);
      lk::linear_tile<T, OutT>(x + b * sbx, ldx, w + b * sbw, ldw, bias, y + b * sby, ldy, K, m0,
                               m1, n0, n1, p.nb_rows, isa);
    }
  });
}

void check_common(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "batch_invariant linear: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == dim, "batch_invariant linear: ", name, " must be ", dim,
              "-d, got shape ", t.sizes(), " (", t.scalar_type(), ")");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "batch_invariant linear: ",
              name, " must be float32, bfloat16 or float16, got ", st, " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.size(dim - 1) <= 1 || t.stride(dim - 1) == 1, "batch_invariant linear: ", name,
              " must have a contiguous last dim, got shape ", t.sizes(), " strides ", t.strides(),
              " (", st, ")");
}

template <typename T>
void dispatch_out(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y,
                  int64_t B, int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t sbx, int64_t ldw,
                  int64_t sbw) {
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  const int64_t ldy = N, sby = M * N;
  switch (y.scalar_type()) {
    case at::kFloat:
      run_linear<T, float>(xp, ldx, sbx, wp, ldw, sbw, bias, y.data_ptr<float>(), ldy, sby, B, M, N, K);
      break;
    case at::kBFloat16:
      run_linear<T, bf16_t>(xp, ldx, sbx, wp, ldw, sbw, bias,
                            reinterpret_cast<bf16_t*>(y.data_ptr()), ldy, sby, B, M, N, K);
      break;
    case at::kHalf:
      run_linear<T, fp16_t>(xp, ldx, sbx, wp, ldw, sbw, bias,
                            reinterpret_cast<fp16_t*>(y.data_ptr()), ldy, sby, B, M, N, K);
      break;
    default:
      TORCH_CHECK(false, "batch_invariant linear: unsupported out dtype ", y.scalar_type());
  }
}

void dispatch(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& y, int64_t B,
              int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t sbx, int64_t ldw, int64_t sbw) {
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_out<float>(x, w, bias, y, B, M, N, K, ldx, sbx, ldw, sbw); break;
    case at::kBFloat16: dispatch_out<bf16_t>(x, w, bias, y, B, M, N, K, ldx, sbx, ldw, sbw); break;
    case at::kHalf: dispatch_out<fp16_t>(x, w, bias, y, B, M, N, K, ldx, sbx, ldw, sbw); break;
    default: TORCH_CHECK(false, "batch_invariant linear: unsupported dtype ", x.scalar_type());
  }
}

void check_out_dtype(const at::Tensor& x, at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kFloat,
              "batch_invariant linear: out_dtype must be the input dtype (", x.scalar_type(),
              ") or float32, got ", out_dtype);
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  at::ScalarType out_dtype) {
  check_common(x, "x", 2);
  check_common(w, "weight", 2);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "batch_invariant linear: weight dtype ",
              w.scalar_type(), " (shape ", w.sizes(), ") must equal x dtype ", x.scalar_type(),
              " (shape ", x.sizes(), ")");
  TORCH_CHECK(x.size(1) == w.size(1), "batch_invariant linear: x ", x.sizes(), " (",
              x.scalar_type(), ") and weight ", w.sizes(), " (", w.scalar_type(),
              ") disagree on K");
  check_out_dtype(x, out_dtype);
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  at::Tensor bias_f32;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "batch_invariant linear: bias must be a CPU tensor");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "batch_invariant linear: bias must be [", N,
                "], got shape ", b.sizes(), " (", b.scalar_type(), ")");
    TORCH_CHECK(b.scalar_type() == w.scalar_type() || b.scalar_type() == at::kFloat,
                "batch_invariant linear: bias dtype ", b.scalar_type(), " (shape ", b.sizes(),
                ") must be the weight dtype ", w.scalar_type(), " or float32");
    bias_f32 = b.to(at::kFloat).contiguous();  // exact conversion
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_dtype));
  const int64_t ldx = M > 0 ? x.stride(0) : K, ldw = N > 0 ? w.stride(0) : K;
  dispatch(x, w, bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr, y, 1, M, N, K, ldx, 0,
           ldw, 0);
  return y;
}

at::Tensor bmm_nt(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType out_dtype) {
  check_common(a, "a", 3);
  check_common(b_t, "b_t", 3);
  TORCH_CHECK(a.scalar_type() == b_t.scalar_type(), "batch_invariant bmm_nt: b_t dtype ",
              b_t.scalar_type(), " (shape ", b_t.sizes(), ") must equal a dtype ", a.scalar_type(),
              " (shape ", a.sizes(), ")");
  TORCH_CHECK(a.size(0) == b_t.size(0) && a.size(2) == b_t.size(2), "batch_invariant bmm_nt: a ",
              a.sizes(), " (", a.scalar_type(), ") and b_t ", b_t.sizes(), " (", b_t.scalar_type(),
              ") disagree on B or K");
  check_out_dtype(a, out_dtype);
  const int64_t B = a.size(0), M = a.size(1), N = b_t.size(1), K = a.size(2);
  at::Tensor y = at::empty({B, M, N}, a.options().dtype(out_dtype));
  dispatch(a, b_t, nullptr, y, B, M, N, K, a.stride(1), a.stride(0), b_t.stride(1), b_t.stride(0));
  return y;
}

}  // namespace cpu
}  // namespace bi
