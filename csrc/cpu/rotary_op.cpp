// rlhf_fast::rotary_embedding on the CPU: Llama's rotary position embedding of q or k, as HF's
// apply_rotary_pos_emb computes it, in one pass (HF: slice, neg, cat, two multiplies and an add
// forward, about as many backward, ~1.3 ms for q and k of the h256 PPO bench per layer).
//
// x [B, T, H, D] (D contiguous), cos and sin [B or 1, T, D]; transpose: the backward.
// The arithmetic is rotary_kernel.h's (per SIMD level, from the kernel table): computed in fp32,
// bit-equal to HF in fp32, rounded once to x's dtype in 16-bit (HF rounds each of its ops).
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
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
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
  const RotaryFn kernel = active_kernels().rotary[float_dtype_index(x, "x")];
  at::Tensor y = new_output({B, T, H, D}, x.scalar_type());
  RotaryArgs args{};
  args.x = x.const_data_ptr();
  args.cos = cos.const_data_ptr();
  args.sin = sin.const_data_ptr();
  args.y = y.data_ptr();
  args.x_stride_b = x.stride(0);
  args.x_stride_t = x.stride(1);
  args.x_stride_h = x.stride(2);
  args.table_stride_b = cos.size(0) == 1 ? 0 : T * D;
  args.T = T;
  args.H = H;
  args.D = D;
  args.transpose = transpose;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H * D, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    kernel(args, begin, end);
  });
  return y;
}

}  // namespace rlhf_fast
