// int4 GEMV (M <= 16) with AVX512_BF16, any group size (a multiple of 32), any float x.
//
// Why: at M = 1 the fp32 kernel (quant_matmul_kernel.h) spends ~10 vector instructions per 32
// weights at group 32 (a 16-entry value table per group, two vpermps, two FMAs) and the VNNI
// GEMV (quant_gemv_vnni_avx512.h) needs groups of 128: both ran at 5-8 GB/s of weights on a
// Zen 4 core against ~29 GB/s that the memory delivers, below torch's int4pack. Here a code
// q (0..15) becomes a bf16 word with one OR: 0x4300 | q is exactly 128 + q, so vdpbf16ps
// multiplies 32 codes by 32 bf16 activations per instruction with exact products, summed in
// fp32. The 128 comes back out in the same sums: each pair's dot product starts from
// -128 * (the sum of the x its lane multiplies), precomputed per call (x_pair_bias), so the
// large terms cancel within a few products instead of in the output (starting from zero and
// subtracting 128 * sum x per group measured ~30x the fp32 kernel's error; this, 3-7x, about
// 1e-6 of max |y| at K = 1000).
// Then sum_k (q_k s + o) x_k = s * sum_k q_k x_k + o * sum_k x_k, with sum_k x_k per group
// (fp32) also from the caller.
//
// x is exact: the caller splits it into x_parts bf16 terms that sum to x (bf16 x: 1; fp16:
// 2, its 11 significant bits; fp32: 3, its 24), and each term is one more vdpbf16ps on the same
// unpacked codes. The products are exact; sums are fp32, so the result differs from fp32
// FMAs on dequantize()'s values by fp32 rounding of the (128 + q)-scaled terms (~1e-6 of y).
//
// Layout: 64 columns (two 32-weight blocks, 32 packed bytes) at a time. Zero-extending the
// 32 bytes to words puts block 0's bytes in words 0-15 and block 1's in 16-31; byte p of a
// block holds column p (low nibble) and p + 16 (high nibble). So the caller stores, per pair
// and per term, 32 words for the low nibbles (block 0 columns 0-15, block 1 columns 0-15) then
// 32 for the high nibbles (columns 16-31 of each), zero past K. vdpbf16ps sums word pairs into
// fp32 lanes: lanes 0-7 belong to block 0, 8-15 to block 1, so one FMA applies both blocks'
// scales, picked from the 16 scales of a window of groups by the lane table pair_groups
// (group of the lane's block minus the window's first group), which repeats every window:
// one table per pair of a window (its [pairs, 16] form cost a 64-byte line per pair beside x's
// and measured 3-7% slower at one row, weights from DRAM, Zen 4).
//
// Prefetch: each tile loads the next tile's codes (one line per channel per two pairs) with
// prefetcht0 while a tile's x terms, its biases and two tiles' codes fit in 24 KB, else with
// prefetcht1. Long rows outgrow the L1: at K = 5632, one row, bf16 x, that set is ~39 KB
// against Zen 4's 32 KB, and prefetcht1 (which behaved there as a fill of L2 only) measured
// 1.10-1.14x prefetcht0 at K = 4096-8192 (fp32 x 1.03-1.05x), weights from DRAM, one thread;
// at K = 2048 (~14 KB) it measured 0.91x. Presumably prefetcht0's lines were evicted from L1
// before their use (this VM has no cache counters to show it). Blocking K so x stays in L1
// (walking every tile over a few windows, then the next windows) measured 0.7-0.8x: short
// runs of each row read from DRAM more slowly than whole rows.
#pragma once

#include "cpu/quant_matmul_kernel.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

