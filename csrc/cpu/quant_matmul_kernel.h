// y[M, N] = x[M, K] @ dequantize(W)[N, K].T (+ bias) for the weight-only formats of
// rlhf_fast/quant/weight.py, with fp32 activations and fp32 accumulation.
//
// Why it is shaped this way:
// - The weights are never dequantized to memory. Each 32-weight block of a row (16 bytes of
//   int4, or 32 int8) is unpacked in registers and used right away, so a GEMV (M = 1) streams
//   the packed bytes once: it is memory bound, and fewer bytes is the whole point.
// - fp32 activations are never quantized: the dot products are fp32 FMAs of the exact
//   dequantized weight values (q * scale + offset, as in dequantize()) with x, so the result
//   matches the float64 reference to ~1e-6 relative. 16-bit activations are widened to fp32
//   by the caller.
// - A microkernel computes an MR x NR tile (rows of x x output channels): the NR channels'
//   weights are unpacked once per step and used by all MR rows, and each x vector by all NR
//   channels. For M > MR the driver walks K in chunks so that the x chunk stays in L2 and a
//   channel tile's packed weights stay in L1 while every MR-row block of x passes over them.
// - int4 unpacking is per ISA (Int4Unpack below). On AVX-512 a group's 16 possible weight
//   values q * scale + offset are a 16-float table in one register: vpermps looks the weights
//   up by their nibble (it reads only the low 4 bits of each index, so no AND is needed).
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

inline float half_bits_to_float(uint16_t bits) {
#if defined(RLHF_ISA_AVX2) || defined(RLHF_ISA_AVX512)
  return _cvtsh_ss(bits);
#else
  return fp16_to_float(fp16_t{bits});
#endif
}

// Unpacks step t (0 .. 16/W - 1) of a 32-weight int4 block: bytes [tW, tW + W) hold the codes
// of weights tW + lane (low nibbles) and 16 + tW + lane (high nibbles).
template <class V>
struct Int4Unpack;

template <>
struct Int4Unpack<VecScalar> {
  struct Group {
    float scale, offset;
  };
  static Group group(float scale, float offset) { return {scale, offset}; }
  static void step(const uint8_t* bytes, const Group& g, float& lo, float& hi) {
    lo = float(bytes[0] & 15) * g.scale + g.offset;
    hi = float(bytes[0] >> 4) * g.scale + g.offset;
  }
  static float int8(const int8_t* p, int n) { return n > 0 ? float(p[0]) : 0.0f; }
};

#if defined(RLHF_ISA_AVX2)
template <>
struct Int4Unpack<VecAvx2> {
  struct Group {
    __m256 scale, offset;
  };
  static Group group(float scale, float offset) {
    return {_mm256_set1_ps(scale), _mm256_set1_ps(offset)};
  }
  static void step(const uint8_t* bytes, const Group& g, __m256& lo, __m256& hi) {
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    __m256 qlo = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
    __m256 qhi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
    lo = _mm256_add_ps(_mm256_mul_ps(qlo, g.scale), g.offset);
    hi = _mm256_add_ps(_mm256_mul_ps(qhi, g.scale), g.offset);
  }
  static __m256 int8(const int8_t* p, int n) {
    __m128i raw;
    if (n == 8) {
      raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    } else {  // no masked byte load on AVX2: copy the tail (reading past it could fault)
      int8_t tmp[16] = {};
      for (int i = 0; i < n; ++i) tmp[i] = p[i];
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  }
};
#endif

#if defined(RLHF_ISA_AVX512)
template <>
struct Int4Unpack<VecAvx512> {
  struct Group {
    __m512 table;  // table[q] = q * scale + offset
  };
  static Group group(float scale, float offset) {
    const __m512 codes =
        _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_add_ps(_mm512_mul_ps(codes, _mm512_set1_ps(scale)), _mm512_set1_ps(offset))};
  }
  static void step(const uint8_t* bytes, const Group& g, __m512& lo, __m512& hi) {
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    lo = _mm512_permutexvar_ps(q, g.table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), g.table);
  }
  static __m512 int8(const int8_t* p, int n) {
    __m128i raw = n == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                          : _mm_maskz_loadu_epi8(VecAvx512::lanes(n), p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
  }
};
#endif

inline float reduce_add(float v) { return v; }
#if defined(RLHF_ISA_AVX2) || defined(RLHF_ISA_AVX512)
inline float reduce_add(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
#if defined(RLHF_ISA_AVX512)
inline float reduce_add(__m512 v) {
  return reduce_add(_mm512_castps512_ps256(_mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E))));
}
#endif

