// Run-time choice of the kernels' ISA.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace rlhf_fast {
namespace {

const KernelTable* table_for(const char* isa) {
  if (std::strcmp(isa, "avx512") == 0) return &avx512::kernel_table();
  if (std::strcmp(isa, "avx2") == 0) return &avx2::kernel_table();
  if (std::strcmp(isa, "scalar") == 0) return &scalar::kernel_table();
  return nullptr;
}

const KernelTable* best_table() {
  const char* forced = std::getenv("RLHF_FAST_CPU_ISA");
  if (forced != nullptr && cpu_supports(forced)) return table_for(forced);
  if (cpu_supports("avx512")) return table_for("avx512");
  if (cpu_supports("avx2")) return table_for("avx2");
  return table_for("scalar");
}

const KernelTable* g_active = nullptr;

}  // namespace

bool cpu_supports(const char* isa) {
  __builtin_cpu_init();
  if (std::strcmp(isa, "scalar") == 0) return true;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (std::strcmp(isa, "avx2") == 0) return avx2;
  if (std::strcmp(isa, "avx512") == 0)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return false;
}

const KernelTable& active_kernels() {
  if (g_active == nullptr) g_active = best_table();
  return *g_active;
}

bool set_active_isa(const char* isa) {
  if (!cpu_supports(isa)) return false;
  g_active = table_for(isa);
  return g_active != nullptr;
}

}  // namespace rlhf_fast
