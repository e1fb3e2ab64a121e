"""Fake (meta) implementations of the compiled rlhf_fast:: ops, so they trace under
torch.compile and FakeTensor. The schemas themselves are defined in csrc/cpu/registration.cpp."""

from __future__ import annotations

import torch

from rlhf_fast import _native

if _native.cpp is not None:

    @torch.library.register_fake("rlhf_fast::gae")
    def _gae_fake(rewards, values, mask, gamma, lam):
        shape = rewards.shape
        return rewards.new_empty(shape, dtype=torch.float32), rewards.new_empty(
            shape, dtype=torch.float32
        )

    @torch.library.register_fake("rlhf_fast::rank_loss")
    def _rank_loss_fake(rewards, mask):
        return rewards.new_empty((), dtype=torch.float32), rewards.new_empty(
            rewards.shape, dtype=torch.float32
        )

    @torch.library.register_fake("rlhf_fast::quant_matmul_int8")
    def _quant_matmul_int8_fake(x, qdata, scales, bias):
        return x.new_empty((x.shape[0], qdata.shape[0]))

    @torch.library.register_fake("rlhf_fast::quant_matmul_int4")
    def _quant_matmul_int4_fake(x, qdata, scales, offsets, group_size, in_features, bias):
        return x.new_empty((x.shape[0], qdata.shape[0]))


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "lora_dequantize_rows"):

    @torch.library.register_fake("rlhf_fast::lora_dequantize_rows")
    def _lora_dequantize_rows_fake(qdata, scales, offsets, group_size, in_features, dtype):
        return qdata.new_empty((qdata.shape[0], in_features), dtype=dtype)


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "decode_gemv_int4"):

    @torch.library.register_fake("rlhf_fast::decode_gemv_int4")
    def _decode_gemv_int4_fake(x, qdata, scales, offsets, group_size, in_features, bias):
        return x.new_empty((x.shape[0], qdata.shape[0]))

    @torch.library.register_fake("rlhf_fast::decode_gemv_int8")
    def _decode_gemv_int8_fake(x, qdata, scales, bias):
        return x.new_empty((x.shape[0], qdata.shape[0]))


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "decode_gemv_dense"):

    @torch.library.register_fake("rlhf_fast::decode_gemv_dense")
    def _decode_gemv_dense_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "decode_attention"):

    @torch.library.register_fake("rlhf_fast::decode_add_rms_norm")
    def _decode_add_rms_norm_fake(x, delta, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("rlhf_fast::decode_attention")
    def _decode_attention_fake(
        qkv, cos, sin, keys, values, position, heads, kv_heads, window, scale
    ):
        return qkv.new_empty((1, heads * (qkv.shape[1] // (heads + 2 * kv_heads))))

    if hasattr(torch.ops.rlhf_fast, "decode_attention_rows"):

        @torch.library.register_fake("rlhf_fast::decode_attention_rows")
        def _decode_attention_rows_fake(q, keys, values, key_mask, first, scale):
            return q.new_empty((q.shape[0], q.shape[1] * q.shape[2]))

    @torch.library.register_fake("rlhf_fast::decode_silu_mul")
    def _decode_silu_mul_fake(gate_up):
        return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "lora_pack_keep"):

    @torch.library.register_fake("rlhf_fast::lora_pack_keep")
    def _lora_pack_keep_fake(keep):
        return keep.new_empty(((keep.numel() + 7) // 8,), dtype=torch.uint8)

    @torch.library.register_fake("rlhf_fast::lora_unpack_keep")
    def _lora_unpack_keep_fake(bits, numel, dtype):
        return bits.new_empty((numel,), dtype=dtype)


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "rms_norm"):

    @torch.library.register_fake("rlhf_fast::rms_norm")
    def _rms_norm_fake(x, weight, eps, out_dtype):
        return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(
            (x.shape[0],), dtype=torch.float32
        )

    @torch.library.register_fake("rlhf_fast::rms_norm_backward")
    def _rms_norm_backward_fake(grad_y, x, weight, rstd, weight_grad):
        return x.new_empty(x.shape), x.new_empty(
            (x.shape[1] if weight_grad else 0,), dtype=torch.float32
        )


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "silu_mul"):

    @torch.library.register_fake("rlhf_fast::silu_mul")
    def _silu_mul_fake(gate, up):
        return torch.empty_like(gate)

    @torch.library.register_fake("rlhf_fast::silu_mul_backward")
    def _silu_mul_backward_fake(grad, gate, up):
        return torch.empty_like(gate), torch.empty_like(up)


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "rotary_embedding"):

    @torch.library.register_fake("rlhf_fast::rotary_embedding")
    def _rotary_embedding_fake(x, cos, sin, transpose):
        return x.new_empty(x.shape)


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "token_logprobs"):

    @torch.library.register_fake("rlhf_fast::token_logprobs")
    def _token_logprobs_fake(logits, tokens, temperature):
        rows = logits.shape[:2]
        return (
            logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty((*rows, 2), dtype=torch.float32),
        )

    @torch.library.register_fake("rlhf_fast::token_logprobs_backward")
    def _token_logprobs_backward_fake(grad, logits, tokens, stats, temperature):
        return logits.new_empty(logits.shape)


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "short_attention"):

    def _round16(n):
        return (n + 15) // 16 * 16

    @torch.library.register_fake("rlhf_fast::short_attention")
    def _short_attention_fake(q, k, v, mask, causal, scale):
        batch, heads, steps, dim = q.shape
        out = q.new_empty((batch, steps, heads, dim)).transpose(1, 2)
        return out, q.new_empty((batch, heads, steps, _round16(steps)), dtype=torch.float32)

    @torch.library.register_fake("rlhf_fast::short_attention_backward")
    def _short_attention_backward_fake(grad, q, k, v, probs, mask, causal, scale):
        batch, heads, steps, dim = q.shape
        kv_shape = (batch, steps, k.shape[1], dim)
        return (
            q.new_empty((batch, steps, heads, dim)).transpose(1, 2),
            q.new_empty(kv_shape).transpose(1, 2),
            q.new_empty(kv_shape).transpose(1, 2),
        )


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "sample_logits"):

    @torch.library.register_fake("rlhf_fast::sample_logits")
    def _sample_logits_fake(logits, uniforms, temperature, top_k):
        rows = logits.shape[0]
        return logits.new_empty((rows,), dtype=torch.int64), logits.new_empty(
            (rows,), dtype=torch.float32
        )
