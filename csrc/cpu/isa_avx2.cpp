// AVX2 + FMA + F16C kernels (8 fp32 lanes). Only called after a run-time CPU check.
#pragma GCC target("avx2,fma,f16c")
#define RLHF_ISA_AVX2
#define RLHF_ISA_NS avx2
#include "cpu/kernel_table.h"

namespace rlhf_fast::avx2 {
const KernelTable& kernel_table() {
  static const KernelTable table = make_kernel_table<VecAvx2>("avx2");
  return table;
}
}  // namespace rlhf_fast::avx2
