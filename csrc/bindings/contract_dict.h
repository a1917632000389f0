// contract_constants() of both extension modules: every constant of the generated contract header
// (BI_CONTRACT_FOR_EACH, from contract.py), so tests can compare what each build was compiled with.
#pragma once
#include <torch/extension.h>

#include "../generated/bi_contract.h"

namespace bi {

inline pybind11::dict contract_constants() {
  pybind11::dict d;
#define BI_REPORT(name) d[#name] = bi::contract::name;
  BI_CONTRACT_FOR_EACH(BI_REPORT)
#undef BI_REPORT
  return d;
}

}  // namespace bi
