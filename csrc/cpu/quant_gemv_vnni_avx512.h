// int4 GEMV (M <= 16) for 16-bit activations with AVX512_VNNI, for group sizes that are a
// multiple of 128: the decode path of a bf16 / fp16 model.
//
// Why: at M = 1 the fp32 path spends ~6 instructions per 32 weights per channel on unpacking
// and FMAs, which makes it compute bound on 2 cores. Here the activations are quantized to int16
// per 128 columns (scale = max |x| / 32767) and vpdpwssd multiplies 32 codes by 32 activations,
// summing pairs into int32 lanes: ~13 instructions per 128 weights per channel. The group's
// scale and offset are applied once per 128 weights through the identity
//   sum_k (q_k * s + o) x_k = s * sum_k q_k x_k + o * sum_k x_k,
// with the quantized x_k in both terms, so the rounding error is sum_k w_k e_k as for a
// symmetric weight. int16 keeps that error at ~2e-5 of the output (int8 activations, as in
// llama.cpp, measured ~1e-2 here: too close to bf16's own tolerance); fp32 activations stay on
// the fp32 path, which is exact to fp32 rounding.
//
// The 64 packed bytes of 128 columns are read as two halves of 32 bytes; byte p of half h
// holds the code of column 64h + 32(p/16) + p%16 in its low nibble and that + 16 in its high
// nibble. The caller stores the quantized x of each 128 columns in the matching order: for
// h = 0, 1, the 32 low-nibble columns, then the 32 high-nibble columns.
#pragma once

#include "cpu/quant_matmul_kernel.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <int MR, int NR>
void int4_vnni_tile(const QuantMatmulArgs& a, int64_t m0, int64_t n0) {
  __m512 acc[MR][NR];
  float offset_terms[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) {
      acc[m][j] = _mm512_setzero_ps();
      offset_terms[m][j] = 0.0f;
    }
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j)
    rows[j] = static_cast<const uint8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
  const __m512i low_nibbles = _mm512_set1_epi16(0x0F);
  const int64_t chunks_per_group = a.group_size / 128;
  for (int64_t c = 0; c < a.x_chunks; ++c) {
    const int64_t group = c / chunks_per_group;
    __m512i codes[NR][4];  // 32 codes each, in the x layout's order
    float scale[NR];
    for (int j = 0; j < NR; ++j) {
      __builtin_prefetch(rows[j] + 64 * c + 1024, 0, 3);
      for (int h = 0; h < 2; ++h) {
        const __m512i bytes = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + 64 * c + 32 * h)));
        codes[j][2 * h] = _mm512_and_si512(bytes, low_nibbles);
        codes[j][2 * h + 1] = _mm512_srli_epi16(bytes, 4);
      }
      const int64_t at = (n0 + j) * a.group_row_stride + group;
      scale[j] = half_bits_to_float(a.scales_f16[at]);
      const float offset = half_bits_to_float(a.offsets_f16[at]);
      for (int m = 0; m < MR; ++m)
        offset_terms[m][j] += offset * a.x_sums[(m0 + m) * a.x_chunks + c];
    }
    for (int m = 0; m < MR; ++m) {
      const int16_t* xq = a.x_q + ((m0 + m) * a.x_chunks + c) * 128;
      __m512i x[4];
      for (int i = 0; i < 4; ++i) x[i] = _mm512_loadu_si512(xq + 32 * i);
      const float x_scale = a.x_scales[(m0 + m) * a.x_chunks + c];
      for (int j = 0; j < NR; ++j) {
        __m512i dot = _mm512_madd_epi16(codes[j][0], x[0]);
        dot = _mm512_dpwssd_epi32(dot, codes[j][1], x[1]);
        dot = _mm512_dpwssd_epi32(dot, codes[j][2], x[2]);
        dot = _mm512_dpwssd_epi32(dot, codes[j][3], x[3]);
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale[j] * x_scale),
                                    acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* y = a.y + (m0 + m) * a.y_row_stride + n0;
    for (int j = 0; j < NR; ++j)
      y[j] = (a.bias ? a.bias[n0 + j] : 0.0f) + offset_terms[m][j] + reduce_add(acc[m][j]);
  }
}

struct VnniTileTable {
  using Fn = void (*)(const QuantMatmulArgs&, int64_t, int64_t);
  Fn fn[4][4];
  VnniTileTable() { fill<0>(); }
  template <int I>
  void fill() {
    if constexpr (I < 16) {
      fn[I / 4][I % 4] = &int4_vnni_tile<I / 4 + 1, I % 4 + 1>;
      fill<I + 1>();
    }
  }
};

inline void quant_gemv_int4_vnni_channels(const QuantMatmulArgs& a, int64_t n_begin,
                                          int64_t n_end) {
  static const VnniTileTable tiles;
  for (int64_t n = n_begin; n < n_end; n += 4) {
    const int64_t nr = n_end - n < 4 ? n_end - n : 4;
    for (int64_t m = 0; m < a.M; m += 4) {
      const int64_t mr = a.M - m < 4 ? a.M - m : 4;
      tiles.fn[mr - 1][nr - 1](a, m, n);
    }
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
