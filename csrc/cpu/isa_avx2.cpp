// AVX2 + FMA + F16C kernels (8 fp32 lanes). Only called after a run-time CPU check.
#pragma GCC target("avx2,fma,f16c")
#define RLHF_ISA_AVX2
#define RLHF_ISA_NS avx2
#include "cpu/kernel_table.h"

RLHF_DEFINE_KERNEL_TABLE(VecAvx2, "avx2")
