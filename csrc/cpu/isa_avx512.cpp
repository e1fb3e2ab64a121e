// AVX-512 (F, BW, VL, DQ) kernels (16 fp32 lanes). Only called after a run-time CPU check.
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* "may be used uninitialized").
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512
#include "cpu/kernel_table.h"

RLHF_DEFINE_KERNEL_TABLE(VecAvx512, "avx512")
