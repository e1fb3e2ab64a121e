// Schemas of the rlhf_fast:: torch ops, their CPU kernels, and the small Python module
// rlhf_fast._C (CPU feature queries). Fake (meta) implementations live in Python, in
// rlhf_fast/ops/_library.py, next to the op wrappers.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/decode_ops.h"
#include "cpu/kernels.h"
#include "cpu/lora_ops.h"
#include "cpu/op_checks.h"
#include "cpu/ops.h"

TORCH_LIBRARY(rlhf_fast, m) {
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam)"
      " -> (Tensor advantages, Tensor returns)");
  m.def("rank_loss(Tensor rewards, Tensor? mask) -> (Tensor loss, Tensor grad)");
  m.def("quant_matmul_int8(Tensor x, Tensor qdata, Tensor scales, Tensor? bias) -> Tensor");
  m.def(
      "quant_matmul_int4(Tensor x, Tensor qdata, Tensor scales, Tensor offsets, int group_size,"
      " int in_features, Tensor? bias) -> Tensor");
  m.def(
      "lora_dequantize_rows(Tensor qdata, Tensor scales, Tensor? offsets, int group_size,"
      " int in_features, ScalarType dtype) -> Tensor");
  m.def("lora_pack_keep(Tensor keep) -> Tensor");
  m.def("lora_unpack_keep(Tensor bits, int numel, ScalarType dtype) -> Tensor");
  m.def(
      "decode_gemv_int4(Tensor x, Tensor qdata, Tensor scales, Tensor offsets, int group_size,"
      " int in_features, Tensor? bias) -> Tensor");
  m.def("decode_gemv_int8(Tensor x, Tensor qdata, Tensor scales, Tensor? bias) -> Tensor");
  m.def("decode_gemv_dense(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("decode_add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def(
      "decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values,"
      " int position, int heads, int kv_heads, int window, float scale) -> Tensor");
  m.def(
      "decode_attention_rows(Tensor q, Tensor keys, Tensor values, Tensor key_mask, int first,"
      " float scale) -> Tensor");
  m.def("decode_silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "rms_norm(Tensor x, Tensor weight, float eps, ScalarType out_dtype)"
      " -> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool weight_grad)"
      " -> (Tensor grad_x, Tensor grad_weight)");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def(
      "silu_mul_backward(Tensor grad, Tensor gate, Tensor up)"
      " -> (Tensor grad_gate, Tensor grad_up)");
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool transpose) -> Tensor");
  m.def(
      "token_logprobs(Tensor logits, Tensor tokens, float temperature)"
      " -> (Tensor logprobs, Tensor entropy, Tensor stats)");
  m.def(
      "token_logprobs_backward(Tensor grad, Tensor logits, Tensor tokens, Tensor stats,"
      " float temperature) -> Tensor");
  m.def(
      "sample_logits(Tensor logits, Tensor uniforms, float temperature, int top_k)"
      " -> (Tensor tokens, Tensor logprobs)");
  m.def(
      "short_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale)"
      " -> (Tensor out, Tensor probs)");
  m.def(
      "short_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs,"
      " Tensor? mask, bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &rlhf_fast::gae_cpu);
  m.impl("rank_loss", &rlhf_fast::rank_loss_cpu);
  m.impl("quant_matmul_int8", &rlhf_fast::quant_matmul_int8_cpu);
  m.impl("quant_matmul_int4", &rlhf_fast::quant_matmul_int4_cpu);
  m.impl("lora_dequantize_rows", &rlhf_fast::lora_dequantize_rows_cpu);
  m.impl("lora_pack_keep", &rlhf_fast::lora_pack_keep_cpu);
  m.impl("lora_unpack_keep", &rlhf_fast::lora_unpack_keep_cpu);
  m.impl("decode_gemv_int4", &rlhf_fast::decode_gemv_int4_cpu);
  m.impl("decode_gemv_int8", &rlhf_fast::decode_gemv_int8_cpu);
  m.impl("decode_gemv_dense", &rlhf_fast::decode_gemv_dense_cpu);
  m.impl("decode_add_rms_norm", &rlhf_fast::decode_add_rms_norm_cpu);
  m.impl("decode_attention", &rlhf_fast::decode_attention_cpu);
  m.impl("decode_attention_rows", &rlhf_fast::decode_attention_rows_cpu);
  m.impl("decode_silu_mul", &rlhf_fast::decode_silu_mul_cpu);
  m.impl("rms_norm", &rlhf_fast::rms_norm_cpu);
  m.impl("rms_norm_backward", &rlhf_fast::rms_norm_backward_cpu);
  m.impl("silu_mul", &rlhf_fast::silu_mul_cpu);
  m.impl("silu_mul_backward", &rlhf_fast::silu_mul_backward_cpu);
  m.impl("rotary_embedding", &rlhf_fast::rotary_embedding_cpu);
  m.impl("token_logprobs", &rlhf_fast::token_logprobs_cpu);
  m.impl("token_logprobs_backward", &rlhf_fast::token_logprobs_backward_cpu);
  m.impl("sample_logits", &rlhf_fast::sample_logits_cpu);
  m.impl("short_attention", &rlhf_fast::short_attention_cpu);
  m.impl("short_attention_backward", &rlhf_fast::short_attention_backward_cpu);
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "rlhf-fast C++ CPU kernels; the ops themselves are torch.ops.rlhf_fast.*";
  module.def(
      "cpu_isa", [] { return std::string(rlhf_fast::active_kernels().isa); },
      "ISA of the kernels in use: 'avx512', 'avx2' or 'scalar'.");
  module.def(
      "set_cpu_isa", [](const std::string& isa) { return rlhf_fast::set_active_isa(isa.c_str()); },
      "Use the kernels of a lower ISA (for tests); returns False if the CPU lacks it.");
  module.def(
      "cpu_supports", [](const std::string& isa) { return rlhf_fast::cpu_supports(isa.c_str()); },
      "Whether this CPU can run the kernels of `isa`.");
  module.def(
      "dense_gemv_bf16_tiles",
      [] { return rlhf_fast::active_kernels().dense_gemv_bf16_amx != nullptr; },
      "Whether decode_gemv_dense multiplies bf16 x by bf16 weights on AMX tiles.");
  module.def(
      "dense_gemv_bf16_dot",
      [] {
        const rlhf_fast::KernelTable& kernels = rlhf_fast::active_kernels();
        return kernels.dense_gemv_bf16_amx == nullptr && kernels.dense_gemv_bf16_dot != nullptr;
      },
      "Whether decode_gemv_dense multiplies bf16 x by bf16 weights with AVX512_BF16's vdpbf16ps "
      "(where the CPU has it and no AMX tiles).");
  module.def(
      "set_poison_outputs", [](bool enabled) { rlhf_fast::poison_outputs() = enabled; },
      "Test hook: fill every output with NaN before the kernels write it.");
}
