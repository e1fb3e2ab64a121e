// rlhf_fast::token_logprobs / token_logprobs_backward on the CPU: PPO's log-prob of each sampled
// token, log softmax(logits / temperature)[token], and the entropy of that softmax, from one read
// of each row of logits [B, T, V] (token_logprobs_kernel.h, per SIMD level), for fp32, bf16 and
// fp16 logits read as they are (math in fp32).
//
// The PyTorch composition (a gather, logsumexp, and log_softmax / exp / mul / sum for the
// entropy) makes about six passes over [B, T, V] forward, with fp32 copies of 16-bit logits,
// and four backward; at vocabularies of 32k-152k those temporaries are gigabytes. Here the
// forward saves two floats per row (stats: the max logit and log sum exp) and nothing of size V;
// the backward writes the gradient in one pass.
//
// Logits may be a view (a slice along T, say): any strides over B and T, unit stride along V.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

// Rows per task, so that a task touches ~16K logits (fewer would not pay for a thread).
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be on the CPU, got ",
                    logits.device());
  float_dtype_index(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(2) > 0, "logits must be [B, T, V] with ",
                    "V > 0, got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) == 1 || logits.stride(2) == 1,
                    "logits must have unit stride along V, got strides ", logits.strides());
}

// Out-of-range tokens would read outside the row: checked here, once, for direct op calls.
void check_tokens(const at::Tensor& tokens, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "tokens must be int64, got ",
                   tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.device().is_cpu(), "tokens must be on the CPU, got ",
                    tokens.device());
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(0) == logits.size(0) &&
                        tokens.size(1) == logits.size(1) && tokens.is_contiguous(),
                    "tokens must be a contiguous [B, T] = [", logits.size(0), ", ",
                    logits.size(1), "], got ", tokens.sizes());
  const int64_t* data = tokens.const_data_ptr<int64_t>();
  const int64_t V = logits.size(2);
  for (int64_t i = 0; i < tokens.numel(); ++i)
    TORCH_CHECK_VALUE(data[i] >= 0 && data[i] < V, "tokens must be in [0, ", V, "), got ",
                      data[i]);
}

float inverse_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be finite and > 0, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

TokenLogprobsArgs row_args(const at::Tensor& logits, const at::Tensor& tokens,
                           double temperature) {
  TokenLogprobsArgs args{};
  args.logits = logits.const_data_ptr();
  args.stride_b = logits.stride(0);
  args.stride_t = logits.stride(1);
  args.T = logits.size(1);
  args.V = logits.size(2);
  args.tokens = tokens.const_data_ptr<int64_t>();
  args.inv_temperature = inverse_temperature(temperature);
  return args;
}

void run(TokenLogprobsFn kernel, const TokenLogprobsArgs& args, int64_t rows) {
  at::parallel_for(0, rows, row_grain(args.V), [&](int64_t begin, int64_t end) {
    kernel(args, begin, end);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits,
                                                                  const at::Tensor& tokens,
                                                                  double temperature) {
  check_logits(logits);
  check_tokens(tokens, logits);
  const int64_t B = logits.size(0), T = logits.size(1);
  at::Tensor logprobs = new_output({B, T});
  at::Tensor entropy = new_output({B, T});
  at::Tensor stats = new_output({B, T, 2});
  TokenLogprobsArgs args = row_args(logits, tokens, temperature);
  args.logprobs = logprobs.data_ptr<float>();
  args.entropy = entropy.data_ptr<float>();
  args.stats = stats.data_ptr<float>();
  run(active_kernels().token_logprobs[float_dtype_index(logits, "logits")], args, B * T);
  return {logprobs, entropy, stats};
}

at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                       const at::Tensor& tokens, const at::Tensor& stats,
                                       double temperature) {
  check_logits(logits);
  check_tokens(tokens, logits);
  const int64_t B = logits.size(0), T = logits.size(1);
  TORCH_CHECK_VALUE(grad.scalar_type() == at::kFloat && grad.device().is_cpu() &&
                        grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == B &&
                        grad.size(1) == T,
                    "grad must be a contiguous float32 [", B, ", ", T, "] on the CPU, got ",
                    grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                        stats.dim() == 3 && stats.size(0) == B && stats.size(1) == T &&
                        stats.size(2) == 2,
                    "stats must be the forward's contiguous float32 [", B, ", ", T,
                    ", 2], got ", stats.sizes());
  at::Tensor grad_logits = new_output(logits.sizes(), logits.scalar_type());
  TokenLogprobsArgs args = row_args(logits, tokens, temperature);
  args.stats = const_cast<float*>(stats.const_data_ptr<float>());  // read only
  args.grad = grad.const_data_ptr<float>();
  args.grad_logits = grad_logits.data_ptr();
  run(active_kernels().token_logprobs_backward[float_dtype_index(logits, "logits")], args,
      B * T);
  return grad_logits;
}

}  // namespace rlhf_fast
