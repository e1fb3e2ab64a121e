// int4 quant_matmul for bf16 activations with AVX512_BF16 (vdpbf16ps): the GEMM path (M > 1).
//
// Why: with fp32 FMAs a 4096 x 11008 GEMM at M = 128 is bound by FMA throughput (one
// instruction per 16 multiply-adds). vdpbf16ps does 32 per instruction. bf16 activations are
// exact in bf16, so only the weights are rounded: each group's 16 possible values
// q * scale + offset are rounded to bf16 (relative error <= 2^-9 per weight, the precision
// torch's own bf16 int4 kernels work at; the sums stay fp32). fp32 and fp16 activations keep
// the fp32 path (quant_matmul_kernel.h), which is exact to fp32 rounding.
//
// Unpacking a 32-weight block (16 bytes; byte j = q[j] | q[16 + j] << 4) costs four
// instructions: zero-extend the bytes to 32-bit lanes, OR in a copy shifted left by 12 so the
// lane's high word is q[16 + j] and its low word's low 4 bits are q[j], then vpermw looks both
// words up in the group's 32-entry table (entry i = bf16 of (i & 15) * scale + offset; vpermw
// reads only the low 5 bits of each index). Lane j then holds the pair (w[j], w[16 + j]), so the
// caller lays x out in the same pair order: x_pairs[32b + 2j] = x[32b + j],
// x_pairs[32b + 2j + 1] = x[32b + 16 + j], zero past K.
#pragma once

#include "cpu/quant_matmul_kernel.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

inline __m512i bf16_group_table(float scale, float offset) {
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 values =
      _mm512_add_ps(_mm512_mul_ps(codes, _mm512_set1_ps(scale)), _mm512_set1_ps(offset));
  const __m256i half = (__m256i)_mm512_cvtneps_pbh(values);
  return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
}

inline __m512i bf16_block(const uint8_t* bytes, __m512i table) {
  __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  q = _mm512_or_si512(q, _mm512_slli_epi32(q, 12));
  return _mm512_permutexvar_epi16(q, table);
}

template <int MR, int NR>
void int4_bf16_tile(const QuantMatmulArgs& a, int64_t m0, int64_t n0, int64_t block_begin,
                    int64_t block_end) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j)
    rows[j] = static_cast<const uint8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
  const uint16_t* xs = a.x_bf16_pairs + m0 * a.x_row_stride;
  const int64_t blocks_per_group = a.group_size / 32;

  for (int64_t b = block_begin; b < block_end;) {
    const int64_t group = b / blocks_per_group;
    const int64_t group_end = (group + 1) * blocks_per_group;
    const int64_t stop = group_end < block_end ? group_end : block_end;
    __m512i tables[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t at = (n0 + j) * a.group_row_stride + group;
      tables[j] = bf16_group_table(half_bits_to_float(a.scales_f16[at]),
                                   half_bits_to_float(a.offsets_f16[at]));
    }
    for (; b < stop; ++b) {
      __m512i w[NR];
      for (int j = 0; j < NR; ++j) w[j] = bf16_block(rows[j] + 16 * b, tables[j]);
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_loadu_si512(xs + m * a.x_row_stride + 32 * b);
        for (int j = 0; j < NR; ++j)
          acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)w[j], (__m512bh)xv);
      }
    }
  }
  finish_tile<VecAvx512, MR, NR>(a, m0, n0, block_begin == 0, acc, nullptr);
}

constexpr int kBf16MaxRows = 8;
constexpr int kBf16MaxChannels = 3;

template <int MR>
inline void fill_bf16_row(TileFn (&row)[kBf16MaxChannels]) {
  row[0] = &int4_bf16_tile<MR, 1>;
  row[1] = &int4_bf16_tile<MR, 2>;
  row[2] = &int4_bf16_tile<MR, 3>;
}

struct Bf16TileTable {
  TileFn fn[kBf16MaxRows][kBf16MaxChannels];
  Bf16TileTable() {
    fill_bf16_row<1>(fn[0]);
    fill_bf16_row<2>(fn[1]);
    fill_bf16_row<3>(fn[2]);
    fill_bf16_row<4>(fn[3]);
    fill_bf16_row<5>(fn[4]);
    fill_bf16_row<6>(fn[5]);
    fill_bf16_row<7>(fn[6]);
    fill_bf16_row<8>(fn[7]);
  }
};

// Output channels [n_begin, n_end); the same loop nest as quant_matmul_channels.
inline void quant_matmul_int4_bf16_channels(const QuantMatmulArgs& a, int64_t n_begin,
                                            int64_t n_end) {
  static const Bf16TileTable tiles;
  const int64_t blocks = (a.K + 31) / 32;
  const int64_t l2_blocks = (int64_t(1) << 18) / (32 * a.M);  // 512 KiB of bf16 x
  const int64_t chunk = a.M <= kBf16MaxRows ? blocks : (l2_blocks < 16 ? 16 : l2_blocks);
  constexpr int64_t kChannelsPerPass = 24;
  for (int64_t pass = n_begin; pass < n_end; pass += kChannelsPerPass) {
    const int64_t pass_end = pass + kChannelsPerPass < n_end ? pass + kChannelsPerPass : n_end;
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
      const int64_t b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
      for (int64_t n = pass; n < pass_end; n += kBf16MaxChannels) {
        const int64_t nr = pass_end - n < kBf16MaxChannels ? pass_end - n : kBf16MaxChannels;
        for (int64_t m = 0; m < a.M; m += kBf16MaxRows) {
          const int64_t mr = a.M - m < kBf16MaxRows ? a.M - m : kBf16MaxRows;
          tiles.fn[mr - 1][nr - 1](a, m, n, b0, b1);
        }
      }
    }
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