inline int64_t clamp_lanes(int64_t n, int W) { return n < 0 ? 0 : (n > W ? W : n); }

// Writes (first chunk: bias + sum, later chunks: y + sum) for each of the tile's outputs.
template <class V, int MR, int NR>
inline void finish_tile(const QuantMatmulArgs& a, int64_t m0, int64_t n0, bool first,
                        const typename V::reg (&acc)[MR][NR], const float* channel_scale) {
  for (int m = 0; m < MR; ++m) {
    float* y = a.y + (m0 + m) * a.y_row_stride + n0;
    for (int j = 0; j < NR; ++j) {
      float sum = reduce_add(acc[m][j]);
      if (channel_scale) sum *= channel_scale[j];
      const float base = first ? (a.bias ? a.bias[n0 + j] : 0.0f) : y[j];
      y[j] = base + sum;
    }
  }
}

// int4: the MR x NR tile at (m0, n0) over the 32-weight blocks [block_begin, block_end).
template <class V, int MR, int NR>
void int4_tile(const QuantMatmulArgs& a, int64_t m0, int64_t n0, int64_t block_begin,
               int64_t block_end) {
  using U = Int4Unpack<V>;
  constexpr int W = V::W;
  // Small tiles keep a second set of accumulators so that consecutive FMAs are independent
  // (with one set, a GEMV waits on the FMA latency instead of memory).
  constexpr bool kSplit = MR * NR <= 8;
  typename V::reg acc[MR][NR], acc2[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = acc2[m][j] = V::zero();
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j)
    rows[j] = static_cast<const uint8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
  const float* xs = a.x + m0 * a.x_row_stride;
  const int64_t blocks_per_group = a.group_size / 32;
  auto load_groups = [&](int64_t group, typename U::Group (&groups)[NR]) {
    for (int j = 0; j < NR; ++j) {
      const int64_t at = (n0 + j) * a.group_row_stride + group;
      groups[j] = U::group(half_bits_to_float(a.scales_f16[at]),
                           half_bits_to_float(a.offsets_f16[at]));
    }
  };
  // Block b; `full` = all its 32 columns lie inside K. Only the last block of a row can be
  // partial, and it runs after the loop, so the hot loop has no branch that would make GCC
  // keep the accumulators in memory.
  auto block = [&](int64_t b, const typename U::Group (&groups)[NR], bool full)
                   __attribute__((always_inline)) {
#pragma GCC unroll 16
    for (int t = 0; t < 16 / W; ++t) {
      const int64_t k = 32 * b + t * W;
      typename V::reg lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) U::step(rows[j] + 16 * b + t * W, groups[j], lo[j], hi[j]);
      for (int m = 0; m < MR; ++m) {
        const float* x = xs + m * a.x_row_stride + k;
        const typename V::reg xlo =
            V::load(x, full ? W : static_cast<int>(clamp_lanes(a.K - k, W)));
        const typename V::reg xhi =
            V::load(x + 16, full ? W : static_cast<int>(clamp_lanes(a.K - k - 16, W)));
        for (int j = 0; j < NR; ++j) {
          acc[m][j] = V::fma(lo[j], xlo, acc[m][j]);
          if constexpr (kSplit)
            acc2[m][j] = V::fma(hi[j], xhi, acc2[m][j]);
          else
            acc[m][j] = V::fma(hi[j], xhi, acc[m][j]);
        }
      }
    }
  };
  const int64_t full_blocks = a.K / 32;
  const int64_t full_end = block_end < full_blocks ? block_end : full_blocks;
  for (int64_t b = block_begin; b < full_end;) {
    const int64_t group = b / blocks_per_group;
    const int64_t group_end = (group + 1) * blocks_per_group;
    const int64_t stop = group_end < full_end ? group_end : full_end;
    typename U::Group groups[NR];
    load_groups(group, groups);
    for (; b < stop; ++b) {
      for (int j = 0; j < NR; ++j) __builtin_prefetch(rows[j] + 16 * b + 1024, 0, 3);
      block(b, groups, true);
    }
  }
  if (full_end < block_end) {  // the ragged end of K: columns past K contribute nothing
    typename U::Group groups[NR];
    load_groups(full_end / blocks_per_group, groups);
    block(full_end, groups, false);
  }
  if constexpr (kSplit)
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = V::add(acc[m][j], acc2[m][j]);
  finish_tile<V, MR, NR>(a, m0, n0, block_begin == 0, acc, nullptr);
}

