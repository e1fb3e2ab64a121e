// rlhf_fast::lora_dequantize_rows: decode a block of rows of a quantized weight for the LoRA
// backward's dy @ W, which runs torch's GEMM on one block of W at a time (the whole weight is
// never dequantized). QuantizedWeight.dequantize does the same in ~8 tensor passes with fp32
// temporaries; this is one pass that writes the GEMM's dtype directly.
//
// Same arithmetic as QuantizedWeight.dequantize: w = float(q) * float(scale) (+ float(offset))
// in fp32, rounded once to the output dtype. The file is compiled without -mfma, so the
// compiler cannot contract the multiply-add, and the results are bit-identical.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "cpu/lora_ops.h"
#include "cpu/op_checks.h"

namespace rlhf_fast {
namespace {

constexpr int64_t kBlock = 32;  // int4 weights per packed block of 16 bytes

template <typename Out>
void int4_rows(const uint8_t* packed, const at::Half* scales, const at::Half* offsets,
               int64_t rows, int64_t packed_columns, int64_t groups, int64_t group_size,
               int64_t in_features, Out* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float decoded[kBlock];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = packed + n * packed_columns;
      Out* out_row = out + n * in_features;
      for (int64_t k0 = 0; k0 < in_features; k0 += kBlock) {
        // group_size is a multiple of 32: a block never straddles two groups
        const int64_t group = n * groups + k0 / group_size;
        const float scale = static_cast<float>(scales[group]);
        const float offset = static_cast<float>(offsets[group]);
        const uint8_t* bytes = row + k0 / 2;
        for (int j = 0; j < kBlock / 2; ++j) {
          decoded[j] = static_cast<float>(bytes[j] & 15) * scale + offset;
          decoded[j + kBlock / 2] = static_cast<float>(bytes[j] >> 4) * scale + offset;
        }
        const int64_t count = std::min(kBlock, in_features - k0);  // K's padding: not written
        for (int64_t j = 0; j < count; ++j) out_row[k0 + j] = static_cast<Out>(decoded[j]);
      }
    }
  });
}

template <typename Out>
void int8_rows(const int8_t* codes, const float* scales, int64_t rows, int64_t in_features,
               Out* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float scale = scales[n];
      const int8_t* row = codes + n * in_features;
      Out* out_row = out + n * in_features;
      for (int64_t k = 0; k < in_features; ++k) {
        out_row[k] = static_cast<Out>(static_cast<float>(row[k]) * scale);
      }
    }
  });
}

void check_part(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                int64_t columns) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  const bool shape_ok = columns < 0 ? (t.dim() == 1 && t.size(0) == rows)
                                    : (t.dim() == 2 && t.size(0) == rows && t.size(1) == columns);
  TORCH_CHECK_VALUE(shape_ok, name, " has shape ", t.sizes(), ", which does not fit ", rows,
                    " rows of the weight");
}

template <typename Fn>
void for_output_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
    default:
      TORCH_CHECK_TYPE(false, "dtype must be float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace

at::Tensor lora_dequantize_rows_cpu(const at::Tensor& qdata, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& offsets, int64_t group_size,
                                    int64_t in_features, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(qdata.dim() == 2, "qdata must be 2-D, got shape ", qdata.sizes());
  TORCH_CHECK_VALUE(in_features > 0, "in_features must be positive, got ", in_features);
  const int64_t rows = qdata.size(0);
  for_output_dtype(dtype, [](auto) {});  // a bad dtype fails here, before any allocation
  // a block is used once and freed: from the output pool, since a fresh multi-MB block would
  // be an mmap and a page fault per 4 KiB on every call (output_pool.h)
  at::Tensor out = new_output({rows, in_features}, dtype);
  if (qdata.scalar_type() == at::kChar) {
    check_part(qdata, "qdata", at::kChar, rows, in_features);
    check_part(scales, "scales", at::kFloat, rows, -1);
    for_output_dtype(dtype, [&](auto tag) {
      using Out = decltype(tag);
      int8_rows(qdata.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(), rows,
                in_features, out.mutable_data_ptr<Out>());
    });
    return out;
  }
  TORCH_CHECK_VALUE(group_size > 0 && group_size % kBlock == 0,
                    "group_size must be a positive multiple of 32, got ", group_size);
  TORCH_CHECK_VALUE(offsets.has_value(), "offsets are required for an int4 (uint8) qdata");
  const int64_t groups = (in_features + group_size - 1) / group_size;
  check_part(qdata, "qdata", at::kByte, rows, groups * group_size / 2);
  check_part(scales, "scales", at::kHalf, rows, groups);
  check_part(*offsets, "offsets", at::kHalf, rows, groups);
  for_output_dtype(dtype, [&](auto tag) {
    using Out = decltype(tag);
    int4_rows(qdata.const_data_ptr<uint8_t>(), scales.const_data_ptr<at::Half>(),
              offsets->const_data_ptr<at::Half>(), rows, qdata.size(1), groups, group_size,
              in_features, out.mutable_data_ptr<Out>());
  });
  return out;
}

}  // namespace rlhf_fast
