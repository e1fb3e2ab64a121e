// One token drawn per row of logits [B, V] from softmax(logits / temperature), optionally
// restricted to the top_k largest logits, and that token's log-prob under the unrestricted
// softmax: a decode step's sampling, written once over the SIMD type V and the logits' storage
// type T (float, bf16_t or fp16_t). The uniforms come from the caller (torch's generator), so
// a seeded run draws what the PyTorch composition draws (rlhf_fast/ops/sample_logits.py).
//
// Per row, with M its largest logit and d_v = (x_v - M) / temperature <= 0:
//   1. M (one vectorised pass); with top_k, the k-th largest logit t (nth_element on a copy);
//   2. e_v = exp(d_v) into a scratch row, zero where x_v < t (the restriction), the sum of all
//      e_v (the log-prob's normaliser) and fp32 sums of the kept e_v per block of 256;
//   3. inverse CDF: the target u * (sum of the blocks, fp64) picks the first block whose fp64
//      running sum exceeds it, then the first entry inside it whose fp64 running sum exceeds
//      what is left, each clamped to the last positive one (a last-ulp overshoot never lands
//      on a zero weight). The same two levels as sampling.py's sample_from_probs, so neither
//      a [B, V] fp64 temporary nor a sequential fp64 pass over V is needed.
//   logprob = d_token - log(sum of all e_v).
// A row whose logits hold a NaN, +inf, or only -inf has no distribution: its `bad` flag is set
// (the op reports it) and its outputs are left as they are.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

constexpr int64_t kSampleBlock = 256;  // entries per block of the inverse-CDF search

template <class V, class T>
float sample_row_max(const T* x, int64_t n) {
  const int64_t body = n - n % V::W;
  typename V::reg best_v = V::set1(-__builtin_inff());
  for (int64_t k = 0; k < body; k += V::W) best_v = V::max(V::load(x + k, V::W), best_v);
  float lanes[V::W];
  V::store(lanes, best_v, V::W);
  float best = -__builtin_inff();
  for (int i = 0; i < V::W; ++i) best = lanes[i] > best ? lanes[i] : best;
  for (int64_t k = body; k < n; ++k) best = to_float(x[k]) > best ? to_float(x[k]) : best;
  return best;
}

// The k-th largest logit of the row, or -inf when every entry may be drawn. NaN makes it NaN
// (never compared: nth_element needs a strict weak order).
template <class T>
float sample_top_k_threshold(const T* x, int64_t n, int64_t top_k, std::vector<float>& copy) {
  if (top_k <= 0 || top_k >= n) return -__builtin_inff();
  copy.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    copy[k] = to_float(x[k]);
    if (std::isnan(copy[k])) return copy[k];
  }
  std::nth_element(copy.begin(), copy.begin() + (top_k - 1), copy.end(), std::greater<float>());
  return copy[top_k - 1];
}

// The first index of weights[0, count) whose fp64 running sum exceeds target, or the last
// positive one when rounding leaves the target past every sum.
template <class W>
int64_t sample_search(const W* weights, int64_t count, double target) {
  double running = 0.0;
  int64_t last_positive = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (weights[i] <= 0.0) continue;
    running += weights[i];
    last_positive = i;
    if (running > target) return i;
  }
  return last_positive;
}

template <class V, class T>
void sample_logits_rows(const SampleLogitsArgs& a, int64_t row_begin, int64_t row_end) {
  using reg = typename V::reg;
  const int64_t n = a.V, blocks = (n + kSampleBlock - 1) / kSampleBlock;
  const float inv_t = a.inv_temperature;
  std::vector<float> kept(n), copy;
  std::vector<double> block_sums(blocks);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
    const float row_max = sample_row_max<V>(x, n);
    const float threshold = sample_top_k_threshold(x, n, a.top_k, copy);
    if (!std::isfinite(row_max) || std::isnan(threshold)) {
      a.bad[row] = 1;
      continue;
    }
    const reg max_v = V::set1(row_max), inv_t_v = V::set1(inv_t), min_v = V::set1(threshold);
    reg all_v = V::zero();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kSampleBlock, end = std::min(n, begin + kSampleBlock);
      reg block_v = V::zero();
      for (int64_t k = begin; k < end; k += V::W) {
        const int count = static_cast<int>(end - k < V::W ? end - k : V::W);
        const reg logit = V::load(x + k, count);
        // load() zero-fills the lanes past count: those lanes' e is dropped below
        reg e = exp_nonpositive<V>(V::mul(V::sub(logit, max_v), inv_t_v));
        if (count < V::W) {
          float lanes[V::W];
          V::store(lanes, e, V::W);
          for (int i = count; i < V::W; ++i) lanes[i] = 0.0f;
          e = V::load(lanes, V::W);
        }
        all_v = V::add(all_v, e);
        const reg keep = V::select(V::ge(logit, min_v), e, V::zero());
        block_v = V::add(block_v, keep);
        V::store(kept.data() + k, keep, count);
      }
      block_sums[b] = V::hsum(block_v);
    }
    const double all = V::hsum(all_v);
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += block_sums[b];
    if (!std::isfinite(all) || !(total > 0.0)) {  // a NaN logit: every sum is NaN
      a.bad[row] = 1;
      continue;
    }
    const double target = a.uniforms[row] * total;
    const int64_t block = sample_search(block_sums.data(), blocks, target);
    double before = 0.0;
    for (int64_t b = 0; b < block; ++b) before += block_sums[b];
    const int64_t begin = block * kSampleBlock, end = std::min(n, begin + kSampleBlock);
    const int64_t token = begin + sample_search(kept.data() + begin, end - begin, target - before);
    a.tokens[row] = token;
    a.logprobs[row] = (to_float(x[token]) - row_max) * inv_t - static_cast<float>(std::log(all));
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
