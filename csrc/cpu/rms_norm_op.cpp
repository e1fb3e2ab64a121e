// rlhf_fast::rms_norm / rms_norm_backward on the CPU: HF's LlamaRMSNorm (Qwen2's and Mistral's
// are the same) as one pass each way, for training and full-sequence forwards.
//
// HF's module is seven torch ops forward and about ten backward, each a pass over the
// activations with broadcasting (~45 us per op on a [512, 256] fp32 tensor on the dev VM): ~1 ms
// a norm forward and backward, 14% of a PPO iteration of the h256 bench. Here the forward reads
// x once and writes y and one fp32 rstd per row; the backward reads dy and x once more.
//
// Arithmetic (HF's, per row of x): h = fp32(x) * rstd, rstd = 1 / sqrt(mean(fp32(x)^2) + eps);
// h is rounded to x's dtype, then y = weight * h in the promoted dtype of weight and x (the
// caller passes the weight in fp32 and names y's dtype: x's, or fp32). Only the order of the sum
// of squares differs from torch's reduction (8 partial sums here).
// Backward, with g = dy * weight and hx = x * rstd:
//   dx = rstd * (g - hx * mean(g * hx)),   dweight = sum over rows of dy * round(hx).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

// Eight partial sums, so that the compiler can vectorize the reduction.
template <class T>
inline float sum_of_squares(const T* x, int64_t n) {
  float partial[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) partial[u] += float(x[i + u]) * float(x[i + u]);
  float sum = 0.0f;
  for (; i < n; ++i) sum += float(x[i]) * float(x[i]);
  for (int u = 0; u < 8; ++u) sum += partial[u];
  return sum;
}

// The value of h that multiplies the weight: rounded to x's dtype, as HF's .to(input_dtype).
template <class T>
inline float rounded(float h) {
  return float(static_cast<T>(h));
}

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
  const float epsilon = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using in_t = scalar_t;
    const in_t* xs = x.const_data_ptr<in_t>();
    const float* w = weight.const_data_ptr<float>();
    float* rs = rstd.data_ptr<float>();
    auto rows = [&](auto* ys) {
      using out_t = std::remove_pointer_t<decltype(ys)>;
      at::parallel_for(0, M, row_grain(H), [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          const in_t* row = xs + m * H;
          const float r = 1.0f / std::sqrt(sum_of_squares(row, H) / float(H) + epsilon);
          rs[m] = r;
          out_t* out = ys + m * H;
          for (int64_t i = 0; i < H; ++i)
            out[i] = static_cast<out_t>(w[i] * rounded<in_t>(float(row[i]) * r));
        }
      });
    };
    if (out_dtype == at::kFloat)
      rows(y.data_ptr<float>());
    else
      rows(y.data_ptr<in_t>());
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
  // in block order, so the result does not depend on the thread count.
  const int64_t block_rows = row_grain(H);
  const int64_t blocks = weight_grad ? (M + block_rows - 1) / block_rows : 0;
  std::vector<float> partials(static_cast<size_t>(blocks * H), 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_bwd", [&] {
    using in_t = scalar_t;
    const in_t* xs = x.const_data_ptr<in_t>();
    const float* w = weight.const_data_ptr<float>();
    const float* rs = rstd.const_data_ptr<float>();
    in_t* dxs = grad_x.data_ptr<in_t>();
    auto rows = [&](const auto* dys) {
      at::parallel_for(0, (M + block_rows - 1) / block_rows, 1, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
          float* dw = weight_grad ? partials.data() + b * H : nullptr;
          for (int64_t m = b * block_rows; m < std::min(M, (b + 1) * block_rows); ++m) {
            const in_t* row = xs + m * H;
            const auto* dy = dys + m * H;
            const float r = rs[m];
            float partial[8] = {};
            int64_t i = 0;
            for (; i + 8 <= H; i += 8)
              for (int u = 0; u < 8; ++u)
                partial[u] += float(dy[i + u]) * w[i + u] * float(row[i + u]) * r;
            float dot = 0.0f;
            for (; i < H; ++i) dot += float(dy[i]) * w[i] * float(row[i]) * r;
            for (int u = 0; u < 8; ++u) dot += partial[u];
            const float mean = dot / float(H);
            in_t* dx = dxs + m * H;
            for (int64_t k = 0; k < H; ++k) {
              const float hx = float(row[k]) * r;
              dx[k] = static_cast<in_t>(r * (float(dy[k]) * w[k] - hx * mean));
            }
            if (dw != nullptr)
              for (int64_t k = 0; k < H; ++k)
                dw[k] += float(dy[k]) * rounded<in_t>(float(row[k]) * r);
          }
        }
      });
    };
    if (grad_y.scalar_type() == at::kFloat)
      rows(grad_y.const_data_ptr<float>());
    else
      rows(grad_y.const_data_ptr<in_t>());
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
