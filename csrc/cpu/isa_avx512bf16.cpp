// AVX-512 + AVX512_BF16 kernels: only the int4 x bf16-activation GEMM. The avx512 table points
// at it after a run-time check of the CPU (isa_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,popcnt")
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512bf16
#include "cpu/quant_matmul_bf16_avx512.h"

namespace rlhf_fast::avx512bf16 {

void quant_matmul_int4_bf16(const QuantMatmulArgs& args, int64_t n_begin, int64_t n_end) {
  quant_matmul_int4_bf16_channels(args, n_begin, n_end);
}

}  // namespace rlhf_fast::avx512bf16