// int8: the MR x NR tile at (m0, n0) over columns [32 * block_begin, min(32 * block_end, K)).
template <class V, int MR, int NR>
void int8_tile(const QuantMatmulArgs& a, int64_t m0, int64_t n0, int64_t block_begin,
               int64_t block_end) {
  using U = Int4Unpack<V>;
  constexpr int W = V::W;
  constexpr bool kSplit = MR * NR <= 8;  // as in int4_tile
  typename V::reg acc[MR][NR], acc2[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = acc2[m][j] = V::zero();
  const int8_t* rows[NR];
  for (int j = 0; j < NR; ++j)
    rows[j] = static_cast<const int8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
  const float* xs = a.x + m0 * a.x_row_stride;
  const int64_t k_begin = 32 * block_begin;
  const int64_t k_end = 32 * block_end < a.K ? 32 * block_end : a.K;
  // Adds columns [k, k + n) (n <= W) to acc (or acc2).
  auto step = [&](int64_t k, int n, bool second) __attribute__((always_inline)) {
    typename V::reg w[NR];
    for (int j = 0; j < NR; ++j) w[j] = U::int8(rows[j] + k, n);
    for (int m = 0; m < MR; ++m) {
      const typename V::reg xv = V::load(xs + m * a.x_row_stride + k, n);
      for (int j = 0; j < NR; ++j) {
        if (kSplit && second)
          acc2[m][j] = V::fma(w[j], xv, acc2[m][j]);
        else
          acc[m][j] = V::fma(w[j], xv, acc[m][j]);
      }
    }
  };
  // A tile over whole rows (few rows of x) prefetches the next tile's rows, which follow its
  // own in memory, in address order: see int4_gemv_tile_avx512.
  const bool whole_rows = k_begin == 0 && k_end == a.K;
  const int8_t* next_tile = rows[0] + NR * a.qdata_row_stride;
  int64_t k = k_begin;
  for (; k + 2 * W <= k_end; k += 2 * W) {
    if ((k & 63) < 2 * W) {
      if (whole_rows)
        for (int j = 0; j < NR; ++j) __builtin_prefetch(next_tile + (k / 64 * NR + j) * 64, 0, 3);
      else
        for (int j = 0; j < NR; ++j) __builtin_prefetch(rows[j] + k + 1024, 0, 0);
    }
    step(k, W, false);
    step(k + W, W, true);
  }
  for (; k < k_end; k += W) step(k, static_cast<int>(clamp_lanes(k_end - k, W)), false);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = V::add(acc[m][j], acc2[m][j]);
  finish_tile<V, MR, NR>(a, m0, n0, block_begin == 0, acc, a.scales_f32 + n0);
}

using TileFn = void (*)(const QuantMatmulArgs&, int64_t, int64_t, int64_t, int64_t);

// Every tile shape up to MaxRows x MaxChannels, for the edges: fn[rows - 1][channels - 1].
template <class V, bool Int4, int MaxRows, int MaxChannels>
struct TileTable {
  static constexpr int kRows = MaxRows, kChannels = MaxChannels;
  TileFn fn[MaxRows][MaxChannels];
  TileTable() { fill<0>(); }
  template <int I>
  void fill() {
    if constexpr (I < MaxRows * MaxChannels) {
      constexpr int rows = I / MaxChannels + 1, channels = I % MaxChannels + 1;
      fn[rows - 1][channels - 1] =
          Int4 ? &int4_tile<V, rows, channels> : &int8_tile<V, rows, channels>;
      fill<I + 1>();
    }
  }
};

// Few rows (decoding): up to 4 rows x 4 channels, each tile streams its channels' whole rows.
// More rows: 8 x 2 tiles (16 accumulators; per block 2 channels are unpacked for 16 rows' FMAs)
// over K chunks of 1024 columns. A pass of 32 channels' packed chunk (16 KiB of int4) and one
// 8-row block of x's chunk (32 KiB) stay in L1 while the tiles sweep them; x's chunk (M x 4 KiB)
// stays in L2.
template <class Tiles>
void sweep(const Tiles& tiles, const QuantMatmulArgs& a, int64_t n_begin, int64_t n_end,
           int64_t chunk) {
  constexpr int64_t kChannelsPerPass = 32;
  const int64_t blocks = (a.K + 31) / 32;
  for (int64_t pass = n_begin; pass < n_end; pass += kChannelsPerPass) {
    const int64_t pass_end = pass + kChannelsPerPass < n_end ? pass + kChannelsPerPass : n_end;
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
      const int64_t b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
      for (int64_t m = 0; m < a.M; m += Tiles::kRows) {
        const int64_t mr = a.M - m < Tiles::kRows ? a.M - m : Tiles::kRows;
        for (int64_t n = pass; n < pass_end; n += Tiles::kChannels) {
          const int64_t nr = pass_end - n < Tiles::kChannels ? pass_end - n : Tiles::kChannels;
          tiles.fn[mr - 1][nr - 1](a, m, n, b0, b1);
        }
      }
    }
  }
}

