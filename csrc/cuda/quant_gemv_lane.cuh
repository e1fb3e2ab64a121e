// One lane's share of the quantized GEMV (quant_gemv.cu explains the kernel), written once for
// the GPU and for a CPU emulation (tests/quant_gemv_cuda_emulator.cpp). A warp owns one output
// element y[m, n]; lane l calls *_lane_partial(args, m, n, l) and the warp sums the 32 partials
// with an xor butterfly (warp_sum below mirrors the shuffles), then lane 0 applies finish_*.
// The emulator runs the 32 lanes one after another, which checks every index, bound, nibble
// and tail of the kernel on a CPU, the launcher's choice of loads (choose_load_paths) and the
// alignment of every 16-byte load; only the loads' speed, the shuffles and the final
// conversion to fp16 / bf16 need a GPU.
#pragma once

#include <cstdint>

#include "cuda/element_types.cuh"
#include "cuda/quant_gemv_args.h"

#if !defined(__CUDACC__)
#include <cstring>
#endif
#define QG_FN RLHF_CUDA_FN

namespace rlhf_fast {
namespace quant_gemv {

constexpr int kWarp = 32;
constexpr int kBlockWeights = 32;  // int4: weights per packed block (16 bytes)
constexpr int kUnroll = 4;         // 16-byte weight loads a lane keeps in flight

// Activation types: the stored element and its exact fp32 value.
using cuda_elements::BF16;
using cuda_elements::F16;
using cuda_elements::F32;
using cuda_elements::float_from_bits;
using cuda_elements::half_to_float;

struct Bytes16 {
  uint32_t word[4];
};

#if !defined(__CUDACC__)
// The emulation's check of the vector loads' precondition: the GPU faults on a 16-byte load
// from an address that is not a multiple of 16, where a CPU would quietly read. Each such load
// the emulated lanes make is counted here (and read, then cleared, by the emulator).
inline int64_t& misaligned_vector_loads() {
  static int64_t count = 0;
  return count;
}
inline void check_vector_address(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ++misaligned_vector_loads();
}
#endif

// Which loads the kernel may use for these arguments (decided once per launch, on the host):
// vector_x: 16-byte loads of x, which needs every row of x 16-byte aligned; vector_w: 16-byte
// loads of the weight rows, which needs them 16-byte aligned and, for int8, K a multiple of 16
// (the vector int8 loop reads whole runs of 16 and has no tail). ok is false where the int4
// kernel cannot run (it has only the vector weight path, and needs groups of whole blocks).
struct LoadPaths {
  bool vector_x;
  bool vector_w;
  bool ok;
};

inline LoadPaths choose_load_paths(const QuantGemvArgs& a, bool int4, int64_t element_bytes) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  LoadPaths paths{};
  // With one row of x its row stride is never used (a [1, K] view of a column may have any).
  paths.vector_x = aligned16(a.x) && (a.M == 1 || (a.x_row_stride * element_bytes) % 16 == 0);
  paths.vector_w = aligned16(a.qdata) && a.qdata_row_stride % 16 == 0;
  if (int4) {
    paths.ok = paths.vector_w && a.group_size > 0 && a.group_size % kBlockWeights == 0;
  } else {
    paths.vector_w = paths.vector_w && a.K % 16 == 0;
    paths.ok = true;
  }
  return paths;
}

// 16 weight bytes; `p` is 16-byte aligned. Read-only path: the weights never change under a
// kernel, and each byte is read once, so they should not displace x from L1.
QG_FN Bytes16 load_bytes16(const uint8_t* p) {
  Bytes16 bytes;
#if defined(__CUDACC__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  bytes.word[0] = v.x;
  bytes.word[1] = v.y;
  bytes.word[2] = v.z;
  bytes.word[3] = v.w;
#else
  check_vector_address(p);
  std::memcpy(bytes.word, p, sizeof bytes.word);
#endif
  return bytes;
}

// x[0..15] as fp32; `count` of them are real (16 for a full run), the rest read as 0.
// vector: p is 16-byte aligned, and the loads may be 16 bytes wide (full runs only).
template <class D>
QG_FN void load_x16(const typename D::raw* p, int64_t count, bool vector, float out[16]) {
#if defined(__CUDACC__)
  if (vector && count >= 16) {
    constexpr int kPerVector = 16 / static_cast<int>(sizeof(typename D::raw));
#pragma unroll
    for (int v = 0; v < 16 / kPerVector; ++v) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int i = 0; i < kPerVector; ++i) {
        if constexpr (sizeof(typename D::raw) == 4) {
          out[v * kPerVector + i] = float_from_bits(words[i]);
        } else {
          const uint16_t half = static_cast<uint16_t>(words[i / 2] >> (16 * (i % 2)));
          out[v * kPerVector + i] = D::to_float(half);
        }
      }
    }
    return;
  }
