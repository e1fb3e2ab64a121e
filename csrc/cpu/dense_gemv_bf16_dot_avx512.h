// bf16 x bf16 few-row GEMV (M <= 16) with AVX512_BF16: y = x @ W.T for the decode step of a
// bf16 model on a CPU without AMX, x and W both bf16, fp32 sums, y rounded once to bf16. The
// avx512 kernel table points at it where the CPU reports AVX512_BF16 (isa_avx512.cpp); AMX
// tiles (dense_gemv_bf16_amx.cpp) keep priority where both exist.
//
// Why: dense_gemv_kernel.h widens every bf16 weight to fp32 before an FMA (16 products per
// FMA) and shares each weight load between at most 4 rows of x. vdpbf16ps multiplies 32 bf16
// weights by 32 bf16 inputs into 16 fp32 lanes (pairs summed): no conversion, and twice the
// products per instruction. On Intel's Xeon it issued at a quarter of an FMA's rate and lost
// (f25a977 / 409441d); on AMD's Zen 4 (EPYC, 3.7 GHz) one core ran 3.67 vdpbf16ps per ns
// (117 products per ns) and 3.67 FMAs (59): twice the products. Op-level numbers against
// torch and the widening kernel: decode_linear.py.
//
// Two schemes, by the number of rows (timed on Zen 4, one thread, 2000 x 256 in cache):
// - 1-7 rows (bf16_dot_rows): a block is all M rows of x by C output channels, each sum a
//   vector of 16 pair products of one row and one channel, summed across its lanes at the
//   end. M * C <= 24 sums stay in registers beside C weight vectors and one x vector (32 zmm);
//   C per M as measured: M = 1: C 8-16 alike (17 us), 24 spilled (32 us); M = 4: C 6 35 us,
//   4 41 us. Its cost is the end of each block (a tree of shuffles over the sums, M * C
//   roundings): with K = 256 a block has only 8 steps, and it ran at ~57 products per ns.
// - 8-16 rows (bf16_broadcast_rows): 16 channels' weights transposed in registers so that the
//   lanes are channels, then one vdpbf16ps per row against a broadcast pair of x; no sums
//   across lanes. 16 rows: 101 us (81 products per ns) against 141 us for the first scheme;
//   8 rows: 65 against 72 us; 6 rows: 57 against 52 us, so it starts at 8.
//
// Products of two bf16 are exact in fp32; the sums differ from a sequential fp32 sum only in
// their order. vdpbf16ps treats denormal inputs as zero and flushes denormal sums (by its
// definition, whatever MXCSR says): values below 1.2e-38, far under the resolution of the
// bf16 outputs.
//
// Compiled in isa_avx512bf16.cpp, under its target pragma and ISA namespace.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/simd.h"  // VecAvx512::store / float_to_bf16: torch's rounding of fp32 to bf16

namespace rlhf_fast {
namespace RLHF_ISA_NS {
namespace dense_bf16_dot {

constexpr int64_t kStep = 32;        // bf16 per vdpbf16ps
constexpr int kMaxSums = 24;         // zmm sums per block
constexpr int64_t kBroadcastRows = 8;  // from this many rows: bf16_broadcast_rows
// Rows of up to this many columns (2 KB) are prefetched a block ahead: a block reads 8-16 rows
// of 1 KB each, streams too short for the hardware prefetcher to ramp up. Zen 4, 2 threads,
// weights rotated over 96 MB, on / off interleaved: K = 512 1.05-1.16x (8 rows 13.1 -> 14.3
// and 14.3 -> 16.1 GB/s), K = 1376 1.00-1.06x; K = 2048 0.89-1.05x (8 and 16 rows slower: those
// rows stream well on their own, and the extra prefetches compete with them).
constexpr int64_t kPrefetchMaxK = 1024;

// Lane i of the result is the sum of the 16 lanes of v[i] (a tree of 15 vector adds and 30
// shuffles instead of 16 horizontal sums of ~7 dependent instructions each).
inline __m512 sum_lanes_16(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's part of a, b, c, d
    const __m512d p = _mm512_castps_pd(pairs[2 * i]), q = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes (x0+x1, x2+x3, y0+y1, y2+y3)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

// The R rows of x against channels [n, n + channels), channels <= C (missing channels re-read
// the first one's row and are not written). One loop covers whole steps and the tail:
// a masked load costs what a plain one does, and masked-off lanes read zeros, which add
// nothing and never touch memory past a row.
template <int R, int C>
void bf16_dot_block(const DenseGemvArgs& a, int64_t n, int channels) {
  static_assert(R * C <= kMaxSums, "the sums must fit in registers beside the loads");
  const int64_t K = a.K, ldw = a.ldw;
  const uint16_t* const weights = reinterpret_cast<const uint16_t*>(a.w);
  const uint16_t* const inputs = reinterpret_cast<const uint16_t*>(a.x_bf16);
  const uint16_t* w[C];
  const uint16_t* x[R];
  for (int c = 0; c < C; ++c) w[c] = weights + (n + (c < channels ? c : 0)) * ldw;
  for (int r = 0; r < R; ++r) x[r] = inputs + r * a.ldx;
  // The next block's rows (those that exist), read ahead: see kPrefetchMaxK.
  const bool ahead = n + C < a.N && K <= kPrefetchMaxK;
  const uint16_t* next[C];
  for (int c = 0; c < C; ++c) next[c] = weights + std::min<int64_t>(n + C + c, a.N - 1) * ldw;
  constexpr int kSums = (R * C + 15) / 16 * 16;  // whole groups of 16 for the reduction
  __m512 sums[kSums];
#pragma GCC unroll 32
  for (int i = 0; i < kSums; ++i) sums[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kStep) {
    const __mmask32 lanes =
        K - k >= kStep ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (K - k)) - 1);
    __m512bh wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(lanes, w[c] + k);
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(next[c] + k), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(lanes, x[r] + k);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) sums[r * C + c] = _mm512_dpbf16_ps(sums[r * C + c], xv, wv[c]);
    }
  }
  alignas(64) float totals[kSums];
#pragma GCC unroll 2
  for (int g = 0; g < kSums / 16; ++g)
    _mm512_store_ps(totals + 16 * g, sum_lanes_16(sums + 16 * g));
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < channels; ++c)
      a.y_bf16[r * a.N + n + c] =
          float_to_bf16(totals[r * C + c] + (a.bias ? a.bias[n + c] : 0.0f));
}

