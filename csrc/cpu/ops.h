// CPU implementations of the rlhf_fast:: torch ops (registered in registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_fast {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const std::optional<at::Tensor>& mask, double gamma,
                                           double lam);

std::tuple<at::Tensor, at::Tensor> rank_loss_cpu(const at::Tensor& rewards,
                                                 const std::optional<at::Tensor>& mask);

at::Tensor quant_matmul_int8_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& bias);

at::Tensor quant_matmul_int4_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                 const at::Tensor& scales, const at::Tensor& offsets,
                                 int64_t group_size, int64_t in_features,
                                 const std::optional<at::Tensor>& bias);

// HF's LlamaRMSNorm forward (y in out_dtype, and the per-row rstd it saves) and backward
// (rms_norm_op.cpp); the weight comes widened to fp32.
std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, at::ScalarType out_dtype);

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd,
                                                         bool weight_grad);

// silu(gate) * up (SwiGLU) and its gradient, fp32 / bf16 / fp16 (silu_mul_op.cpp).
at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up);

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& gate,
                                                         const at::Tensor& up);

// Llama's rotary embedding of x [B, T, H, D] by cos, sin [B or 1, T, D]; transpose: its
// backward (rotary_op.cpp).
at::Tensor rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos,
                                const at::Tensor& sin, bool transpose);

// log softmax(logits / temperature)[token] and the entropy of that softmax per row of logits
// [B, T, V] (unit stride along V), with the per-row stats [B, T, 2] the backward reads; the
// backward's gradient is contiguous, in the logits' dtype (token_logprobs_op.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits,
                                                                  const at::Tensor& tokens,
                                                                  double temperature);

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                       const at::Tensor& tokens, const at::Tensor& stats,
                                       double temperature);

// One token per row of logits [B, V] drawn with uniforms [B] (fp64) from softmax(logits /
// temperature) restricted to the top_k largest (0: all), and its log-prob under the whole
// softmax: (tokens int64 [B], logprobs fp32 [B]) (sample_logits_op.cpp).
std::tuple<at::Tensor, at::Tensor> sample_logits_cpu(const at::Tensor& logits,
                                                     const at::Tensor& uniforms,
                                                     double temperature, int64_t top_k);

// Causal and/or bool-masked attention of short sequences and its backward
// (short_attention_op.cpp): (out, probs) and (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor> short_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const std::optional<at::Tensor>& mask,
                                                       bool causal, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> short_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& probs, const std::optional<at::Tensor>& mask, bool causal, double scale);

}  // namespace rlhf_fast
