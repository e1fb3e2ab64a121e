// rlhf_fast::rms_norm / rms_norm_backward on the CPU: HF's LlamaRMSNorm (Qwen2's and Mistral's
// are the same) as one pass each way, for training and full-sequence forwards.
//
// HF's module is seven torch ops forward and about ten backward, each a pass over the
// activations with broadcasting (~45 us per op on a [512, 256] fp32 tensor on the dev VM): ~1 ms
// a norm forward and backward, 14% of a PPO iteration of the h256 bench. Here the forward reads
// x once and writes y and one fp32 rstd per row; the backward reads dy and x once more. The
// row loops are rms_norm_kernel.h's, per SIMD level (16-bit loads and stores in registers).
//
// Arithmetic (HF's, per row of x): h = fp32(x) * rstd, rstd = 1 / sqrt(mean(fp32(x)^2) + eps);
// h is rounded to x's dtype, then y = weight * h in the promoted dtype of weight and x (the
// caller passes the weight in fp32 and names y's dtype: x's, or fp32). Only the order of the sum
// of squares differs from torch's reduction (one partial sum per SIMD lane here).
// Backward, with g = dy * weight and hx = x * rstd:
//   dx = rstd * (g - hx * mean(g * hx)),   dweight = sum over rows of dy * round(hx).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

// Rows per task, so that a task touches ~16K elements (fewer would not pay for a thread).
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.is_contiguous() && t.size(1) > 0, name,
                    " must be a contiguous [M, H] with H > 0, got ", t.sizes());
  float_dtype_index(t, name);
}

void check_weight(const at::Tensor& weight, int64_t H) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat, "weight must be float32 (the caller ",
                   "widens it), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "weight must be on the CPU, got ", weight.device());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
                    "weight must be a contiguous [", H, "], got ", weight.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, at::ScalarType out_dtype) {
  check_rows(x, "x");
  const int64_t M = x.size(0), H = x.size(1);
  check_weight(weight, H);
  TORCH_CHECK_TYPE(out_dtype == x.scalar_type() || out_dtype == at::kFloat,
                   "out_dtype must be x's dtype or float32, got ", out_dtype);
  at::Tensor y = new_output({M, H}, out_dtype);
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  RmsNormArgs args{};
  args.x = x.const_data_ptr();
  args.weight = weight.const_data_ptr<float>();
  args.y = y.data_ptr();
  args.rstd_out = rstd.data_ptr<float>();
  args.H = H;
  args.eps = static_cast<float>(eps);
  const RmsNormFn kernel =
      active_kernels().rms_norm[float_dtype_index(x, "x")][out_dtype == at::kFloat ? 1 : 0];
  at::parallel_for(0, M, row_grain(H), [&](int64_t begin, int64_t end) {
    kernel(args, begin, end);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd,
                                                         bool weight_grad) {
  check_rows(x, "x");
  check_rows(grad_y, "grad_y");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y must have x's shape ", x.sizes(),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type() || grad_y.scalar_type() == at::kFloat,
                   "grad_y must be x's dtype or float32 (y's), got ", grad_y.scalar_type());
  check_weight(weight, H);
  TORCH_CHECK_VALUE(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == M &&
                        rstd.is_contiguous(),
                    "rstd must be the forward's contiguous float32 [", M, "], got ",
                    rstd.sizes());
  at::Tensor grad_x = new_output({M, H}, x.scalar_type());
  // dweight: fixed blocks of rows, each summed into its own partial row, then the partials
  // in block order, so the result does not depend on the thread count. At most
  // kMaxWeightBlocks blocks: at one per row_grain rows the partials took M * H^2 / 16384
  // floats, as much as x in fp32 from H = 16384.
  constexpr int64_t kMaxWeightBlocks = 64;
  int64_t block_rows = row_grain(H);
  if (weight_grad)
    block_rows = std::max(block_rows, (M + kMaxWeightBlocks - 1) / kMaxWeightBlocks);
  const int64_t blocks = weight_grad ? (M + block_rows - 1) / block_rows : 0;
  std::vector<float> partials(static_cast<size_t>(blocks * H), 0.0f);
  RmsNormArgs args{};
  args.x = x.const_data_ptr();
  args.weight = weight.const_data_ptr<float>();
  args.dy = grad_y.const_data_ptr();
  args.dx = grad_x.data_ptr();
  args.rstd = rstd.const_data_ptr<float>();
  args.H = H;
  const RmsNormBackwardFn kernel =
      active_kernels()
          .rms_norm_backward[float_dtype_index(x, "x")][grad_y.scalar_type() == at::kFloat];
  at::parallel_for(0, (M + block_rows - 1) / block_rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      float* dw = weight_grad ? partials.data() + b * H : nullptr;
      kernel(args, b * block_rows, std::min(M, (b + 1) * block_rows), dw);
    }
  });
  // not asked for (a frozen norm): an empty tensor
  at::Tensor grad_weight = at::zeros({weight_grad ? H : 0}, x.options().dtype(at::kFloat));
  if (weight_grad) {
    float* total = grad_weight.data_ptr<float>();
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t k = 0; k < H; ++k) total[k] += partials[b * H + k];
  }
  return {grad_x, grad_weight};
}

}  // namespace rlhf_fast
