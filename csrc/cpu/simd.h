// Minimal SIMD vocabulary shared by the CPU kernels.
//
// Each kernel is written once as a template over a vector type V and instantiated three times,
// in three translation units compiled for different ISAs (isa_scalar.cpp, isa_avx2.cpp,
// isa_avx512.cpp). The widest one the CPU supports is chosen at run time (cpu_features.cpp), so
// the built library never needs -march=native.
//
// V::W is the number of fp32 lanes. The kernels put *rows* of the batch in the lanes (row-block
// tiles of W x W, transposed in registers), which turns a time recurrence such as GAE's into W
// independent chains instead of one latency-bound chain. VecScalar (W = 1) makes the same
// template a plain scalar loop.
//
// This header includes nothing from the C++ standard library on purpose: it is compiled under
// different `#pragma GCC target`s, and an inline STL function instantiated in an AVX-512
// translation unit could be picked by the linker for the scalar path (an ODR trap that crashes
// older CPUs with SIGILL). Everything here sits in the ISA's own namespace.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"

// V::max(a, b) and V::min(a, b) follow the x86 rule: when either input is NaN they return b.
// Put the value that may be NaN second where NaN must propagate.

#if defined(RLHF_ISA_AVX2) || defined(RLHF_ISA_AVX512)
#include <immintrin.h>
#endif

#ifndef RLHF_ISA_NS
#error "define RLHF_ISA_NS (and the ISA macro) before including simd.h"
#endif

