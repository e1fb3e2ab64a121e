// GAE for AVX-512: each row streamed along time, 16 steps per vector, no transposes.
//
// Why not the row-block tiles of gae_kernel.h here: a tile touches W rows at once, and when a
// row is a multiple of 4 KiB long (T = 1024 fp32 steps: the common case) all W rows of all
// four arrays fall into the same L1 set, so every line is evicted before it is reused and the
// hardware prefetchers fight over one set. Streaming one row at a time keeps four sequential
// streams, which the prefetchers follow and which no set conflict can hurt.
//
// Inside a chunk of 16 steps the recurrence runs in the lanes. AVX-512's compress packs the
// chunk's valid steps into lanes 0..n-1, where "the next valid step" is simply the next lane,
// so the masked recurrence becomes the plain one with the constant c = gamma * lam:
//     delta_j = r_j - V_j + gamma * V_{j+1},      A_j = delta_j + c * A_{j+1},
// solved by a log-depth suffix scan (4 shifts + FMAs). The later chunk enters through its first
// valid step's advantage A' and value V' (the "carry"):
//     A_j += c^(n-j) * A' + gamma * c^(n-1-j) * V'
// which is the only part on the loop-carried dependency chain; the powers of c come from a
// 32-entry table with one permute. Expand scatters the results back to their time steps (and
// writes 0 at invalid ones). Two rows are interleaved to hide the chain's latency.
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

struct GaeStreamConstants {
  __m512 gamma, c1, c2, c4, c8;  // gamma and the scan's powers c^1, c^2, c^4, c^8
  __m512 powers_low, powers_high;  // c^0 .. c^31 for the carry factors
  __m512i iota;                  // 0, 1, ..., 15
};

inline GaeStreamConstants make_stream_constants(float gamma, float lam) {
  const float c = gamma * lam;
  alignas(64) float powers[32];
  float p = 1.0f;
  for (int i = 0; i < 32; ++i) {
    powers[i] = p;
    p *= c;
  }
  GaeStreamConstants k;
  k.gamma = _mm512_set1_ps(gamma);
  k.c1 = _mm512_set1_ps(powers[1]);
  k.c2 = _mm512_set1_ps(powers[2]);
  k.c4 = _mm512_set1_ps(powers[4]);
  k.c8 = _mm512_set1_ps(powers[8]);
  k.powers_low = _mm512_load_ps(powers);
  k.powers_high = _mm512_load_ps(powers + 16);
  k.iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return k;
}

// x[j + s] into lane j, zeros shifted in from the top.
template <int kShift>
inline __m512 shift_down(__m512 x) {
  return _mm512_castsi512_ps(
      _mm512_alignr_epi32(_mm512_setzero_si512(), _mm512_castps_si512(x), kShift));
}

template <class T>
struct GaeRowStream {
  const T* rewards;
  const T* values;
  const uint8_t* mask;  // nullptr: all valid
  float* advantages;
  float* returns;
  __m512 next_advantage;  // A and V of the first valid step after the chunk, broadcast
  __m512 next_value;
};

template <class T>
inline __attribute__((always_inline)) void gae_stream_chunk(GaeRowStream<T>& row, int64_t t0,
                                                            int steps,
                                                            const GaeStreamConstants& k) {
  const __mmask16 in_range = VecAvx512::lanes(steps);
  __mmask16 valid = in_range;
  if (row.mask != nullptr) {
    const __m128i flags = _mm_maskz_loadu_epi8(in_range, row.mask + t0);
    valid = _mm_test_epi8_mask(flags, flags);
  }
  const int count = __builtin_popcount(valid);
  if (count == 0) {  // nothing valid: zeros out, carries pass through untouched
    _mm512_mask_storeu_ps(row.advantages + t0, in_range, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(row.returns + t0, in_range, _mm512_setzero_ps());
    return;
  }
  const __m512 r = _mm512_maskz_compress_ps(valid, VecAvx512::load(row.rewards + t0, steps));
  const __m512 v = _mm512_maskz_compress_ps(valid, VecAvx512::load(row.values + t0, steps));

  // Local suffix scan, as if nothing followed the chunk (lanes >= count are zero).
  __m512 a = _mm512_fmadd_ps(k.gamma, shift_down<1>(v), _mm512_sub_ps(r, v));
  a = _mm512_fmadd_ps(k.c1, shift_down<1>(a), a);
  a = _mm512_fmadd_ps(k.c2, shift_down<2>(a), a);
  a = _mm512_fmadd_ps(k.c4, shift_down<4>(a), a);
  a = _mm512_fmadd_ps(k.c8, shift_down<8>(a), a);

  // What the later chunk adds: c^(count-j) A' + gamma c^(count-1-j) V'. Lanes >= count get
  // garbage exponents (the permute wraps) and are dropped by the expand below.
  const __m512i to_end = _mm512_sub_epi32(_mm512_set1_epi32(count), k.iota);
  const __m512 carry_factor = _mm512_permutex2var_ps(k.powers_low, to_end, k.powers_high);
  const __m512 value_factor = _mm512_permutex2var_ps(
      k.powers_low, _mm512_sub_epi32(to_end, _mm512_set1_epi32(1)), k.powers_high);
  a = _mm512_fmadd_ps(_mm512_mul_ps(k.gamma, value_factor), row.next_value, a);
  a = _mm512_fmadd_ps(carry_factor, row.next_advantage, a);

  _mm512_mask_storeu_ps(row.advantages + t0, in_range, _mm512_maskz_expand_ps(valid, a));
  _mm512_mask_storeu_ps(row.returns + t0, in_range,
                        _mm512_maskz_expand_ps(valid, _mm512_add_ps(a, v)));
  row.next_advantage = _mm512_permutexvar_ps(_mm512_setzero_si512(), a);
  row.next_value = _mm512_permutexvar_ps(_mm512_setzero_si512(), v);
}

template <class T>
GaeRowStream<T> open_row_stream(const GaeArgs& a, int64_t row) {
  GaeRowStream<T> s;
  s.rewards = static_cast<const T*>(a.rewards) + row * a.rewards_row_stride;
  s.values = static_cast<const T*>(a.values) + row * a.values_row_stride;
  s.mask = a.mask != nullptr ? a.mask + row * a.mask_row_stride : nullptr;
  s.advantages = a.advantages + row * a.T;
  s.returns = a.returns + row * a.T;
  s.next_advantage = _mm512_setzero_ps();
  s.next_value = _mm512_setzero_ps();
  return s;
}

template <class T>
void gae_rows_streaming(const GaeArgs& a, int64_t row_begin, int64_t row_end) {
  const GaeStreamConstants k = make_stream_constants(a.gamma, a.lam);
  const int64_t chunks = (a.T + 15) / 16;
  const int tail = static_cast<int>(a.T - (chunks - 1) * 16);
  int64_t row = row_begin;
  for (; row + 2 <= row_end; row += 2) {  // two independent dependency chains in flight
    GaeRowStream<T> first = open_row_stream<T>(a, row);
    GaeRowStream<T> second = open_row_stream<T>(a, row + 1);
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int steps = c == chunks - 1 ? tail : 16;
      gae_stream_chunk(first, c * 16, steps, k);
      gae_stream_chunk(second, c * 16, steps, k);
    }
  }
  if (row < row_end) {
    GaeRowStream<T> last = open_row_stream<T>(a, row);
    for (int64_t c = chunks - 1; c >= 0; --c)
      gae_stream_chunk(last, c * 16, c == chunks - 1 ? tail : 16, k);
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
