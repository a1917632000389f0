// Python binding of the CUDA backend (module batch_invariant._cuda). Plain pybind11 functions, as
// in cpu_module.cpp: the torch.library schemas are declared once, in python/batch_invariant/ops/,
// whose CUDA implementations call these (registered by ops/<op>.py: _register_cuda()).
//
// Importing this module needs no GPU (it links the CUDA runtime through torch); calling a kernel
// needs CUDA tensors, and the launchers reject anything else with a message naming the tensor.
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <string>

#include "../cuda/launchers.h"
#include "contract_dict.h"

#ifndef BI_CUDA_ARCHS
#define BI_CUDA_ARCHS "unknown"
#endif

using namespace pybind11::literals;
namespace {

// How this module was built: the CUDA targets (BATCH_INVARIANT_CUDA_ARCHS) and the CUDA runtime
// version it was compiled against. Touches no device.
pybind11::dict build_info() {
  pybind11::dict d;
  d["cuda_archs"] = std::string(BI_CUDA_ARCHS);
  d["cuda_runtime_version"] = int(CUDART_VERSION);
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  namespace cuda = bi::cuda;
  m.doc() = "batch_invariant CUDA kernels (fixed reduction order, batch-invariant)";
  m.def("contract_constants", &bi::contract_constants, "contract values this build was compiled with");
  m.def("build_info", &build_info, "CUDA targets and runtime version this build was compiled for");

  m.def("rms_norm", &cuda::rms_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("fused_add_rms_norm", &cuda::fused_add_rms_norm, "x"_a, "residual"_a, "weight"_a, "eps"_a);
  m.def("log_softmax", &cuda::log_softmax, "x"_a, "out_dtype"_a);
  m.def("softmax", &cuda::softmax, "x"_a, "out_dtype"_a);
  m.def("row_mean", &cuda::row_mean, "x"_a, "out_dtype"_a);
  m.def("linear", &cuda::linear, "x"_a, "weight"_a, "bias"_a, "out_dtype"_a);
  m.def("bmm_nt", &cuda::bmm_nt, "a"_a, "b_t"_a, "out_dtype"_a);
  m.def("linear_block_k", &cuda::linear_block_k, "dtype"_a,
        "BLOCK_K compiled into kernels/linear.cuh (contract.GPU_MATMUL_BLOCK_K)");
  m.def("attention", &cuda::attention, "q"_a, "key_cache"_a, "value_cache"_a, "query_start_loc"_a, "seq_lens"_a,
        "block_table"_a, "scale"_a);
  m.def("attention_with_lse", &cuda::attention_with_lse, "q"_a, "key_cache"_a, "value_cache"_a,
        "query_start_loc"_a, "seq_lens"_a, "block_table"_a, "scale"_a);
}
