// rlhf_fast::sample_logits on the CPU: a decode step's draw of one token per row of logits and
// that token's log-prob (sample_logits_kernel.h, per SIMD level), for fp32, bf16 and fp16
// logits read as they are.
//
// The PyTorch composition (rlhf_fast/ops/sample_logits.py's reference: softmax, the two-level
// inverse CDF of models/sampling.py, log_softmax and a gather) is ~25 small ops, ~0.3 ms a
// step at 8 rows of a 2000-token vocabulary, more than the step's attention; here each row is
// read twice (its max, then its exps) and its exps once more inside one block.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {

std::tuple<at::Tensor, at::Tensor> sample_logits_cpu(const at::Tensor& logits,
                                                     const at::Tensor& uniforms,
                                                     double temperature, int64_t top_k) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be on the CPU, got ",
                    logits.device());
  const int dtype = float_dtype_index(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0,
                    "logits must be [B, V] with V > 0, got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1,
                    "logits must have unit stride along V, got strides ", logits.strides());
  TORCH_CHECK_TYPE(uniforms.scalar_type() == at::kDouble, "uniforms must be float64, got ",
                   uniforms.scalar_type());
  TORCH_CHECK_VALUE(uniforms.device().is_cpu() && uniforms.dim() == 1 &&
                        uniforms.size(0) == logits.size(0) && uniforms.is_contiguous(),
                    "uniforms must be a contiguous CPU [B] = [", logits.size(0), "], got ",
                    uniforms.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0 (0: every token), got ", top_k);
  const int64_t rows = logits.size(0);
  const double* u = uniforms.const_data_ptr<double>();
  for (int64_t row = 0; row < rows; ++row)
    TORCH_CHECK_VALUE(u[row] >= 0.0 && u[row] < 1.0, "uniforms must be in [0, 1), got ",
                      u[row], " at row ", row);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  at::Tensor bad = at::empty({rows}, logits.options().dtype(at::kByte)).zero_();
  SampleLogitsArgs args{};
  args.logits = logits.const_data_ptr();
  args.row_stride = logits.size(1) == 1 ? 1 : logits.stride(0);
  args.V = logits.size(1);
  args.top_k = top_k;
  args.inv_temperature = static_cast<float>(1.0 / temperature);
  args.uniforms = u;
  args.tokens = tokens.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  args.bad = bad.data_ptr<uint8_t>();
  const SampleLogitsFn kernel = active_kernels().sample_logits[dtype];
  // a row of ~64K logits is worth a thread; a decode step's 8 rows of 2000 are not
  const int64_t grain = std::max<int64_t>(1, 65536 / args.V);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
  const uint8_t* flags = bad.const_data_ptr<uint8_t>();
  for (int64_t row = 0; row < rows; ++row)
    TORCH_CHECK_VALUE(!flags[row], "logits row ", row, " has no distribution to sample: ",
                      "a NaN or +inf logit, or every logit -inf");
  return {tokens, logprobs};
}

}  // namespace rlhf_fast
