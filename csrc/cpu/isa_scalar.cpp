// Portable kernels: any CPU. W = 1, so the templates become scalar loops.
#define RLHF_ISA_NS scalar
#include "cpu/kernel_table.h"

RLHF_DEFINE_KERNEL_TABLE(VecScalar, "scalar")
