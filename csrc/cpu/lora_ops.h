// CPU ops of the fused LoRA linear (rlhf_fast/ops/lora_linear.py), registered in
// registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlhf_fast {

// Rows of an int8 / int4 QuantizedWeight (layouts in rlhf_fast/quant/weight.py) decoded to
// a new [rows, in_features] tensor of `dtype`, in one pass over the packed bytes.
at::Tensor lora_dequantize_rows_cpu(const at::Tensor& qdata, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& offsets, int64_t group_size,
                                    int64_t in_features, at::ScalarType dtype);

// A 0/1 tensor (float, bf16, fp16 or uint8; any shape) as bits, 8 elements a byte; and back
// to `numel` elements of 0/1 in `dtype`.
at::Tensor lora_pack_keep_cpu(const at::Tensor& keep);
at::Tensor lora_unpack_keep_cpu(const at::Tensor& bits, int64_t numel, at::ScalarType dtype);

}  // namespace rlhf_fast
