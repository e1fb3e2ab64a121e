// One decode query's softmax attention over its cached positions, over the SIMD type V (see
// simd.h), for decode_attention and decode_attention_rows (decode_layer_ops.cpp): the query's
// scores by V-wide dot products, their exps in one vectorized pass (vmath.h), the weighted sum
// of values with V-wide FMAs. Keys a row may not see are scored too (four keys at a time), but
// their scores are dropped and their values never read. `scores` is scratch for 2 x length
// floats (the second half holds the indices of the keys that weigh something).
// A rollout's decode step runs 8 rows x 4 heads of these over 16-64 keys: 2.0-2.4x the scalar
// std::exp loop (compiled for SSE2) this replaced, one thread.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <class V, class T>
float decode_attend(const float* q, const void* keys, const void* values, const bool* visible,
                    int64_t length, int64_t D, float scale, float* scores, float* acc) {
  using reg = typename V::reg;
  const T* k = static_cast<const T*>(keys);
  const T* v = static_cast<const T*>(values);
  // Scores four keys at a time: four independent FMA chains instead of one whose latency
  // (and a horizontal sum per key) would bound the loop.
  int64_t j = 0;
  for (; j + 4 <= length; j += 4) {
    reg s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
    for (int64_t d = 0; d < D; d += V::W) {
      const int n = static_cast<int>(D - d < V::W ? D - d : V::W);
      const reg qd = V::load(q + d, n);
      s0 = V::fma(qd, V::load(k + j * D + d, n), s0);
      s1 = V::fma(qd, V::load(k + (j + 1) * D + d, n), s1);
      s2 = V::fma(qd, V::load(k + (j + 2) * D + d, n), s2);
      s3 = V::fma(qd, V::load(k + (j + 3) * D + d, n), s3);
    }
    scores[j] = V::hsum_float(s0) * scale;
    scores[j + 1] = V::hsum_float(s1) * scale;
    scores[j + 2] = V::hsum_float(s2) * scale;
    scores[j + 3] = V::hsum_float(s3) * scale;
  }
  for (; j < length; ++j) {
    reg sum = V::zero();
    for (int64_t d = 0; d < D; d += V::W) {
      const int n = static_cast<int>(D - d < V::W ? D - d : V::W);
      sum = V::fma(V::load(q + d, n), V::load(k + j * D + d, n), sum);
    }
    scores[j] = V::hsum_float(sum) * scale;
  }
  float top = -INFINITY;
  bool any = false;
  for (j = 0; j < length; ++j) {
    if (visible && !visible[j]) {
      scores[j] = -INFINITY;  // its exp below is 0: it adds nothing to the sums
      continue;
    }
    top = std::max(top, scores[j]);
    any = true;
  }
  if (!any) {
    for (int64_t d = 0; d < D; d += V::W)
      V::store(acc + d, V::zero(), static_cast<int>(D - d < V::W ? D - d : V::W));
    return 0.0f;
  }
  const reg shift = V::set1(top);
  for (j = 0; j < length; j += V::W) {
    const int n = static_cast<int>(length - j < V::W ? length - j : V::W);
    V::store(scores + j, exp_nonpositive<V>(V::sub(V::load(scores + j, n), shift)), n);
  }
  // The keys that weigh something, compacted (weights into scores' front, indices into its
  // second half): the weighted sum then runs without branches, and a key the row may not see
  // is never read (0 * inf in its cache row would be NaN). An exp that underflowed to 0 adds
  // nothing either way; a NaN weight is kept, so NaN reaches the output.
  int32_t* index = reinterpret_cast<int32_t*>(scores + length);
  int64_t count = 0;
  float total = 0.0f;
  for (j = 0; j < length; ++j) {
    total += scores[j];
    if (scores[j] != 0.0f) {
      scores[count] = scores[j];
      index[count++] = static_cast<int32_t>(j);
    }
  }
  // One D-chunk at a time, four accumulators in registers (alternate keys) to hide the FMA
  // latency; each value element is read once.
  for (int64_t d = 0; d < D; d += V::W) {
    const int n = static_cast<int>(D - d < V::W ? D - d : V::W);
    const T* vd = v + d;
    reg a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    int64_t c = 0;
    for (; c + 4 <= count; c += 4) {
      a0 = V::fma(V::set1(scores[c]), V::load(vd + index[c] * D, n), a0);
      a1 = V::fma(V::set1(scores[c + 1]), V::load(vd + index[c + 1] * D, n), a1);
      a2 = V::fma(V::set1(scores[c + 2]), V::load(vd + index[c + 2] * D, n), a2);
      a3 = V::fma(V::set1(scores[c + 3]), V::load(vd + index[c + 3] * D, n), a3);
    }
    for (; c < count; ++c) a0 = V::fma(V::set1(scores[c]), V::load(vd + index[c] * D, n), a0);
    V::store(acc + d, V::add(V::add(a0, a1), V::add(a2, a3)), n);
  }
  return total;
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
