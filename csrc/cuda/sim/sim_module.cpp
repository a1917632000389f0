// pybind11 module of the CPU SIMT simulator (built by python/batch_invariant/cuda_sim.py, test
// side only; no torch headers: tensors travel as data pointers, see cuda_sim.py).
#include <pybind11/pybind11.h>

#include "sim.h"
#include "sim_ops.h"

namespace py = pybind11;
using namespace bi::cuda::sim;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernel bodies (csrc/cuda/kernels) run on the CPU SIMT simulator (csrc/cuda/sim)";
  m.def(
      "rms_norm",
      [](uintptr_t x, int64_t xs, uintptr_t res, int64_t rs, uintptr_t res_out, int64_t ros, uintptr_t w,
         uintptr_t out, int64_t os, int64_t rows, int hidden, float eps, int dtype, int wdtype, int threads) {
        RmsNormCall c{x, xs, res, rs, res_out, ros, w, out, os, rows, hidden, eps, dtype, wdtype, threads};
        py::gil_scoped_release nogil;
        return launch_rms_norm(c);
      },
      "rms_norm / fused_add_rms_norm (residual != 0) on raw pointers; returns the block size used");
  m.def(
      "row_op",
      [](int op, uintptr_t x, int64_t xs, uintptr_t out, int64_t os, int64_t rows, int64_t cols, int dtype,
         int odtype, int threads) {
        RowOpCall c{op, x, xs, out, os, rows, cols, dtype, odtype, threads};
        py::gil_scoped_release nogil;
        return launch_row_op(c);
      },
      "log_softmax (0) / softmax (1) / row mean (2) on raw pointers; returns the block size used");
  m.def(
      "attention",
      [](uintptr_t q, int64_t q_st, int64_t q_sh, uintptr_t kc, int64_t kc_sb, int64_t kc_ss, int64_t kc_sh,
         uintptr_t vc, int64_t vc_sb, int64_t vc_ss, int64_t vc_sh, uintptr_t qsl, uintptr_t seq_lens, uintptr_t bt,
         int64_t bt_s, int64_t T, int B, int Hq, int Hk, int D, int block_size, float scale, int dtype, int split,
         uintptr_t out, uintptr_t lse, int path, int64_t bt_cols) {
        AttentionCall c{q, q_st, q_sh, kc, kc_sb, kc_ss, kc_sh, vc, vc_sb, vc_ss, vc_sh, qsl, seq_lens, bt, bt_s,
                        T, B, Hq, Hk, D, block_size, scale, dtype, split, out, lse, path, bt_cols};
        py::gil_scoped_release nogil;
        return launch_attention(c);
      },
      "paged attention forward on raw pointers (out contiguous [T, Hq, D]; lse 0 or fp32 [T, Hq]); path: 0 auto, "
      "1 sequential, 2 split-parallel; returns the path run");
  m.def("attention_uses_mma", &attention_uses_mma_kernels,
        "1 when attention of this dtype code and head size runs the tensor-core kernels, 0 for SIMT");
  m.def("rms_norm_threads", &rms_norm_block, "block size of rms_norm_kernel for a hidden size");
  m.def("row_softmax_threads", &row_op_block, "block size of the softmax-family kernels for a row length");
  m.def("set_schedule", [](int s) { set_schedule(s ? kReverse : kForward); },
        "0: fibers run in thread order, 1: in reverse order");
  m.def("schedule", []() { return int(schedule()); });
  m.def("last_launch_stats", []() {
    LaunchStats s = last_launch_stats();
    py::dict d;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    d["switches"] = s.switches;
    return d;
  });
  m.def(
      "linear",
      [](uintptr_t x, int64_t xs, int64_t xbs, uintptr_t w, int64_t ws, int64_t wbs, uintptr_t bias, uintptr_t out,
         int64_t os, int64_t obs, int64_t batches, int64_t M, int64_t N, int64_t K, int dtype, int odtype, int path,
         int sm_count) {
        LinearCall c{x, xs, xbs, w, ws, wbs, bias, out, os, obs, batches, M, N, K, dtype, odtype, path, sm_count};
        py::gil_scoped_release nogil;
        return launch_linear(c);
      },
      "linear / bmm_nt on raw pointers (bias: fp32 or 0); path: 0 auto, 1 fused, 2 split-parallel, -1 from "
      "BATCH_INVARIANT_CUDA_LINEAR_PATH; returns the path run");
  m.def("linear_k_chunk", &linear_k_chunk, "contract GPU_MATMUL_K_CHUNK compiled into linear.cuh");
  m.def(
      "linear_plan",
      [](int dtype, int path, int64_t batches, int64_t M, int64_t N, int64_t K, int sm_count) {
        const LinearPlanInfo p = linear_plan_info(dtype, path, batches, M, N, K, sm_count);
        py::dict d;
        d["path"] = p.path;
        d["m_tiles"] = p.m_tiles;
        d["n_tiles"] = p.n_tiles;
        d["chunks"] = p.chunks;
        d["ws_floats"] = p.ws_floats;
        d["combine_blocks"] = p.combine_blocks;
        d["error"] = p.error;
        return d;
      },
      "the device launcher's plan (kernels/linear_plan.cuh linear_plan) for a dtype code and shapes");
  m.def("linear_block_k", &linear_block_k, "contract GPU_MATMUL_BLOCK_K compiled into linear.cuh (dtype code)");
  m.def("linear_block_m", &linear_block_m);
  m.def("linear_block_n", &linear_block_n);
  m.def("selftest", [](const char* name, int threads) { return run_selftest(name, threads); });
  m.def("math_f32", [](int which, uintptr_t in, uintptr_t out, int64_t n) {
    math_f32(which, reinterpret_cast<const float*>(in), reinterpret_cast<float*>(out), n);
  });
}
