// AVX-512 + AVX512_VNNI: only the int4 GEMV for bf16 activations. The avx512 table points at
// it after a run-time check of the CPU (isa_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt")
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512vnni
#include "cpu/quant_gemv_vnni_avx512.h"

namespace rlhf_fast::avx512vnni {

void quant_gemv_int4_vnni(const QuantMatmulArgs& args, int64_t n_begin, int64_t n_end) {
  quant_gemv_int4_vnni_channels(args, n_begin, n_end);
}

}  // namespace rlhf_fast::avx512vnni
