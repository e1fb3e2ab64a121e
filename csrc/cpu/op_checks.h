// Argument checks shared by the CPU op implementations. The Python wrappers check first and
// give friendlier messages; these keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <limits>

#include <optional>

#include "cpu/kernels.h"
#include "cpu/output_pool.h"

namespace rlhf_fast {

inline DTypeIndex float_dtype_index(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

// The kernels read rows with unit stride along the last dimension; other strides are copied.
// A quantized weight's part (codes, scales, offsets): exact dtype and shape, on the CPU.
inline void check_weight_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                                at::IntArrayRef sizes) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

// An optional [N] bias as contiguous fp32 (an undefined tensor when absent): the kernels add
// it in their fp32 epilogue whatever the activations' dtype.
inline at::Tensor bias_fp32(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  float_dtype_index(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N,
                    "] (out_features), got ", bias->sizes());
  TORCH_CHECK_VALUE(bias->device().is_cpu(), "bias must be on the CPU, got ", bias->device());
  return bias->to(at::kFloat).contiguous();
}

inline at::Tensor unit_stride_rows(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline void check_2d_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [B, N], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

// Returns the mask's data as bytes (nullptr when absent) and keeps its unit-stride copy alive.
inline const uint8_t* mask_bytes(const std::optional<at::Tensor>& mask, const at::Tensor& like,
                                 at::Tensor& holder) {
  if (!mask.has_value()) return nullptr;
  check_2d_cpu(*mask, "mask");
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool, got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->sizes() == like.sizes(), "mask must have shape ", like.sizes(),
                    ", got ", mask->sizes());
  holder = unit_stride_rows(*mask);
  return reinterpret_cast<const uint8_t*>(holder.const_data_ptr<bool>());
}

// The int4 layout's arguments (rlhf_fast/quant/weight.py): returns the number of groups of
// a row. Shared by the CPU and CUDA bindings; the tensors' own shapes are checked by each.
inline int64_t check_int4_arguments(const at::Tensor& x, const at::Tensor& qdata,
                                    int64_t group_size, int64_t in_features) {
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0,
                    "group_size must be a positive multiple of 32, got ", group_size);
  TORCH_CHECK_VALUE(in_features == x.size(1), "x must have shape [M, ", in_features,
                    "] (in_features), got ", x.sizes());
  TORCH_CHECK_VALUE(qdata.dim() == 2, "qdata must be 2-D [out_features, padded / 2], got ",
                    qdata.sizes());
  return (in_features + group_size - 1) / group_size;
}

// Test hook: when set, every output is filled with NaN before a kernel writes it, so an
// element a kernel forgets to write fails the comparison with the reference.
inline bool& poison_outputs() {
  static bool enabled = false;
  return enabled;
}

// A new CPU output, fp32 unless said (pooled when large: see output_pool.h).
inline at::Tensor new_output(at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  at::Tensor out = pooled_empty(sizes, dtype);
  if (poison_outputs()) out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

}  // namespace rlhf_fast