inline __mmask16 bf16dot_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Locality: __builtin_prefetch's hint for the next tile's codes (3: prefetcht0, 2: prefetcht1).
template <int S, int MR, int NR, int Locality>
void int4_bf16dot_tile(const QuantMatmulArgs& a, int64_t m0, int64_t n0) {
  const int64_t groups = a.group_row_stride;
  const int64_t blocks = (a.K + 31) / 32, pairs = (blocks + 1) / 2;
  const int64_t pairs_per_window = a.group_size / 4;  // 16 groups of group_size / 64 pairs
  const uint8_t* rows[NR];
  __m512 acc[MR][NR];
  for (int j = 0; j < NR; ++j) {
    rows[j] = static_cast<const uint8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
    for (int m = 0; m < MR; ++m) acc[m][j] = _mm512_setzero_ps();
  }
  // As in int4_gemv_tile_avx512: the next tile's rows follow this tile's in memory and are
  // prefetched in address order, its scales up front.
  const uint8_t* next_tile = rows[0] + NR * a.qdata_row_stride;
  {
    const char* s0 = reinterpret_cast<const char*>(a.scales_f16 + (n0 + NR) * groups);
    const char* o0 = reinterpret_cast<const char*>(a.offsets_f16 + (n0 + NR) * groups);
    for (int64_t at = 0; at < NR * groups * 2; at += 64) {
      __builtin_prefetch(s0 + at, 0, 3);
      __builtin_prefetch(o0 + at, 0, 3);
    }
  }
  const __m512i nibble = _mm512_set1_epi16(0x0F), exponent = _mm512_set1_epi16(0x4300);
  for (int64_t window = 0; 16 * window < groups; ++window) {
    const __mmask16 present = bf16dot_lanes(groups - 16 * window);
    __m512 scales[NR];
    for (int j = 0; j < NR; ++j) {
      const int64_t at = (n0 + j) * groups + 16 * window;
      scales[j] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(present, a.scales_f16 + at));
      const __m512 offsets =
          _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(present, a.offsets_f16 + at));
      for (int m = 0; m < MR; ++m)
        acc[m][j] = _mm512_fmadd_ps(
            offsets,
            _mm512_loadu_ps(a.x_group_sums + (m0 + m) * a.x_group_sums_stride + 16 * window),
            acc[m][j]);
    }
    const int64_t first = window * pairs_per_window;
    const int64_t end = first + pairs_per_window < pairs ? first + pairs_per_window : pairs;
    for (int64_t p = first; p < end; ++p) {
      const __m512i pick = _mm512_loadu_si512(a.pair_groups + 16 * (p - first));
      // An odd last block: its pair's second half lies past the row (x is zero there).
      const bool whole = 2 * p + 1 < blocks;
      __m512i lo[NR], hi[NR];
      __m512 pair_scales[NR];
      for (int j = 0; j < NR; ++j) {
        if ((p & 1) == 0) __builtin_prefetch(next_tile + (p / 2 * NR + j) * 64, 0, Locality);
        const uint8_t* packed = rows[j] + 32 * p;
        const __m512i words = _mm512_cvtepu8_epi16(
            whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed))
                  : _mm256_maskz_loadu_epi8(__mmask32(0xFFFF), packed));
        lo[j] = _mm512_ternarylogic_epi32(words, nibble, exponent, 0xEA);  // (w & 15) | 0x4300
        hi[j] = _mm512_or_si512(_mm512_srli_epi16(words, 4), exponent);
        pair_scales[j] = _mm512_permutexvar_ps(pick, scales[j]);
      }
      for (int m = 0; m < MR; ++m) {
        const uint16_t* x = a.x_bf16 + (m0 + m) * a.x_bf16_row_stride + p * S * 64;
        __m512bh x_lo[S], x_hi[S];
        for (int t = 0; t < S; ++t) {
          x_lo[t] = (__m512bh)_mm512_loadu_si512(x + 64 * t);
          x_hi[t] = (__m512bh)_mm512_loadu_si512(x + 64 * t + 32);
        }
        const __m512 bias =
            _mm512_loadu_ps(a.x_pair_bias + (m0 + m) * a.x_pair_bias_row_stride + 16 * p);
        for (int j = 0; j < NR; ++j) {
          __m512 dot = _mm512_dpbf16_ps(bias, (__m512bh)lo[j], x_lo[0]);
          dot = _mm512_dpbf16_ps(dot, (__m512bh)hi[j], x_hi[0]);
          for (int t = 1; t < S; ++t) {
            dot = _mm512_dpbf16_ps(dot, (__m512bh)lo[j], x_lo[t]);
            dot = _mm512_dpbf16_ps(dot, (__m512bh)hi[j], x_hi[t]);
          }
          acc[m][j] = _mm512_fmadd_ps(dot, pair_scales[j], acc[m][j]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* y = a.y + (m0 + m) * a.y_row_stride + n0;
    for (int j = 0; j < NR; ++j) y[j] = (a.bias ? a.bias[n0 + j] : 0.0f) + reduce_add(acc[m][j]);
  }
}

// fn[prefetch into L1][rows - 1][channels - 1] for one number of x terms S.
template <int S>
struct Bf16DotTiles {
  using Fn = void (*)(const QuantMatmulArgs&, int64_t, int64_t);
  Fn fn[2][4][4];
  Bf16DotTiles() { fill<0>(); }
  template <int I>
  void fill() {
    if constexpr (I < 32) {
      constexpr int near = I / 16, rows = I % 16 / 4 + 1, channels = I % 4 + 1;
      fn[near][rows - 1][channels - 1] = &int4_bf16dot_tile<S, rows, channels, near ? 3 : 2>;
      fill<I + 1>();
    }
  }
};

// Whether a tile's working set fits in L1 with room to spare (3/4 of a 32 KB L1): every
// row's x terms and biases for the whole K, this tile's codes and the next tile's.
inline bool bf16dot_fits_l1(const QuantMatmulArgs& a, int64_t terms, int64_t width) {
  const int64_t pairs = (a.K + 63) / 64;
  const int64_t x_bytes = a.M * pairs * (terms * 128 + 64);
  return x_bytes + 2 * width * a.qdata_row_stride <= 24 * 1024;
}

template <int S>
void bf16dot_channels(const QuantMatmulArgs& a, int64_t n_begin, int64_t n_end) {
  static const Bf16DotTiles<S> tiles;
  // 4 channels a tile for up to 2 rows, else 2: MR x NR accumulators, 2 NR unpacked codes and
  // NR scale vectors must fit the 32 registers.
  const int64_t width = a.M <= 2 ? 4 : 2;
  const auto& fn = tiles.fn[bf16dot_fits_l1(a, S, width) ? 1 : 0];
  for (int64_t n = n_begin; n < n_end; n += width) {
    const int64_t nr = n_end - n < width ? n_end - n : width;
    for (int64_t m = 0; m < a.M; m += 4) {
      const int64_t mr = a.M - m < 4 ? a.M - m : 4;
      fn[mr - 1][nr - 1](a, m, n);
    }
  }
}

inline void quant_gemv_int4_bf16dot_channels(const QuantMatmulArgs& a, int64_t n_begin,
                                             int64_t n_end) {
  if (a.x_parts == 1) return bf16dot_channels<1>(a, n_begin, n_end);
  if (a.x_parts == 2) return bf16dot_channels<2>(a, n_begin, n_end);
  bf16dot_channels<3>(a, n_begin, n_end);
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
