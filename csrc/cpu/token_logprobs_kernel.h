// Token log-probs and entropies of rows of logits (PPO's policy term), forward and backward,
// written once over the SIMD type V (see simd.h) and the logits' storage type T (float, bf16_t
// or fp16_t). All arithmetic is fp32.
//
// With z = x / temperature and M the row's largest logit, each row is read once forward:
//   s = sum_v exp(d_v),  w = sum_v exp(d_v) d_v,  d_v = (x_v - M) / temperature  (<= 0)
//   logprob = d_token - log s,   entropy = log s - w / s,   lse = M / temperature + log s.
// Working relative to M keeps every exp argument <= 0 (vmath.h's exp_nonpositive) and keeps
// both results free of the cancellation that z - lse has at logits of 1e4; the entropy needs
// no second pass over p. M is not known before the row is read, so the row goes by chunks
// small enough to stay in L1: a chunk's max first, then its sums (read from L1), with the
// running sums rescaled by exp(old M - new M) once per chunk that raises M: one exp per logit.
//
// Backward, from the saved (M, log s) of each row and the gradient g of its log-prob:
//   grad_x_v = (g / temperature) (1[v == token] - exp(d_v - log s)).
#pragma once

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

// 2048 logits: 8 KB of fp32, read twice while it sits in L1.
constexpr int64_t kTokenLogprobsChunk = 2048;

template <class T>
const T* token_logprobs_row(const TokenLogprobsArgs& a, int64_t row) {
  const int64_t b = row / a.T, t = row % a.T;
  return static_cast<const T*>(a.logits) + b * a.stride_b + t * a.stride_t;
}

template <class V>
float lane_max(typename V::reg r) {
  float lanes[V::W];
  V::store(lanes, r, V::W);
  float best = lanes[0];
  for (int i = 1; i < V::W; ++i) best = lanes[i] > best ? lanes[i] : best;
  return best;
}

// exp(d) and exp(d) * d for d <= 0; the product is 0 (not NaN) where d is -inf (a masked
// logit), and NaN where d is.
template <class V>
inline void exp_and_weighted(typename V::reg d, typename V::reg& e, typename V::reg& ed) {
  e = exp_nonpositive<V>(d);
  // max(a, b) returns b when either is NaN: NaN d stays NaN, -inf becomes finite (e is 0 there)
  ed = V::mul(e, V::max(V::set1(-3.0e38f), d));
}

template <class V, class T>
void token_logprobs_rows(const TokenLogprobsArgs& a, int64_t row_begin, int64_t row_end) {
  using reg = typename V::reg;
  using S = VecScalar;  // the last V % W logits of a row, one at a time
  const int64_t n = a.V, body = n - n % V::W;
  const float inv_t = a.inv_temperature;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = token_logprobs_row<T>(a, row);
    float row_max = -__builtin_inff();
    reg sum = V::zero(), weighted = V::zero();
    float tail_sum = 0.0f, tail_weighted = 0.0f;
    for (int64_t c0 = 0; c0 < n; c0 += kTokenLogprobsChunk) {
      const int64_t c1 = c0 + kTokenLogprobsChunk < n ? c0 + kTokenLogprobsChunk : n;
      const int64_t vec_end = c1 < body ? c1 : body;
      reg chunk_max_v = V::set1(-__builtin_inff());
      for (int64_t k = c0; k < vec_end; k += V::W)
        chunk_max_v = V::max(V::load(x + k, V::W), chunk_max_v);  // NaN: caught by the sums
      float chunk_max = lane_max<V>(chunk_max_v);
      for (int64_t k = vec_end; k < c1; ++k) {
        const float v = to_float(x[k]);
        chunk_max = v > chunk_max ? v : chunk_max;
      }
      if (chunk_max > row_max) {
        if (row_max > -__builtin_inff()) {  // sums so far are relative to the old max
          const float shift = (row_max - chunk_max) * inv_t;
          const float scale = __builtin_expf(shift);
          weighted = V::mul(V::set1(scale), V::fma(V::set1(shift), sum, weighted));
          sum = V::mul(V::set1(scale), sum);
          tail_weighted = scale * (tail_weighted + shift * tail_sum);
          tail_sum *= scale;
        }
        row_max = chunk_max;
      }
      if (row_max == -__builtin_inff()) continue;  // only -inf so far: nothing to add
      const reg max_v = V::set1(row_max), inv_t_v = V::set1(inv_t);
      for (int64_t k = c0; k < vec_end; k += V::W) {
        reg e, ed;
        exp_and_weighted<V>(V::mul(V::sub(V::load(x + k, V::W), max_v), inv_t_v), e, ed);
        sum = V::add(sum, e);
        weighted = V::add(weighted, ed);
      }
      for (int64_t k = vec_end; k < c1; ++k) {
        float e, ed;
        exp_and_weighted<S>((to_float(x[k]) - row_max) * inv_t, e, ed);
        tail_sum += e;
        tail_weighted += ed;
      }
    }
    const float total = static_cast<float>(V::hsum(sum)) + tail_sum;
    const float total_weighted = static_cast<float>(V::hsum(weighted)) + tail_weighted;
    const float log_sum = __builtin_logf(total);
    const float picked = (to_float(x[a.tokens[row]]) - row_max) * inv_t;
    a.logprobs[row] = picked - log_sum;
    a.entropy[row] = log_sum - total_weighted / total;
    a.stats[2 * row] = row_max;
    a.stats[2 * row + 1] = log_sum;
  }
}

template <class V, class T>
void token_logprobs_backward_rows(const TokenLogprobsArgs& a, int64_t row_begin,
                                  int64_t row_end) {
  using reg = typename V::reg;
  const int64_t n = a.V;
  const float inv_t = a.inv_temperature;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = token_logprobs_row<T>(a, row);
    T* grad_x = static_cast<T*>(a.grad_logits) + row * n;
    const float row_max = a.stats[2 * row], log_sum = a.stats[2 * row + 1];
    const float g = a.grad[row] * inv_t;
    const reg max_v = V::set1(row_max), inv_t_v = V::set1(inv_t), log_sum_v = V::set1(log_sum);
    const reg minus_g = V::set1(-g);
    for (int64_t k = 0; k < n; k += V::W) {
      const int lanes = static_cast<int>(n - k < V::W ? n - k : V::W);
      const reg d = V::mul(V::sub(V::load(x + k, lanes), max_v), inv_t_v);
      V::store(grad_x + k, V::mul(minus_g, exp_nonpositive<V>(V::sub(d, log_sum_v))), lanes);
    }
    const int64_t token = a.tokens[row];
    const float d = (to_float(x[token]) - row_max) * inv_t;
    const float p = exp_nonpositive<VecScalar>(d - log_sum);
    VecScalar::store(grad_x + token, g * (1.0f - p), 1);
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
