// AVX-512 (F, BW, VL, DQ) kernels (16 fp32 lanes). Only called after a run-time CPU check.
// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_* "[may be] used uninitialized").
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt")
#define RLHF_ISA_AVX512
#define RLHF_ISA_NS avx512
#include "cpu/gae_streaming_avx512.h"
#include "cpu/kernel_table.h"

namespace rlhf_fast::avx512 {

// The generic row-block kernels, except GAE, which streams rows (gae_streaming_avx512.h).
const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = make_kernel_table<VecAvx512>("avx512");
    t.gae[kF32] = &gae_rows_streaming<float>;
    t.gae[kBF16] = &gae_rows_streaming<bf16_t>;
    t.gae[kF16] = &gae_rows_streaming<fp16_t>;
    t.dequantize_int4_bf16 = &dequantize_int4_bf16;
    if (__builtin_cpu_supports("avx512vnni"))
      t.quant_gemv_int4_vnni = &avx512vnni::quant_gemv_int4_vnni;
    if (__builtin_cpu_supports("avx512bf16")) {
      t.quant_gemv_int4_bf16dot = &avx512bf16::quant_gemv_int4_bf16dot;
      t.dense_gemv_bf16_dot = &avx512bf16::dense_gemv_bf16_dot;
    }
    if (avx512amx::enable_amx()) t.dense_gemv_bf16_amx = &avx512amx::dense_gemv_bf16_amx;
    return t;
  }();
  return table;
}

}  // namespace rlhf_fast::avx512
