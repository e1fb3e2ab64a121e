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

}  // namespace rlhf_fast