#if defined(RLHF_ISA_AVX512)
// One row of x (decoding), int4, AVX-512: NR channels' rows streamed side by side. Same sums
// in the same order as int4_tile<VecAvx512, 1, NR> (low halves of the blocks into acc, high
// halves into acc2), but cheaper per group, which at group 32 is every block: the scales and
// offsets of 16 groups are widened from fp16 in one vcvtph2ps per channel and kept on the
// stack, so a group's table is one multiply and one add with operands broadcast from memory
// (load ports), instead of two scalar conversions and two register broadcasts on the shuffle
// port, which vpmovzxbd and vpermps already keep busy.
template <int NR>
void int4_gemv_tile_avx512(const QuantMatmulArgs& a, int64_t n0) {
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[NR], acc2[NR];
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j) {
    acc[j] = acc2[j] = _mm512_setzero_ps();
    rows[j] = static_cast<const uint8_t*>(a.qdata) + (n0 + j) * a.qdata_row_stride;
  }
  const int64_t blocks_per_group = a.group_size / 32, full_blocks = a.K / 32;
  const int64_t groups = (a.K + a.group_size - 1) / a.group_size;
  // Block b of every channel; `full`: all its 32 columns lie inside K (only the last block of
  // K can be partial).
  auto block = [&](int64_t b, const __m512 (&table)[NR], bool full) __attribute__((always_inline)) {
    const float* x = a.x + 32 * b;
    const int rest = static_cast<int>(a.K - 32 * b);
    const __m512 xlo = full ? _mm512_loadu_ps(x) : VecAvx512::load(x, int(clamp_lanes(rest, 16)));
    const __m512 xhi =
        full ? _mm512_loadu_ps(x + 16) : VecAvx512::load(x + 16, int(clamp_lanes(rest - 16, 16)));
    for (int j = 0; j < NR; ++j) {
      const __m512i q =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + 16 * b)));
      acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, table[j]), xlo, acc[j]);
      acc2[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table[j]), xhi,
                                acc2[j]);
    }
  };
  // The next tile's rows follow this tile's in memory: they are prefetched in address order,
  // NR lines per 4 blocks, so that this tile's pass ends as the next tile's bytes arrive.
  // (Prefetching each row 1 KiB ahead, as int4_tile does, left the 4 interleaved streams
  // short of DRAM bandwidth: ~1.5x slower from DRAM, measured at 4096 x 11008.) Its scales
  // and offsets are prefetched up front.
  const uint8_t* next_tile = rows[0] + NR * a.qdata_row_stride;
  {
    const char* s0 = reinterpret_cast<const char*>(a.scales_f16 + (n0 + NR) * a.group_row_stride);
    const char* o0 = reinterpret_cast<const char*>(a.offsets_f16 + (n0 + NR) * a.group_row_stride);
    for (int64_t at = 0; at < NR * a.group_row_stride * 2; at += 64) {
      __builtin_prefetch(s0 + at, 0, 3);
      __builtin_prefetch(o0 + at, 0, 3);
    }
  }
  alignas(64) float scale[NR][16], offset[NR][16];
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int batch = static_cast<int>(groups - g0 < 16 ? groups - g0 : 16);
    for (int j = 0; j < NR; ++j) {
      const int64_t at = (n0 + j) * a.group_row_stride + g0;
      _mm512_store_ps(scale[j], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(VecAvx512::lanes(batch),
                                                                        a.scales_f16 + at)));
      _mm512_store_ps(offset[j], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(VecAvx512::lanes(batch),
                                                                         a.offsets_f16 + at)));
    }
    for (int i = 0; i < batch; ++i) {
      __m512 table[NR];  // table[j][q] = q * scale + offset, as dequantize() rounds it
      for (int j = 0; j < NR; ++j)
        table[j] = _mm512_add_ps(_mm512_mul_ps(codes, _mm512_set1_ps(scale[j][i])),
                                 _mm512_set1_ps(offset[j][i]));
      const int64_t first = (g0 + i) * blocks_per_group;
      const int64_t end = first + blocks_per_group < full_blocks ? first + blocks_per_group : full_blocks;
      for (int64_t b = first; b < end; ++b) {
        if ((b & 3) == 0)
          for (int j = 0; j < NR; ++j) __builtin_prefetch(next_tile + (b / 4 * NR + j) * 64, 0, 3);
        block(b, table, true);
      }
      if (32 * full_blocks < a.K && first <= full_blocks && full_blocks < first + blocks_per_group)
        block(full_blocks, table, false);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const float sum = reduce_add(_mm512_add_ps(acc[j], acc2[j]));
    a.y[n0 + j] = (a.bias ? a.bias[n0 + j] : 0.0f) + sum;
  }
}

