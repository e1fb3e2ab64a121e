// Input element types shared by the CUDA kernels and their CPU emulations (tests/*_emulator.cpp):
// what a lane loads from global memory, and its exact fp32 value. Compiled by nvcc for the
// GPU and by g++ for the emulation, which must widen bit-identically (subnormals included).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define RLHF_CUDA_FN __device__ __forceinline__
#else
#include <cstring>
#define RLHF_CUDA_FN inline
#endif

namespace rlhf_fast {
namespace cuda_elements {

RLHF_CUDA_FN float float_from_bits(uint32_t bits) {
#if defined(__CUDACC__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

RLHF_CUDA_FN float half_to_float(uint16_t bits) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(bits));
#else
  const uint32_t sign = uint32_t{bits & 0x8000u} << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return float_from_bits(sign);
  exponent = 113;  // subnormal: shift the leading one up to the implicit bit
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --exponent;
  }
  return float_from_bits(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
#endif
}

struct F32 {
  using raw = float;
  static RLHF_CUDA_FN float to_float(float x) { return x; }
};
struct BF16 {  // bf16 is the upper half of an fp32: widening is a shift, on both CPU and GPU
  using raw = uint16_t;
  static RLHF_CUDA_FN float to_float(uint16_t bits) {
    return float_from_bits(uint32_t{bits} << 16);
  }
};
struct F16 {
  using raw = uint16_t;
  static RLHF_CUDA_FN float to_float(uint16_t bits) { return half_to_float(bits); }
};

}  // namespace cuda_elements
}  // namespace rlhf_fast
