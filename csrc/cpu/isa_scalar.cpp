// Portable kernels: any x86-64 (or other) CPU. W = 1, so the templates become scalar loops.
#define RLHF_ISA_NS scalar
#include "cpu/kernel_table.h"

namespace rlhf_fast::scalar {
const KernelTable& kernel_table() {
  static const KernelTable table = make_kernel_table<VecScalar>("scalar");
  return table;
}
}  // namespace rlhf_fast::scalar