#else
  // The same values as the GPU's vector loads; only their address precondition is checked.
  if (vector && count >= 16) check_vector_address(p);
#endif
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = i < count ? D::to_float(p[i]) : 0.0f;
}

// int4: lane's sum over the blocks b = lane, lane + 32, ... of row n that hold real weights.
// Per block, with s, o the block's group scale and offset:
//   sum_k x_k (q_k s + o) = s * sum_k x_k q_k + o * sum_k x_k
// so the codes are used as they are, and the group constants once per 32 weights.
template <class D>
QG_FN float int4_lane_partial(const QuantGemvArgs& a, int64_t m, int64_t n, int lane,
                              bool vector_x) {
  const auto* x = static_cast<const typename D::raw*>(a.x) + m * a.x_row_stride;
  const auto* row = static_cast<const uint8_t*>(a.qdata) + n * a.qdata_row_stride;
  const auto* scales = static_cast<const uint16_t*>(a.scales) + n * a.group_row_stride;
  const auto* offsets = static_cast<const uint16_t*>(a.offsets) + n * a.group_row_stride;
  const int64_t blocks = (a.K + kBlockWeights - 1) / kBlockWeights;  // the pad is never read
  float acc = 0.0f;
  for (int64_t first = lane; first < blocks; first += kWarp * kUnroll) {
    Bytes16 packed[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t b = first + u * kWarp;
      packed[u] = b < blocks ? load_bytes16(row + 16 * b) : Bytes16{{0, 0, 0, 0}};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t b = first + u * kWarp;
      if (b >= blocks) break;
      const int64_t k0 = b * kBlockWeights;
      float dot = 0.0f, x_sum = 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // low nibbles: k0 + j; high nibbles: k0 + 16 + j
        float xs[16];
        load_x16<D>(x + k0 + 16 * h, a.K - (k0 + 16 * h), vector_x, xs);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const uint32_t q = (packed[u].word[j / 4] >> (8 * (j % 4) + 4 * h)) & 0xFu;
          dot += xs[j] * static_cast<float>(q);
          x_sum += xs[j];
        }
      }
      const int64_t group = k0 / a.group_size;
      acc += half_to_float(scales[group]) * dot + half_to_float(offsets[group]) * x_sum;
    }
  }
  return acc;
}

// int8: lane's sum of x_k q_k over its share of row n. vector: 16-byte runs of the row (needs
// 16-byte aligned rows and K a multiple of 16), else one byte per lane per step.
template <class D>
QG_FN float int8_lane_partial(const QuantGemvArgs& a, int64_t m, int64_t n, int lane,
                              bool vector_x, bool vector_w) {
  const auto* x = static_cast<const typename D::raw*>(a.x) + m * a.x_row_stride;
  const auto* row = static_cast<const uint8_t*>(a.qdata) + n * a.qdata_row_stride;
  float acc = 0.0f;
  if (!vector_w) {
    for (int64_t k = lane; k < a.K; k += kWarp)
      acc += D::to_float(x[k]) * static_cast<float>(static_cast<int8_t>(row[k]));
    return acc;
  }
  const int64_t chunks = a.K / 16;
  for (int64_t first = lane; first < chunks; first += kWarp * kUnroll) {
    Bytes16 packed[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = first + u * kWarp;
      packed[u] = c < chunks ? load_bytes16(row + 16 * c) : Bytes16{{0, 0, 0, 0}};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = first + u * kWarp;
      if (c >= chunks) break;
      float xs[16];
      load_x16<D>(x + 16 * c, 16, vector_x, xs);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const auto q = static_cast<int8_t>((packed[u].word[j / 4] >> (8 * (j % 4))) & 0xFFu);
        acc += xs[j] * static_cast<float>(q);
      }
    }
  }
  return acc;
}

// The warp's total as lane 0 sees it after the xor butterfly (every lane ends with the same
// value: each addition pairs the same two operands, in either order).
inline float warp_sum_emulated(float partial[kWarp]) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    float next[kWarp];
    for (int lane = 0; lane < kWarp; ++lane) next[lane] = partial[lane] + partial[lane ^ offset];
    for (int lane = 0; lane < kWarp; ++lane) partial[lane] = next[lane];
  }
  return partial[0];
}

// y[m, n] in fp32, from the warp's total.
QG_FN float finish_int4(const QuantGemvArgs& a, int64_t n, float total) {
  return a.bias != nullptr ? total + a.bias[n] : total;
}
QG_FN float finish_int8(const QuantGemvArgs& a, int64_t n, float total) {
  const float y = static_cast<const float*>(a.scales)[n] * total;
  return a.bias != nullptr ? y + a.bias[n] : y;
}

}  // namespace quant_gemv
}  // namespace rlhf_fast
