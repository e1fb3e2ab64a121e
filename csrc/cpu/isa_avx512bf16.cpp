// AVX-512 + AVX512_BF16: only the int4 bf16-dot GEMV. The avx512 table points at it after a
// run-time check of the CPU (isa_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,popcnt")
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512bf16
#include "cpu/quant_gemv_bf16dot_avx512.h"

namespace rlhf_fast::avx512bf16 {

void quant_gemv_int4_bf16dot(const QuantMatmulArgs& args, int64_t n_begin, int64_t n_end) {
  quant_gemv_int4_bf16dot_channels(args, n_begin, n_end);
}

}  // namespace rlhf_fast::avx512bf16