template <int R, int C>
void bf16_dot_rows(const DenseGemvArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += C)
    bf16_dot_block<R, C>(a, n, static_cast<int>(n_end - n < C ? n_end - n : C));
}

// --- Many rows: weights transposed in registers, x broadcast, no horizontal sums ---------
//
// A block of 16 channels is read 32 columns (16 bf16 pairs) at a time, 16 vectors of one
// channel each, and transposed (as 32-bit pairs) into 16 vectors of one pair each, with the
// 16 channels in the lanes; vdpbf16ps then multiplies each by one pair of a row of x broadcast
// to all lanes. Each sum vector holds 16 channels of one row, so the end is a vector add of the
// bias, a rounding and a store. The transpose (64 two-source permutes per 512 weights) is paid
// once for all rows, so it only pays off with many rows (dense_gemv_bf16_dot's choice).
constexpr int kChannelsPerBlock = 16;
constexpr int64_t kChunk = 512;  // columns transposed before they are used (16 KB: L1)

// The transpose exchanges bit j of the channel index with bit j of the lane index, j = 0..3:
// rows i and i + 2^j trade the lanes whose bit j differs.
struct TransposeIndex {
  __m512i low[4], high[4];
  TransposeIndex() {
    alignas(64) int32_t lo[16], hi[16];
    for (int j = 0; j < 4; ++j) {
      const int d = 1 << j;
      for (int l = 0; l < 16; ++l) {
        lo[l] = (l & d) ? 16 + l - d : l;
        hi[l] = (l & d) ? 16 + l : l + d;
      }
      low[j] = _mm512_load_si512(lo);
      high[j] = _mm512_load_si512(hi);
    }
  }
};

// buffer[p]: pair p of `columns` (a multiple of 32) columns from k0, of channels
// [n, n + channels) (lanes past `channels` zero; columns past K zero).
inline void transpose_chunk(const DenseGemvArgs& a, const TransposeIndex& index, int64_t n,
                            int channels, int64_t k0, int64_t columns, __m512i* buffer) {
  const uint16_t* const w = reinterpret_cast<const uint16_t*>(a.w) + n * a.ldw;
  // the next block's rows that exist, read ahead (see kPrefetchMaxK)
  const int64_t next_rows = a.K <= kPrefetchMaxK ? std::min<int64_t>(16, a.N - n - 16) : 0;
  for (int64_t k = k0; k < k0 + columns; k += kStep) {
    const __mmask32 lanes = a.K - k >= kStep ? ~__mmask32(0)
                            : a.K > k      ? static_cast<__mmask32>((uint64_t(1) << (a.K - k)) - 1)
                                           : __mmask32(0);
    __m512i v[16];
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      v[c] = c < channels ? _mm512_maskz_loadu_epi16(lanes, w + c * a.ldw + k)
                          : _mm512_setzero_si512();
      if (c < next_rows && k < a.K)
        _mm_prefetch(reinterpret_cast<const char*>(w + (16 + c) * a.ldw + k), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int d = 1 << j;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        if (i & d) continue;
        const __m512i lo = _mm512_permutex2var_epi32(v[i], index.low[j], v[i + d]);
        v[i + d] = _mm512_permutex2var_epi32(v[i], index.high[j], v[i + d]);
        v[i] = lo;
      }
    }
    __m512i* out = buffer + (k - k0) / 2;
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) _mm512_store_si512(out + p, v[p]);
  }
}

