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
  m.def("selftest", [](const char* name, int threads) { return run_selftest(name, threads); });
  m.def("math_f32", [](int which, uintptr_t in, uintptr_t out, int64_t n) {
    math_f32(which, reinterpret_cast<const float*>(in), reinterpret_cast<float*>(out), n);
  });
}
