// Builds the KernelTable of the ISA this translation unit is compiled for. Included once, by
// isa_<name>.cpp, after it has set the target and RLHF_ISA_NS.
#pragma once

#include "cpu/decode_attend_kernel.h"
#include "cpu/dense_gemv_kernel.h"
#include "cpu/gae_kernel.h"
#include "cpu/quant_matmul_kernel.h"
#include "cpu/rank_loss_kernel.h"
#include "cpu/rms_norm_kernel.h"
#include "cpu/rotary_kernel.h"
#include "cpu/sample_logits_kernel.h"
#include "cpu/short_attention_kernel.h"
#include "cpu/silu_mul_kernel.h"
#include "cpu/token_logprobs_kernel.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <class V>
KernelTable make_kernel_table(const char* isa) {
  KernelTable table{};
  table.isa = isa;
  table.width = V::W;
  table.gae[kF32] = &gae_rows<V, float>;
  table.gae[kBF16] = &gae_rows<V, bf16_t>;
  table.gae[kF16] = &gae_rows<V, fp16_t>;
  table.rank_loss[kF32] = &rank_loss_rows<V, float>;
  table.rank_loss[kBF16] = &rank_loss_rows<V, bf16_t>;
  table.rank_loss[kF16] = &rank_loss_rows<V, fp16_t>;
  table.quant_matmul[kInt8] = &quant_matmul_channels<V, false>;
  table.quant_matmul[kInt4] = &quant_matmul_channels<V, true>;
  table.dequantize_int4_f32 = &dequantize_int4_f32<V>;
  table.silu_mul_forward[kF32] = &silu_mul_forward<V, float>;
  table.silu_mul_forward[kBF16] = &silu_mul_forward<V, bf16_t>;
  table.silu_mul_forward[kF16] = &silu_mul_forward<V, fp16_t>;
  table.silu_mul_backward[kF32] = &silu_mul_backward<V, float>;
  table.silu_mul_backward[kBF16] = &silu_mul_backward<V, bf16_t>;
  table.silu_mul_backward[kF16] = &silu_mul_backward<V, fp16_t>;
  table.silu_mul_forward_as_torch[kF32] = &silu_mul_forward<V, float, true>;
  table.silu_mul_forward_as_torch[kBF16] = &silu_mul_forward<V, bf16_t, true>;
  table.silu_mul_forward_as_torch[kF16] = &silu_mul_forward<V, fp16_t, true>;
  table.decode_attend[kF32] = &decode_attend<V, float>;
  table.decode_attend[kBF16] = &decode_attend<V, bf16_t>;
  table.decode_attend[kF16] = &decode_attend<V, fp16_t>;
  table.rotary[kF32] = &rotary_rows<V, float>;
  table.rotary[kBF16] = &rotary_rows<V, bf16_t>;
  table.rotary[kF16] = &rotary_rows<V, fp16_t>;
  table.dense_gemv[kF32] = &dense_gemv_channels<V, float>;
  table.dense_gemv[kBF16] = &dense_gemv_channels<V, bf16_t>;
  table.dense_gemv[kF16] = &dense_gemv_channels<V, fp16_t>;
  table.rms_norm[kF32][0] = table.rms_norm[kF32][1] = &rms_norm_rows<V, float, float>;
  table.rms_norm[kBF16][0] = &rms_norm_rows<V, bf16_t, bf16_t>;
  table.rms_norm[kBF16][1] = &rms_norm_rows<V, bf16_t, float>;
  table.rms_norm[kF16][0] = &rms_norm_rows<V, fp16_t, fp16_t>;
  table.rms_norm[kF16][1] = &rms_norm_rows<V, fp16_t, float>;
  table.rms_norm_backward[kF32][0] = table.rms_norm_backward[kF32][1] =
      &rms_norm_backward_rows<V, float, float>;
  table.rms_norm_backward[kBF16][0] = &rms_norm_backward_rows<V, bf16_t, bf16_t>;
  table.rms_norm_backward[kBF16][1] = &rms_norm_backward_rows<V, bf16_t, float>;
  table.rms_norm_backward[kF16][0] = &rms_norm_backward_rows<V, fp16_t, fp16_t>;
  table.rms_norm_backward[kF16][1] = &rms_norm_backward_rows<V, fp16_t, float>;
  table.token_logprobs[kF32] = &token_logprobs_rows<V, float>;
  table.token_logprobs[kBF16] = &token_logprobs_rows<V, bf16_t>;
  table.token_logprobs[kF16] = &token_logprobs_rows<V, fp16_t>;
  table.token_logprobs_backward[kF32] = &token_logprobs_backward_rows<V, float>;
  table.token_logprobs_backward[kBF16] = &token_logprobs_backward_rows<V, bf16_t>;
  table.token_logprobs_backward[kF16] = &token_logprobs_backward_rows<V, fp16_t>;
  table.sample_logits[kF32] = &sample_logits_rows<V, float>;
  table.sample_logits[kBF16] = &sample_logits_rows<V, bf16_t>;
  table.sample_logits[kF16] = &sample_logits_rows<V, fp16_t>;
  table.short_attention_forward[kF32] = &short_attention_forward<V, float>;
  table.short_attention_forward[kBF16] = &short_attention_forward<V, bf16_t>;
  table.short_attention_forward[kF16] = &short_attention_forward<V, fp16_t>;
  table.short_attention_backward[kF32] = &short_attention_backward<V, float>;
  table.short_attention_backward[kBF16] = &short_attention_backward<V, bf16_t>;
  table.short_attention_backward[kF16] = &short_attention_backward<V, fp16_t>;
  return table;
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast

// Defines rlhf_fast::<ISA>::kernel_table(), declared in kernels.h.
#define RLHF_DEFINE_KERNEL_TABLE(VEC, NAME)                                 \
  namespace rlhf_fast::RLHF_ISA_NS {                                        \
  const KernelTable& kernel_table() {                                       \
    static const KernelTable table = make_kernel_table<VEC>(NAME);         \
    return table;                                                           \
  }                                                                         \
  }