namespace rlhf_fast {
namespace RLHF_ISA_NS {

inline float bf16_to_float(bf16_t x) {
  uint32_t bits = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float fp16_to_float(fp16_t x) {
  // IEEE half -> single, including subnormals, inf and NaN.
  uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu;
  uint32_t mantissa = x.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: renormalize
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (uint32_t(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// fp32 -> 16-bit, rounded to nearest even as torch's .to() rounds (bit-equal, NaN included).
inline bf16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // torch's quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // carries into the exponent when it should
  return bf16_t{static_cast<uint16_t>(bits >> 16)};
}

inline fp16_t float_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (x >= 0x47800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 2^16: inf
  if (x < 0x38800000u) {
    // under 2^-14 the half is subnormal, a multiple of 2^-24: adding 0.5 (whose float ulp is
    // 2^-24) lets the float adder round to that grid, nearest even; the excess over 0.5 is
    // the half's bits (2^-14 itself comes out as 0x400, the smallest normal)
    float a;
    std::memcpy(&a, &x, 4);
    a += 0.5f;
    std::memcpy(&x, &a, 4);
    return fp16_t{static_cast<uint16_t>(sign | (x - 0x3f000000u))};
  }
  // normal: exponent bias 127 -> 15 (adding -112 << 23), then round the 13 dropped mantissa
  // bits to nearest even; a carry moves into the exponent (up to inf) as it should
  x += 0xc8000fffu + ((x >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | (x >> 13))};
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bf16_to_float(x); }
inline float to_float(fp16_t x) { return fp16_to_float(x); }

// ---------------------------------------------------------------------------------------------
struct VecScalar {
  static constexpr int W = 1;
  using reg = float;
  using mask = bool;

  static reg zero() { return 0.0f; }
  static reg set1(float x) { return x; }
  template <class T>
  static reg load(const T* p, int n) {
    return n > 0 ? to_float(p[0]) : 0.0f;
  }
  static reg load_flag(const uint8_t* p, int n) { return (n > 0 && p[0]) ? 1.0f : 0.0f; }
  static void store(float* p, reg v, int n) {
    if (n > 0) p[0] = v;
  }
  static void store(bf16_t* p, reg v, int n) {
    if (n > 0) p[0] = float_to_bf16(v);
  }
  static void store(fp16_t* p, reg v, int n) {
    if (n > 0) p[0] = float_to_fp16(v);
  }
  // v rounded to a 16-bit type and back (a store and a load without the memory round trip)
  static reg round_as(reg v, float) { return v; }
  static reg round_as(reg v, bf16_t) { return bf16_to_float(float_to_bf16(v)); }
  static reg round_as(reg v, fp16_t) { return fp16_to_float(float_to_fp16(v)); }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg div(reg a, reg b) { return a / b; }
  static reg fma(reg a, reg b, reg c) { return __builtin_fmaf(a, b, c); }
  static reg max(reg a, reg b) { return a > b ? a : b; }
  static reg min(reg a, reg b) { return a < b ? a : b; }
  static reg abs(reg a) { return __builtin_fabsf(a); }
  static reg round(reg a) { return __builtin_rintf(a); }
  static reg scale_pow2(reg a, reg n) { return __builtin_ldexpf(a, int(n)); }
  static mask nonzero(reg a) { return a != 0.0f; }
  static mask ge(reg a, reg b) { return a >= b; }
  static mask mand(mask a, mask b) { return a && b; }
  static reg select(mask m, reg a, reg b) { return m ? a : b; }
  static void transpose(reg*) {}
  static double hsum(reg a) { return a; }
  static float hsum_float(reg a) { return a; }
};

// ---------------------------------------------------------------------------------------------
#if defined(RLHF_ISA_AVX2)
struct VecAvx2 {
  static constexpr int W = 8;
  using reg = __m256;
  using mask = __m256;  // all-ones / all-zeros lanes

  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }

  static __m256i lane_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static reg load(const float* p, int n) {
    return n == W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n));
  }
  // 16-bit and 8-bit partial loads go through a zeroed stack copy: AVX2 has no masked
  // load narrower than 32 bits, and reading past the row could fault at a page edge.
  static reg load(const bf16_t* p, int n) {
    __m128i raw;
    if (n == W) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tmp, p, sizeof(uint16_t) * n);
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static reg load(const fp16_t* p, int n) {
    __m128i raw;
    if (n == W) {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tmp, p, sizeof(uint16_t) * n);
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_cvtph_ps(raw);
  }
  static reg load_flag(const uint8_t* p, int n) {
    uint64_t bytes = 0;
    std::memcpy(&bytes, p, n);
    __m256i wide = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
    wide = _mm256_min_epu32(wide, _mm256_set1_epi32(1));  // any nonzero byte is "true"
    return _mm256_cvtepi32_ps(wide);
  }
  static void store(float* p, reg v, int n) {
    if (n == W)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, lane_mask(n), v);
  }
  // 16-bit stores round to nearest even (float_to_bf16 / float_to_fp16, lane-wise); partial
  // ones go through a stack copy, as the partial loads do.
  // fp32 bits rounded to nearest even at bit 16 (the bf16 in the high half), NaN quieted
  static __m256i bf16_rounded_bits(reg v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), nan);
  }
  static reg round_as(reg v, float) { return v; }
  static reg round_as(reg v, bf16_t) {
    return _mm256_castsi256_ps(
        _mm256_and_si256(bf16_rounded_bits(v), _mm256_set1_epi32(int(0xffff0000u))));
  }
  static reg round_as(reg v, fp16_t) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(bf16_t* p, reg v, int n) {
    const __m256i high = _mm256_srli_epi32(bf16_rounded_bits(v), 16);
    store16(p, _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)),
            n);
  }
  static void store(fp16_t* p, reg v, int n) {
    store16(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), n);
  }
  static void store16(void* p, __m128i halves, int n) {
    if (n == W) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), halves);
    } else {
      alignas(16) uint16_t lanes[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), halves);
      std::memcpy(p, lanes, static_cast<size_t>(n) * 2);
    }
  }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // a * 2^n by adding n to the exponent field; callers keep n >= -126 and a normal.
  static reg scale_pow2(reg a, reg n) {
    __m256i shift = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a), shift));
  }
  static mask nonzero(reg a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_OQ); }
  static mask ge(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static mask mand(mask a, mask b) { return _mm256_and_ps(a, b); }
  static reg select(mask m, reg a, reg b) { return _mm256_blendv_ps(b, a, m); }

  // In-register 8x8 transpose: rows[i][j] -> rows[j][i].
  static void transpose(reg* r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int q = 0; q < 8; q += 4) {  // rows q..q+3 -> columns within 128-bit lanes
      u[q + 0] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
      u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xEE);
      u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
      u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
      r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
    }
  }
  static double hsum(reg a) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, a);
    double s = 0.0;
    for (int i = 0; i < 8; ++i) s += lanes[i];
    return s;
  }
  // fp32 tree sum (fewer instructions than hsum: for dot products, not long accumulations)
  static float hsum_float(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif  // RLHF_ISA_AVX2

// ---------------------------------------------------------------------------------------------
#if defined(RLHF_ISA_AVX512)
struct VecAvx512 {
  static constexpr int W = 16;
  using reg = __m512;
  using mask = __mmask16;

  static __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p, int n) {
    return n == W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes(n), p);
  }
  static reg load(const bf16_t* p, int n) {
    __m256i raw = _mm256_maskz_loadu_epi16(lanes(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static reg load(const fp16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p));
  }
  static reg load_flag(const uint8_t* p, int n) {
    __m512i wide = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes(n), p));
    wide = _mm512_min_epu32(wide, _mm512_set1_epi32(1));
    return _mm512_cvtepi32_ps(wide);
  }
  static void store(float* p, reg v, int n) {
    if (n == W)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, lanes(n), v);
  }
  // 16-bit stores round to nearest even (float_to_bf16 / float_to_fp16, lane-wise).
  // fp32 bits rounded to nearest even at bit 16 (the bf16 in the high half), NaN quieted
  static __m512i bf16_rounded_bits(reg v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  }
  static reg round_as(reg v, float) { return v; }
  static reg round_as(reg v, bf16_t) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(bf16_rounded_bits(v), _mm512_set1_epi32(int(0xffff0000u))));
  }
  static reg round_as(reg v, fp16_t) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(bf16_t* p, reg v, int n) {
    const __m512i high = _mm512_srli_epi32(bf16_rounded_bits(v), 16);
    _mm256_mask_storeu_epi16(p, lanes(n), _mm512_cvtepi32_epi16(high));
  }
  static void store(fp16_t* p, reg v, int n) {
    _mm256_mask_storeu_epi16(p, lanes(n),
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg abs(reg a) { return _mm512_abs_ps(a); }
  static reg round(reg a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static reg scale_pow2(reg a, reg n) { return _mm512_scalef_ps(a, n); }
  static mask nonzero(reg a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_OQ); }
  static mask ge(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static mask mand(mask a, mask b) { return a & b; }
  static reg select(mask m, reg a, reg b) { return _mm512_mask_blend_ps(m, b, a); }

  // In-register 16x16 transpose: 4x4 blocks inside 128-bit lanes, then lanes across registers.
  static void transpose(reg* r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) {
      u[q + 0] = _mm512_shuffle_ps(t[q], t[q + 2], 0x44);
      u[q + 1] = _mm512_shuffle_ps(t[q], t[q + 2], 0xEE);
      u[q + 2] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0x44);
      u[q + 3] = _mm512_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
    }
    // u[q + k], lane L = column 4L + k of rows q..q+3.
    for (int k = 0; k < 4; ++k) {
      __m512 even_a = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88);
      __m512 even_b = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
      __m512 odd_a = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
      __m512 odd_b = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
      r[k] = _mm512_shuffle_f32x4(even_a, even_b, 0x88);
      r[8 + k] = _mm512_shuffle_f32x4(even_a, even_b, 0xDD);
      r[4 + k] = _mm512_shuffle_f32x4(odd_a, odd_b, 0x88);
      r[12 + k] = _mm512_shuffle_f32x4(odd_a, odd_b, 0xDD);
    }
  }
  static double hsum(reg a) {
    alignas(64) float lanes_[16];
    _mm512_store_ps(lanes_, a);
    double s = 0.0;
    for (int i = 0; i < 16; ++i) s += lanes_[i];
    return s;
  }
  // fp32 tree sum (fewer instructions than hsum: for dot products, not long accumulations)
  static float hsum_float(reg a) { return _mm512_reduce_add_ps(a); }
};
#endif  // RLHF_ISA_AVX512

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
