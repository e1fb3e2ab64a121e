// rlhf_fast::silu_mul / silu_mul_backward on the CPU: the SwiGLU product silu(gate) * up of
// Llama-family MLPs, forward and backward in one pass each (silu_mul_kernel.h), for fp32,
// bf16 and fp16 tensors (computed in fp32, rounded once to the inputs' dtype).
//
// HF's MLP computes it as silu, then a multiply; autograd's backward is silu_backward and two
// multiplies: five passes over [tokens, intermediate] tensors (~2.2 ms fwd+bwd at [512, 688]
// fp32 on the dev VM).
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  float_dtype_index(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have gate's dtype ",
                   like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have gate's shape ", like.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// ~16K elements per task: smaller ones would not pay for a thread.
void run(SiluMulFn kernel, const SiluMulArgs& args, int64_t numel) {
  const int64_t grain = 16384;
  at::parallel_for(0, (numel + grain - 1) / grain, 1, [&](int64_t first, int64_t last) {
    kernel(args, first * grain, std::min(last * grain, numel));
  });
}

}  // namespace

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_operand(gate, "gate", gate);
  check_operand(up, "up", gate);
  at::Tensor out = new_output(gate.sizes(), gate.scalar_type());
  SiluMulArgs args{};
  args.gate = gate.const_data_ptr();
  args.up = up.const_data_ptr();
  args.out = out.data_ptr();
  run(active_kernels().silu_mul_forward[float_dtype_index(gate, "gate")], args, gate.numel());
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& gate,
                                                         const at::Tensor& up) {
  check_operand(gate, "gate", gate);
  check_operand(up, "up", gate);
  check_operand(grad, "grad", gate);
  at::Tensor grad_gate = new_output(gate.sizes(), gate.scalar_type());
  at::Tensor grad_up = new_output(gate.sizes(), gate.scalar_type());
  SiluMulArgs args{};
  args.gate = gate.const_data_ptr();
  args.up = up.const_data_ptr();
  args.grad = grad.const_data_ptr();
  args.grad_gate = grad_gate.data_ptr();
  args.grad_up = grad_up.data_ptr();
  run(active_kernels().silu_mul_backward[float_dtype_index(gate, "gate")], args, gate.numel());
  return {grad_gate, grad_up};
}

}  // namespace rlhf_fast
