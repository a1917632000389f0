// ISA detection for the CPU kernels. The ISA path is part of bi.provenance(): bits may differ
// between paths (e.g. bf16 pair products via vdpbf16ps vs the portable emulation), never within one.
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace bi {
namespace cpu {

Isa detected_isa() {
  static const Isa isa = [] {
#if BI_X86
    __builtin_cpu_init();
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::kAvx512Bf16;
    if (avx512) return Isa::kAvx512;
#endif
    return Isa::kPortable;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    default: return "portable";
  }
}

Isa active_isa() {
  // Read on every call (cheap) so a test can switch paths within one process.
  const char* env = std::getenv("BATCH_INVARIANT_CPU_ISA");
  Isa best = detected_isa();
  if (env == nullptr || env[0] == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "portable") == 0) want = Isa::kPortable;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else if (std::strcmp(env, "avx512_bf16") == 0) want = Isa::kAvx512Bf16;
  return int(want) < int(best) ? want : best;
}

}  // namespace cpu
}  // namespace bi
