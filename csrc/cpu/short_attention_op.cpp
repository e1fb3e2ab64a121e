// rlhf_fast::short_attention / short_attention_backward on the CPU: causal and/or boolean-masked
// softmax attention of short sequences (training and scoring passes: Tq == Tk, no KV cache),
// forward and backward, fp32 / bf16 / fp16 in, fp32 arithmetic (short_attention_kernel.h).
//
// torch's CPU flash attention takes ~2.0 ms fwd+bwd at the PPO bench's [16, 4, 64, 64] fp32
// (2 threads, a quiet machine) for ~100 MFLOP: its per-block bookkeeping, not arithmetic,
// dominates at 64 positions. Here each (batch, head) pair is a handful of register-blocked products over the
// visible part of its T x T scores.
//
// q [B, H, T, D], k and v [B, Hkv, T, D] (H a multiple of Hkv), any strides; mask: bool,
// [B or 1, H or 1, T, T] (True = attend), combined with causality when `causal`. A query that
// sees no key gets zeros (SDPA gives NaN). Outputs are views of [B, T, H, D] buffers
// (dk, dv: [B, T, Hkv, D]) transposed to the inputs' [B, H, T, D], so HF's transpose back to
// the projections' layout is free; probs: fp32 [B, H, T, Tp], Tp = T rounded up to 16.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

constexpr int64_t kPad = 16;

int64_t round_up(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  float_dtype_index(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ",
                   q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [B, heads, T, D], got ", t.sizes());
}

// Fills the shape, strides and mask fields of args; returns the mask's unit-stride copy.
at::Tensor describe(ShortAttentionArgs& args, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const std::optional<at::Tensor>& mask, bool causal,
                    double scale) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(2) == T && k.size(3) == D, "k must be [", B,
                    ", kv_heads, ", T, ", ", D, "] (q's batch, length and head_dim), got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  const int64_t Hkv = k.size(1);
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "q's heads (", H,
                    ") must be a multiple of k's kv_heads (", Hkv, ")");
  at::Tensor held;
  args.mask = nullptr;
  args.mask_strides[0] = args.mask_strides[1] = args.mask_strides[2] = 0;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool (True = attend), got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->device().is_cpu(), "mask must be on the CPU, got ", mask->device());
    TORCH_CHECK_VALUE(mask->dim() == 4 && (mask->size(0) == B || mask->size(0) == 1) &&
                          (mask->size(1) == H || mask->size(1) == 1) && mask->size(2) == T &&
                          mask->size(3) == T,
                      "mask must be [", B, " or 1, ", H, " or 1, ", T, ", ", T, "], got ",
                      mask->sizes());
    held = (T <= 1 || mask->stride(3) == 1) ? *mask : mask->contiguous();
    args.mask = reinterpret_cast<const uint8_t*>(held.const_data_ptr<bool>());
    for (int d = 0; d < 3; ++d) args.mask_strides[d] = held.size(d) == 1 ? 0 : held.stride(d);
  }
  args.q = q.const_data_ptr();
  args.k = k.const_data_ptr();
  args.v = v.const_data_ptr();
  for (int d = 0; d < 4; ++d) {
    args.q_strides[d] = q.stride(d);
    args.k_strides[d] = k.stride(d);
    args.v_strides[d] = v.stride(d);
  }
  args.causal = causal;
  args.B = B;
  args.H = H;
  args.Hkv = Hkv;
  args.T = T;
  args.D = D;
  args.Tp = round_up(T);
  args.Dp = round_up(D);
  args.scale = static_cast<float>(scale);
  return held;
}

// Pairs in parallel; a task is worth a thread from ~64K multiply-adds on.
void run(ShortAttentionFn kernel, const ShortAttentionArgs& args, int64_t pairs,
         int64_t pair_work) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, pair_work));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(short_attention_scratch_floats(args.T, args.Tp, args.Dp));
    std::vector<int32_t> ranges(4 * args.Tp);
    kernel(args, begin, end, scratch.data(), ranges.data());
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> short_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v,
                                                       const std::optional<at::Tensor>& mask,
                                                       bool causal, double scale) {
  ShortAttentionArgs args{};
  const at::Tensor held = describe(args, q, k, v, mask, causal, scale);
  const int64_t B = args.B, H = args.H, T = args.T, D = args.D;
  at::Tensor out = new_output({B, T, H, D}, q.scalar_type());
  at::Tensor probs = new_output({B, H, T, args.Tp});
  if (out.numel() > 0) {
    args.out = out.data_ptr();
    args.probs = probs.data_ptr<float>();
    run(active_kernels().short_attention_forward[float_dtype_index(q, "q")], args, B * H,
        T * T * D);
  }
  return {out.transpose(1, 2), probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> short_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& probs, const std::optional<at::Tensor>& mask, bool causal, double scale) {
  ShortAttentionArgs args{};
  const at::Tensor held = describe(args, q, k, v, mask, causal, scale);
  const int64_t B = args.B, H = args.H, Hkv = args.Hkv, T = args.T, D = args.D;
  check_operand(grad, "grad", q);
  TORCH_CHECK_VALUE(grad.sizes() == q.sizes(), "grad must have q's shape ", q.sizes(), ", got ",
                    grad.sizes());
  TORCH_CHECK_TYPE(probs.scalar_type() == at::kFloat, "probs must be float32, got ",
                   probs.scalar_type());
  TORCH_CHECK_VALUE(probs.device().is_cpu() && probs.is_contiguous() && probs.dim() == 4 &&
                        probs.size(0) == B && probs.size(1) == H && probs.size(2) == T &&
                        probs.size(3) == args.Tp,
                    "probs must be the forward's contiguous [", B, ", ", H, ", ", T, ", ",
                    args.Tp, "], got ", probs.sizes());
  at::Tensor dq = new_output({B, T, H, D}, q.scalar_type());
  at::Tensor dk = new_output({B, T, Hkv, D}, q.scalar_type());
  at::Tensor dv = new_output({B, T, Hkv, D}, q.scalar_type());
  if (dq.numel() > 0) {
    args.grad = grad.const_data_ptr();
    for (int d = 0; d < 4; ++d) args.grad_strides[d] = grad.stride(d);
    args.probs = const_cast<float*>(probs.const_data_ptr<float>());
    args.dq = dq.data_ptr();
    args.dk = dk.data_ptr();
    args.dv = dv.data_ptr();
    run(active_kernels().short_attention_backward[float_dtype_index(q, "q")], args, B * Hkv,
        (H / Hkv) * T * T * D);
  } else {
    dk.zero_();  // no query heads or no positions: nothing flows back
    dv.zero_();
  }
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace rlhf_fast