inline void int4_gemv_avx512(const QuantMatmulArgs& a, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) int4_gemv_tile_avx512<4>(a, n);
  for (; n < n_end; ++n) int4_gemv_tile_avx512<1>(a, n);
}
#endif

template <class V, bool Int4>
void quant_matmul_channels(const QuantMatmulArgs& a, int64_t n_begin, int64_t n_end) {
  static const TileTable<V, Int4, 4, 4> gemv_tiles;
  static const TileTable<V, Int4, 8, 2> gemm_tiles;
#if defined(RLHF_ISA_AVX512)
  if (Int4 && a.M == 1) return int4_gemv_avx512(a, n_begin, n_end);
#endif
  if (a.M <= 4)
    sweep(gemv_tiles, a, n_begin, n_end, (a.K + 31) / 32);
  else
    sweep(gemm_tiles, a, n_begin, n_end, 32);
}

// Dequantizes int4 output channels [n_begin, n_end) to fp32 into out (rows of K), with the
// values of dequantize(): the large-M path hands such tiles to torch's fp32 GEMM.
template <class V>
void dequantize_int4_f32(const QuantMatmulArgs& a, int64_t n_begin, int64_t n_end, void* out) {
  using U = Int4Unpack<V>;
  constexpr int W = V::W;
  const int64_t blocks = (a.K + 31) / 32, blocks_per_group = a.group_size / 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = static_cast<const uint8_t*>(a.qdata) + n * a.qdata_row_stride;
    float* dst = static_cast<float*>(out) + (n - n_begin) * a.K;
    typename U::Group group{};
    for (int64_t b = 0; b < blocks; ++b) {
      if (b % blocks_per_group == 0) {
        const int64_t at = n * a.group_row_stride + b / blocks_per_group;
        group = U::group(half_bits_to_float(a.scales_f16[at]),
                         half_bits_to_float(a.offsets_f16[at]));
      }
      for (int t = 0; t < 16 / W; ++t) {
        typename V::reg lo, hi;
        U::step(row + 16 * b + t * W, group, lo, hi);
        const int64_t k = 32 * b + t * W;
        V::store(dst + k, lo, static_cast<int>(clamp_lanes(a.K - k, W)));
        V::store(dst + k + 16, hi, static_cast<int>(clamp_lanes(a.K - k - 16, W)));
      }
    }
  }
}

#if defined(RLHF_ISA_AVX512)
// fp32 -> bf16 bits, round to nearest even (no NaN inputs here: the weights are finite).
inline __m256i float_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i rounding = _mm512_add_epi32(
      _mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, rounding), 16));
}

// Dequantizes int4 output channels [n_begin, n_end) to bf16 (round to nearest even) into out,
// rows of K: the large-M path for bf16 activations hands such tiles to torch's bf16 GEMM.
inline void dequantize_int4_bf16(const QuantMatmulArgs& a, int64_t n_begin, int64_t n_end,
                                 void* out_bits) {
  uint16_t* out = static_cast<uint16_t*>(out_bits);
  using U = Int4Unpack<VecAvx512>;
  const int64_t blocks = (a.K + 31) / 32, blocks_per_group = a.group_size / 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = static_cast<const uint8_t*>(a.qdata) + n * a.qdata_row_stride;
    uint16_t* dst = out + (n - n_begin) * a.K;
    U::Group group{};
    for (int64_t b = 0; b < blocks; ++b) {
      if (b % blocks_per_group == 0) {
        const int64_t at = n * a.group_row_stride + b / blocks_per_group;
        group = U::group(half_bits_to_float(a.scales_f16[at]),
                         half_bits_to_float(a.offsets_f16[at]));
      }
      __m512 lo, hi;
      U::step(row + 16 * b, group, lo, hi);
      const int64_t k = 32 * b;
      const int lo_lanes = static_cast<int>(clamp_lanes(a.K - k, 16));
      const int hi_lanes = static_cast<int>(clamp_lanes(a.K - k - 16, 16));
      _mm256_mask_storeu_epi16(dst + k, VecAvx512::lanes(lo_lanes), float_to_bf16(lo));
      if (hi_lanes > 0)
        _mm256_mask_storeu_epi16(dst + k + 16, VecAvx512::lanes(hi_lanes), float_to_bf16(hi));
    }
  }
}
#endif

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
