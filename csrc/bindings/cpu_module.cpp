// Python binding of the CPU backend (module batch_invariant._cpu). Plain pybind11 functions:
// the torch.library schemas are declared once, in python/batch_invariant/ops/, whose CPU
// implementations call these.
#include <torch/extension.h>

#include "../cpu/common.h"
#include "../cpu/launchers.h"
#include "contract_dict.h"

using namespace pybind11::literals;

PYBIND11_MODULE(_cpu, m) {
  namespace cpu = bi::cpu;
  m.doc() = "batch_invariant CPU kernels (fixed reduction order, batch-invariant)";
  m.def("contract_constants", &bi::contract_constants, "contract values this build was compiled with");
  m.def("detected_isa", [] { return std::string(cpu::isa_name(cpu::detected_isa())); });
  m.def("active_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); });

  m.def("linear", &cpu::linear, "x"_a, "weight"_a, "bias"_a, "out_dtype"_a);
  m.def("bmm_nt", &cpu::bmm_nt, "a"_a, "b_t"_a, "out_dtype"_a);
  m.def("rms_norm", &cpu::rms_norm, "x"_a, "weight"_a, "eps"_a);
  m.def("fused_add_rms_norm", &cpu::fused_add_rms_norm, "x"_a, "residual"_a, "weight"_a, "eps"_a);
  m.def("silu_and_mul", &cpu::silu_and_mul, "x"_a);
  m.def("log_softmax", &cpu::log_softmax, "x"_a, "out_dtype"_a);
  m.def("softmax", &cpu::softmax, "x"_a, "out_dtype"_a);
  m.def("row_mean", &cpu::row_mean, "x"_a, "out_dtype"_a);
  m.def("top_k_top_p_mask", &cpu::top_k_top_p_mask, "logits"_a, "top_k"_a, "top_p"_a);
  m.def("rotary_embedding", &cpu::rotary_embedding, "positions"_a, "q"_a, "k"_a, "head_size"_a,
        "cos_sin_cache"_a, "is_neox"_a);
  m.def("write_kv_cache", &cpu::write_kv_cache, "key"_a, "value"_a, "key_cache"_a, "value_cache"_a,
        "slot_mapping"_a);
  m.def("attention", &cpu::attention, "q"_a, "key_cache"_a, "value_cache"_a, "query_start_loc"_a,
        "seq_lens"_a, "block_table"_a, "scale"_a);
  m.def("attention_with_lse", &cpu::attention_with_lse, "q"_a, "key_cache"_a, "value_cache"_a,
        "query_start_loc"_a, "seq_lens"_a, "block_table"_a, "scale"_a);
  m.def("attention_backward", &cpu::attention_backward, "grad_out"_a, "q"_a, "key_cache"_a, "value_cache"_a,
        "out"_a, "lse"_a, "query_start_loc"_a, "seq_lens"_a, "block_table"_a, "scale"_a);
}
