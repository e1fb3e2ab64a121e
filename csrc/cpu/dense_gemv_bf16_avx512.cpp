// bf16 x bf16 few-row GEMV (M <= 16) with AVX512_BF16: y = x @ W.T for the decode step of a
// bf16 model, x and W both bf16, fp32 sums. The avx512 kernel table points at it after a
// run-time check of the CPU (isa_avx512.cpp); other CPUs keep dense_gemv_kernel.h's path.
//
// Why: the generic kernel widens every bf16 weight to fp32 (two instructions per 16 weights)
// before an FMA, and re-reads each weight row once per block of 4 rows of x: at 8 rows it was
// slower than torch's bf16 F.linear. vdpbf16ps multiplies 32 bf16 weights by 32 bf16 inputs
// and adds the products, pair by pair, into 16 fp32 lanes: one instruction per 32 weights and
// row, no conversion. A block holds R rows of x by C output channels (R * C <= 16 sums in
// registers), so up to 8 rows share each weight load; 9-16 rows take two row blocks over the
// same 8-channel tile, whose second pass reads the weights from L1, not from memory.
//
// Products of two bf16 are exact in fp32; the sums differ from a sequential fp32 sum only in
// their order. vdpbf16ps treats denormal inputs as zero and flushes denormal sums (its
// definition, whatever MXCSR says): values below 1.2e-38, far under bf16's resolution of the
// outputs.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,popcnt")
#include <immintrin.h>

#include "cpu/kernels.h"

namespace rlhf_fast::avx512bf16 {
namespace {

constexpr int64_t kTileChannels = 8;  // channels whose weights both row blocks share
constexpr int64_t kStep = 32;         // bf16 per vdpbf16ps

// Lane i of the result is the sum of the 16 lanes of v[i]: a tree of 15 vector adds and 30
// shuffles, instead of 16 separate horizontal sums (~7 dependent instructions each).
inline __m512 sum_lanes_16(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5,
                           __m512 v6, __m512 v7, __m512 v8, __m512 v9, __m512 v10, __m512 v11,
                           __m512 v12, __m512 v13, __m512 v14, __m512 v15) {
  const __m512 v[16] = {v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15};
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

// Rows [m0, m0 + R) of x against channels [n, n + channels), channels <= C (missing channels
// re-read the first one's row and are not written). Each weight row is prefetched 8 cache
// lines ahead: C streams per thread keep more DRAM requests in flight than the hardware
// prefetcher alone for weights beyond the last-level cache.
template <int R, int C>
void bf16_dot_block(const DenseGemvArgs& a, int64_t m0, int64_t n, int channels) {
  static_assert(R * C <= 16, "the sums must fit in registers beside the loads");
  constexpr int64_t kAhead = 256;  // bf16: 512 bytes
  const int64_t K = a.K, ldw = a.ldw;
  const uint16_t* const weights = reinterpret_cast<const uint16_t*>(a.w);
  const uint16_t* const inputs = reinterpret_cast<const uint16_t*>(a.x_bf16);
  const uint16_t* w[C];
  const uint16_t* x[R];
  for (int c = 0; c < C; ++c) w[c] = weights + (n + (c < channels ? c : 0)) * ldw;
  for (int r = 0; r < R; ++r) x[r] = inputs + (m0 + r) * K;
  __m512 sums[16];
  for (int i = 0; i < 16; ++i) sums[i] = _mm512_setzero_ps();
  // one loop for whole steps and the tail: a masked load costs what a plain one does, and the
  // masked-off lanes read zeros, so they add nothing (a lambda per step kept the sums in memory)
  for (int64_t k = 0; k < K; k += kStep) {
    const __mmask32 lanes =
        K - k >= kStep ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (K - k)) - 1);
    __m512bh wv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      __builtin_prefetch(w[c] + k + kAhead);
      wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(lanes, w[c] + k);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(lanes, x[r] + k);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) sums[r * C + c] = _mm512_dpbf16_ps(sums[r * C + c], xv, wv[c]);
    }
  }
  alignas(64) float totals[16];
  _mm512_store_ps(totals, sum_lanes_16(sums[0], sums[1], sums[2], sums[3], sums[4], sums[5],
                                        sums[6], sums[7], sums[8], sums[9], sums[10], sums[11],
                                        sums[12], sums[13], sums[14], sums[15]));
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < channels; ++c)
      a.y[(m0 + r) * a.N + n + c] = totals[r * C + c] + (a.bias ? a.bias[n + c] : 0.0f);
}

// Channels [n, n_end) of one row block: fewer rows, more channels per block, so that enough
// independent sums hide vdpbf16ps's latency.
template <int R>
void bf16_dot_rows(const DenseGemvArgs& a, int64_t m0, int64_t n, int64_t n_end) {
  constexpr int C = R == 1 ? 8 : R <= 4 ? 4 : 2;
  for (; n < n_end; n += C)
    bf16_dot_block<R, C>(a, m0, n, static_cast<int>(n_end - n < C ? n_end - n : C));
}

}  // namespace

void dense_gemv_bf16_dot(const DenseGemvArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += kTileChannels) {
    const int64_t tile_end = n_end - n < kTileChannels ? n_end : n + kTileChannels;
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) {
      switch (a.M - m0 < 8 ? a.M - m0 : 8) {
        case 1: bf16_dot_rows<1>(a, m0, n, tile_end); break;
        case 2: bf16_dot_rows<2>(a, m0, n, tile_end); break;
        case 3: bf16_dot_rows<3>(a, m0, n, tile_end); break;
        case 4: bf16_dot_rows<4>(a, m0, n, tile_end); break;
        case 5: bf16_dot_rows<5>(a, m0, n, tile_end); break;
        case 6: bf16_dot_rows<6>(a, m0, n, tile_end); break;
        case 7: bf16_dot_rows<7>(a, m0, n, tile_end); break;
        default: bf16_dot_rows<8>(a, m0, n, tile_end); break;
      }
    }
  }
}

}  // namespace rlhf_fast::avx512bf16
