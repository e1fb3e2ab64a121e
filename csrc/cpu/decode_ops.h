// CPU implementations of the decode ops (registered in registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlhf_fast {

// y ~= x @ dequantize(W).T (+ bias) with x quantized to int16 per 32 columns (decode_gemv.h).
at::Tensor decode_gemv_int4_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                const at::Tensor& scales, const at::Tensor& offsets,
                                int64_t group_size, int64_t in_features,
                                const std::optional<at::Tensor>& bias);

// The same for int8 weights, x quantized per 128 columns.
at::Tensor decode_gemv_int8_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                const at::Tensor& scales, const std::optional<at::Tensor>& bias);

// y = x @ weight.T (+ bias) for x of at most 16 rows, weight dense fp32 / bf16 / fp16 with a
// unit column stride; fp32 sums, y in x's dtype.
at::Tensor decode_gemv_dense_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias);

// The per-layer steps of one decoded token (decode_layer_ops.cpp).
at::Tensor decode_add_rms_norm_cpu(at::Tensor& x, const std::optional<at::Tensor>& delta,
                                   const at::Tensor& weight, double eps);
at::Tensor decode_attention_cpu(const at::Tensor& qkv, const at::Tensor& cos,
                                const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                                int64_t position, int64_t heads, int64_t kv_heads,
                                int64_t window, double scale);
// Attention of B single-query rows: q [B, heads, head_dim] over the cache columns
// [first, first + keys) where key_mask [B, keys] is true; out [B, heads * head_dim].
at::Tensor decode_attention_rows_cpu(const at::Tensor& q, const at::Tensor& keys,
                                     const at::Tensor& values, const at::Tensor& key_mask,
                                     int64_t first, double scale);
at::Tensor decode_silu_mul_cpu(const at::Tensor& gate_up);

}  // namespace rlhf_fast
