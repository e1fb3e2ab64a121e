// Decode GEMVs with AVX512_VNNI (see decode_gemv.h for the arithmetic and the layouts).
// Only called after a run-time check that the CPU has AVX512_VNNI (decode_gemv_op.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,popcnt")
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/decode_gemv.h"

namespace rlhf_fast::avx512vnni {
namespace {

inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline __mmask32 first_lanes32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// Codes of 16 floats with 1 / s = inverse, round to nearest even (the default MXCSR mode).
inline __m512i codes_of(__m512 v, __m512 inverse) {
  return _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse));
}

inline float inverse_of(float amax) { return amax > 0.0f ? 32767.0f / amax : 0.0f; }

// Where the int8 codes of a block's low (hi = 0) or high (hi = 1) 16 columns go: per quad of
// blocks, 64 low-nibble codes then 64 high-nibble codes, in the order of the packed bytes.
inline int64_t int4_code_offset(int64_t block, int hi) {
  return 128 * (block / 4) + 64 * hi + 16 * (block % 4);
}

// Lanes holding a NaN or an inf (quiet NaN | +inf | -inf | signaling NaN).
inline __mmask16 non_finite(__m512 v) { return _mm512_fpclass_ps_mask(v, 0x99); }

}  // namespace

bool quantize_int4_activations(const float* x, int64_t x_stride, int64_t M, int64_t K,
                               int64_t chunks, int8_t* codes, float* scales, float* sums) {
  const int64_t blocks = (K + 31) / 32;
  __mmask16 bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * x_stride;
    int8_t* row_codes = codes + m * chunks * 32;
    float* row_scales = scales + m * chunks;
    float* row_sums = sums + m * chunks;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k = 32 * b;
      const __m512 lo = _mm512_maskz_loadu_ps(first_lanes16(K - k), row + k);
      const __m512 hi = _mm512_maskz_loadu_ps(first_lanes16(K - k - 16), row + k + 16);
      bad |= non_finite(lo) | non_finite(hi);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i code_lo = codes_of(lo, inverse), code_hi = codes_of(hi, inverse);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row_codes + int4_code_offset(b, 0)),
                       _mm512_cvtepi32_epi8(code_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row_codes + int4_code_offset(b, 1)),
                       _mm512_cvtepi32_epi8(code_hi));
      const float scale = amax / 127.0f;
      row_scales[b] = scale;
      row_sums[b] = scale * float(_mm512_reduce_add_epi32(_mm512_add_epi32(code_lo, code_hi)));
    }
    for (int64_t b = blocks; b < chunks; ++b) {
      std::memset(row_codes + int4_code_offset(b, 0), 0, 16);
      std::memset(row_codes + int4_code_offset(b, 1), 0, 16);
      row_scales[b] = row_sums[b] = 0.0f;
    }
  }
  return bad == 0;
}

bool quantize_int8_activations(const float* x, int64_t x_stride, int64_t M, int64_t K,
                               int64_t chunks, int16_t* codes, float* scales) {
  __mmask16 bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * x_stride;
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 v[8];
      __m512 amax = _mm512_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        const int64_t k = 128 * c + 16 * i;
        v[i] = _mm512_maskz_loadu_ps(first_lanes16(K - k), row + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        bad |= non_finite(v[i]);
      }
      const float max_abs = _mm512_reduce_max_ps(amax);
      const __m512 inverse = _mm512_set1_ps(inverse_of(max_abs));
      int16_t* out = codes + (m * chunks + c) * 128;
      for (int i = 0; i < 8; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i),
                            _mm512_cvtepi32_epi16(codes_of(v[i], inverse)));
      scales[m * chunks + c] = max_abs / 32767.0f;
    }
  }
  return bad == 0;
}

namespace {

// The NR channels' per-block factors of one 16-block window: scale of the block's group times
// the block's activation scale, and the offset terms (offset * s * sum of codes) summed.
template <int NR>
inline void window_factors(const DecodeGemvArgs& a, int64_t m, int64_t n0, int64_t window,
                           __m512 (&factors)[NR], __m512 (&offset_acc)[NR]) {
  const int64_t base = window * 16 * 32 / a.group_size;
  const __mmask16 present = first_lanes16(a.groups - base);
  const __m512i index =
      _mm512_loadu_si512(reinterpret_cast<const void*>(a.group_index + 16 * window));
  const __m512 x_scales = _mm512_loadu_ps(a.x.scales + m * a.x.chunks + 16 * window);
  const __m512 x_sums = _mm512_loadu_ps(a.x.sums + m * a.x.chunks + 16 * window);
  for (int j = 0; j < NR; ++j) {
    const int64_t at = (n0 + j) * a.groups + base;
    const __m512 scales = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(present, a.scales_f16 + at));
    const __m512 offsets =
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(present, a.offsets_f16 + at));
    factors[j] = _mm512_mul_ps(_mm512_permutexvar_ps(index, scales), x_scales);
    offset_acc[j] =
        _mm512_fmadd_ps(_mm512_permutexvar_ps(index, offsets), x_sums, offset_acc[j]);
  }
}