// All R rows of x against channels [n, n + channels), channels <= 16.
// x_pairs: pair p of row r at p * R + r (one cache line holds a pair of every row at R = 16).
template <int R>
void bf16_broadcast_block(const DenseGemvArgs& a, const TransposeIndex& index, int64_t n,
                          int channels, __m512i* buffer, const uint32_t* x_pairs) {
  __m512 sums[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < a.K; k0 += kChunk) {
    const int64_t columns = a.K - k0 < kChunk ? (a.K - k0 + kStep - 1) / kStep * kStep : kChunk;
    transpose_chunk(a, index, n, channels, k0, columns, buffer);
    const uint32_t* const xk = x_pairs + (k0 / 2) * R;
    for (int64_t p = 0; p < columns / 2; ++p) {
      const __m512bh wv = (__m512bh)_mm512_load_si512(buffer + p);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        sums[r] = _mm512_dpbf16_ps(
            sums[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(xk[p * R + r])), wv);
    }
  }
  const __mmask16 lanes = static_cast<__mmask16>((1u << channels) - 1u);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(lanes, a.bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    VecAvx512::store(a.y_bf16 + r * a.N + n, _mm512_add_ps(sums[r], bias), int(channels));
}

template <int R>
void bf16_broadcast_rows(const DenseGemvArgs& a, int64_t n_begin, int64_t n_end) {
  static const TransposeIndex index;
  alignas(64) __m512i buffer[kChunk / 2];
  // x pair-major, so that the R broadcasts of one pair read one or two cache lines, not R
  // lines a row apart (rows of 4 KB, K = 2048, fell in one L1 set: 5632 x 2048 at 16 rows
  // took 5.5 ms instead of 3.2 ms)
  const int64_t pairs = (a.K + kStep - 1) / kStep * (kStep / 2);
  std::vector<uint32_t> x_pairs(pairs * R);
  const uint32_t* const x = reinterpret_cast<const uint32_t*>(a.x_bf16);
  for (int r = 0; r < R; ++r)
    for (int64_t p = 0; p < pairs; ++p) x_pairs[p * R + r] = x[r * (a.ldx / 2) + p];
  for (int64_t n = n_begin; n < n_end; n += kChannelsPerBlock) {
    const int channels = static_cast<int>(n_end - n < 16 ? n_end - n : 16);
    bf16_broadcast_block<R>(a, index, n, channels, buffer, x_pairs.data());
  }
}

}  // namespace dense_bf16_dot

inline void dense_gemv_bf16_dot_channels(const DenseGemvArgs& a, int64_t n_begin,
                                         int64_t n_end) {
  using namespace dense_bf16_dot;
  static_assert(kBroadcastRows == 8, "the cases below start at 8 rows");
  if (a.M >= kBroadcastRows) {
    switch (a.M) {
      case 8: return bf16_broadcast_rows<8>(a, n_begin, n_end);
      case 9: return bf16_broadcast_rows<9>(a, n_begin, n_end);
      case 10: return bf16_broadcast_rows<10>(a, n_begin, n_end);
      case 11: return bf16_broadcast_rows<11>(a, n_begin, n_end);
      case 12: return bf16_broadcast_rows<12>(a, n_begin, n_end);
      case 13: return bf16_broadcast_rows<13>(a, n_begin, n_end);
      case 14: return bf16_broadcast_rows<14>(a, n_begin, n_end);
      case 15: return bf16_broadcast_rows<15>(a, n_begin, n_end);
      default: return bf16_broadcast_rows<16>(a, n_begin, n_end);
    }
  }
  switch (a.M) {  // channels per block: M * C <= 24 sums
    case 1: return bf16_dot_rows<1, 8>(a, n_begin, n_end);
    case 2: return bf16_dot_rows<2, 8>(a, n_begin, n_end);
    case 3: return bf16_dot_rows<3, 6>(a, n_begin, n_end);
    case 4: return bf16_dot_rows<4, 6>(a, n_begin, n_end);
    case 5: return bf16_dot_rows<5, 4>(a, n_begin, n_end);
    case 6: return bf16_dot_rows<6, 4>(a, n_begin, n_end);
    default: return bf16_dot_rows<7, 3>(a, n_begin, n_end);
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
