// One decode query's softmax attention over its cached positions, over the SIMD type V (see
// simd.h), for decode_attention and decode_attention_rows (decode_layer_ops.cpp): the query's
// scores by V-wide dot products, their exps in one vectorized pass (vmath.h), the weighted sum
// of values with V-wide FMAs. Keys a row may not see are scored too (four keys at a time), but
// their scores are dropped and their values never read. A rollout's decode step runs 8 rows x 4 heads of these over 16-64
// keys; the scalar loop with std::exp it replaces ran them at ~12 GFLOP/s.
#pragma once

#include <cmath>

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
  float total = 0.0f;
  for (j = 0; j < length; ++j) total += scores[j];
  // The weighted sum one D-chunk at a time, its accumulators in registers: two chains
  // (alternate keys) to hide the FMA latency; each value element is read once.
  for (int64_t d = 0; d < D; d += V::W) {
    const int n = static_cast<int>(D - d < V::W ? D - d : V::W);
    reg sums[2] = {V::zero(), V::zero()};
    int chain = 0;
    for (j = 0; j < length; ++j) {
      if (scores[j] == 0.0f) continue;  // a key the row may not see (or an exp that underflowed)
      sums[chain] = V::fma(V::set1(scores[j]), V::load(v + j * D + d, n), sums[chain]);
      chain ^= 1;
    }
    V::store(acc + d, V::add(sums[0], sums[1]), n);
  }
  return total;
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
