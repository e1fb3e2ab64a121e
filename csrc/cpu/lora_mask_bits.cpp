// rlhf_fast::lora_pack_keep / lora_unpack_keep: the LoRA dropout's keep mask kept for backward
// as bits (8 elements a byte; element 8j + i at bit i of byte j, zero-padded). Each op is one
// pass: the mask is written once in forward and read once in backward, where the same thing
// in tensor ops takes ~5 passes over int64 words and costs a few percent of a small layer.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/lora_ops.h"

namespace rlhf_fast {
namespace {

constexpr int64_t kGrainBytes = 8192;

template <typename In>
inline uint8_t pack_byte(const In* keep, int count) {
  uint8_t byte = 0;
  for (int i = 0; i < count; ++i) {
    byte |= static_cast<uint8_t>(static_cast<float>(keep[i]) != 0.0f) << i;
  }
  return byte;
}

template <typename In>
void pack(const In* keep, int64_t numel, uint8_t* bits) {
  const int64_t full = numel / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) bits[j] = pack_byte(keep + 8 * j, 8);  // unrolled
  });
  if (numel % 8) bits[full] = pack_byte(keep + 8 * full, static_cast<int>(numel % 8));
}

// byte -> its 8 elements of 0/1 in Out: unpacking is then one 8-element copy per byte.
template <typename Out>
struct ByteTable {
  Out lanes[256][8];
  ByteTable() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int i = 0; i < 8; ++i) {
        lanes[byte][i] = static_cast<Out>(static_cast<float>((byte >> i) & 1));
      }
    }
  }
};

template <typename Out>
void unpack(const uint8_t* bits, int64_t numel, Out* out) {
  static const ByteTable<Out> table;
  const int64_t full = numel / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      std::memcpy(out + 8 * j, table.lanes[bits[j]], sizeof(Out) * 8);
    }
  });
  for (int64_t k = 8 * full; k < numel; ++k) out[k] = table.lanes[bits[full]][k - 8 * full];
}

template <typename Fn>
void for_mask_dtype(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kByte:
      return fn(uint8_t{});
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16, float16 or uint8, got ", dtype);
  }
}

}  // namespace

at::Tensor lora_pack_keep_cpu(const at::Tensor& keep) {
  TORCH_CHECK_VALUE(keep.device().is_cpu(), "keep must be on the CPU, got ", keep.device());
  const at::Tensor flat = keep.contiguous();
  const int64_t numel = flat.numel();
  at::Tensor bits = at::empty({(numel + 7) / 8}, flat.options().dtype(at::kByte));
  for_mask_dtype(flat.scalar_type(), "keep", [&](auto tag) {
    using In = decltype(tag);
    pack(flat.const_data_ptr<In>(), numel, bits.mutable_data_ptr<uint8_t>());
  });
  return bits;
}

at::Tensor lora_unpack_keep_cpu(const at::Tensor& bits, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, "bits must be uint8, got ",
                   bits.scalar_type());
  TORCH_CHECK_VALUE(bits.device().is_cpu(), "bits must be on the CPU, got ", bits.device());
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.is_contiguous(), "bits must be 1-D and contiguous");
  TORCH_CHECK_VALUE(numel >= 0 && (numel + 7) / 8 == bits.size(0), "bits holds ",
                    bits.size(0), " bytes, not the ", (numel + 7) / 8, " of ", numel,
                    " elements");
  at::Tensor out = at::empty({numel}, bits.options().dtype(dtype));
  for_mask_dtype(dtype, "dtype", [&](auto tag) {
    using Out = decltype(tag);
    unpack(bits.const_data_ptr<uint8_t>(), numel, out.mutable_data_ptr<Out>());
  });
  return out;
}

}  // namespace rlhf_fast
