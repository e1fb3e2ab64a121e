// AVX-512 + AVX512_BF16: the kernels built on vdpbf16ps, the int4 bf16-dot GEMV and the dense
// bf16 GEMV. The avx512 table points at them after a run-time check of the CPU
// (isa_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,popcnt")
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512bf16
#include "cpu/dense_gemv_bf16_dot_avx512.h"
#include "cpu/quant_gemv_bf16dot_avx512.h"

namespace rlhf_fast::avx512bf16 {

void quant_gemv_int4_bf16dot(const QuantMatmulArgs& args, int64_t n_begin, int64_t n_end) {
  quant_gemv_int4_bf16dot_channels(args, n_begin, n_end);
}

void dense_gemv_bf16_dot(const DenseGemvArgs& args, int64_t n_begin, int64_t n_end) {
  dense_gemv_bf16_dot_channels(args, n_begin, n_end);
}

}  // namespace rlhf_fast::avx512bf16
