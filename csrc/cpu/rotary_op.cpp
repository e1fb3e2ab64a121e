// rlhf_fast::rotary_embedding on the CPU: Llama's rotary position embedding of q or k, as HF's
// apply_rotary_pos_emb computes it, in one pass (HF: slice, neg, cat, two multiplies and an add
// forward, about as many backward, ~1.3 ms for q and k of the h256 PPO bench per layer).
//
// x [B, T, H, D] (D contiguous), cos and sin [B or 1, T, D]; with r = D / 2:
//   forward  y_i = x_i cos_i - x_{i+r} sin_i      (i < r)
//            y_i = x_i cos_i + x_{i-r} sin_i      (i >= r)     i.e. x cos + rotate_half(x) sin
//   backward (transpose) dx_i = g_i cos_i + g_{i+r} sin_{i+r}   (i < r)
//                        dx_i = g_i cos_i - g_{i-r} sin_{i-r}   (i >= r)
// Computed in fp32, rounded once to x's dtype (HF rounds each of its three ops in 16-bit).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {

at::Tensor rotary_embedding_cpu(const at::Tensor& x, const at::Tensor& cos,
                                const at::Tensor& sin, bool transpose) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(3) % 2 == 0 && x.stride(3) == 1,
                    "x must be [B, T, H, D] with an even, contiguous D, got ", x.sizes(),
                    " with strides ", x.strides());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), r = D / 2;
  for (const at::Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, " must have x's dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dim() == 3 && t->is_contiguous() &&
                          (t->size(0) == B || t->size(0) == 1) && t->size(1) == T &&
                          t->size(2) == D,
                      name, " must be a contiguous CPU [", B, " or 1, ", T, ", ", D, "], got ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(cos.size(0) == sin.size(0), "cos and sin must have the same shape");
  float_dtype_index(x, "x");
  const auto dtype = x.scalar_type();
  at::Tensor y = new_output({B, T, H, D}, dtype);
  const int64_t table_batch_stride = cos.size(0) == 1 ? 0 : T * D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rotary_embedding", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* cs = cos.const_data_ptr<scalar_t>();
    const scalar_t* ss = sin.const_data_ptr<scalar_t>();
    scalar_t* ys = y.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H * D, 1));
    at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const scalar_t* c = cs + b * table_batch_stride + t * D;
        const scalar_t* s = ss + b * table_batch_stride + t * D;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* in = xs + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
          scalar_t* out = ys + ((b * T + t) * H + h) * D;
          if (!transpose) {
            for (int64_t i = 0; i < r; ++i) {
              const float lo = float(in[i]), hi = float(in[i + r]);
              out[i] = static_cast<scalar_t>(lo * float(c[i]) - hi * float(s[i]));
              out[i + r] = static_cast<scalar_t>(hi * float(c[i + r]) + lo * float(s[i + r]));
            }
          } else {
            for (int64_t i = 0; i < r; ++i) {
              const float lo = float(in[i]), hi = float(in[i + r]);
              out[i] = static_cast<scalar_t>(lo * float(c[i]) + hi * float(s[i + r]));
              out[i + r] = static_cast<scalar_t>(hi * float(c[i + r]) - lo * float(s[i]));
            }
          }
        }
      }
    });
  });
  return y;
}

}  // namespace rlhf_fast