template <int NR>
void int4_tile(const DecodeGemvArgs& a, int64_t m, int64_t n0) {
  const int64_t blocks = (a.K + 31) / 32;
  const int64_t quads = (blocks + 3) / 4;
  const uint8_t* rows[NR];
  __m512 acc[NR], offset_acc[NR];
  for (int j = 0; j < NR; ++j) {
    rows[j] = static_cast<const uint8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
    acc[j] = offset_acc[j] = _mm512_setzero_ps();
  }
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const int8_t* codes = static_cast<const int8_t*>(a.x.codes) + m * a.x.row_codes;
  // Lane i of a quad's int32 dot products belongs to its block i / 4.
  const __m512i first_quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t window = 0; 16 * window < blocks; ++window) {
    __m512 factors[NR];
    window_factors<NR>(a, m, n0, window, factors, offset_acc);
    const int64_t quad_end = std::min(quads, 4 * window + 4);
    __m512i pick = first_quad;
    for (int64_t q = 4 * window; q < quad_end; ++q) {
      const bool whole = 4 * q + 4 <= blocks;  // the last quad may hold 1 to 3 blocks
      const __mmask64 present = whole ? ~__mmask64(0) : (__mmask64(1) << (16 * (blocks - 4 * q))) - 1;
      const __m512i x_lo = _mm512_loadu_si512(codes + 128 * q);
      const __m512i x_hi = _mm512_loadu_si512(codes + 128 * q + 64);
      for (int j = 0; j < NR; ++j) {
        const uint8_t* bytes = rows[j] + 64 * q;
        __builtin_prefetch(bytes + 1024, 0, 3);
        const __m512i packed = whole ? _mm512_loadu_si512(bytes) : _mm512_maskz_loadu_epi8(present, bytes);
        const __m512i lo = _mm512_and_si512(packed, low_nibbles);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x_lo);
        dot = _mm512_dpbusd_epi32(dot, hi, x_hi);
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                 _mm512_permutexvar_ps(pick, factors[j]), acc[j]);
      }
      pick = _mm512_add_epi32(pick, _mm512_set1_epi32(4));
    }
  }
  float* y = a.y + m * a.y_row_stride + n0;
  for (int j = 0; j < NR; ++j)  // one horizontal sum of both terms (K = 576: ~20% of the work)
    y[j] = (a.bias ? a.bias[n0 + j] : 0.0f) +
           _mm512_reduce_add_ps(_mm512_add_ps(acc[j], offset_acc[j]));
}

template <int NR>
void int8_tile(const DecodeGemvArgs& a, int64_t m, int64_t n0) {
  const int8_t* rows[NR];
  __m512 acc[NR];
  for (int j = 0; j < NR; ++j) {
    rows[j] = static_cast<const int8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
    acc[j] = _mm512_setzero_ps();
  }
  const int16_t* codes = static_cast<const int16_t*>(a.x.codes) + m * a.x.row_codes;
  const int64_t full_chunks = a.K / 128;
  const int64_t chunks = (a.K + 127) / 128;
  for (int64_t c = 0; c < chunks; ++c) {
    const bool full = c < full_chunks;
    __m512i x[4];
    for (int i = 0; i < 4; ++i) x[i] = _mm512_loadu_si512(codes + 128 * c + 32 * i);
    const __m512 x_scale = _mm512_set1_ps(a.x.scales[m * a.x.chunks + c]);
    for (int j = 0; j < NR; ++j) {
      const int8_t* w = rows[j] + 128 * c;
      __builtin_prefetch(w + 1024, 0, 3);
      __m512i dot = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        const __m256i bytes =
            full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * i))
                 : _mm256_maskz_loadu_epi8(first_lanes32(a.K - 128 * c - 32 * i), w + 32 * i);
        dot = _mm512_dpwssd_epi32(dot, _mm512_cvtepi8_epi16(bytes), x[i]);
      }
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), x_scale, acc[j]);
    }
  }
  float* y = a.y + m * a.y_row_stride + n0;
  for (int j = 0; j < NR; ++j)
    y[j] = (a.bias ? a.bias[n0 + j] : 0.0f) + a.scales_f32[n0 + j] * _mm512_reduce_add_ps(acc[j]);
}

template <template <int> class Tile>
struct Tiles {
  using Fn = void (*)(const DecodeGemvArgs&, int64_t, int64_t);
  static constexpr Fn fn[4] = {&Tile<1>::run, &Tile<2>::run, &Tile<3>::run, &Tile<4>::run};
};
template <int NR>
struct Int4Tile {
  static void run(const DecodeGemvArgs& a, int64_t m, int64_t n0) { int4_tile<NR>(a, m, n0); }
};
template <int NR>
struct Int8Tile {
  static void run(const DecodeGemvArgs& a, int64_t m, int64_t n0) { int8_tile<NR>(a, m, n0); }
};

template <template <int> class Tile>
void channels(const DecodeGemvArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += 4) {
    const int64_t nr = std::min<int64_t>(4, n_end - n);
    for (int64_t m = 0; m < a.M; ++m) Tiles<Tile>::fn[nr - 1](a, m, n);
  }
}

}  // namespace

void decode_gemv_int4(const DecodeGemvArgs& args, int64_t n_begin, int64_t n_end) {
  channels<Int4Tile>(args, n_begin, n_end);
}

void decode_gemv_int8(const DecodeGemvArgs& args, int64_t n_begin, int64_t n_end) {
  channels<Int8Tile>(args, n_begin, n_end);
}

}  // namespace rlhf_fast::avx512vnni
