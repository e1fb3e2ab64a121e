// K-wise ranking loss (InstructGPT), fused forward + backward, CPU kernel.
//
// For each row (a prompt's K responses, best first) and each valid pair i < j:
//     loss += softplus(r_j - r_i)            (= -logsigmoid(r_i - r_j))
//     grad_i -= sigmoid(r_j - r_i),  grad_j += sigmoid(r_j - r_i)
// The gradient costs one division on top of the exp the loss needs anyway, so the forward pass
// produces it and backward only scales it: no second pass over the pairs.
//
// Shape: as in gae_kernel.h, W rows sit in the W lanes. The row block's K rewards are
// transposed into a small column-major scratch (column k = response k of all W rows), so the
// K(K-1)/2 pairs are K(K-1)/2 full-width vector steps, with no gathers and no B x K x K tensor.
#pragma once

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <class V, class T>
void gather_columns(const RankLossArgs& a, int64_t row0, int rows, float* columns,
                    float* present) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const T* rewards = static_cast<const T*>(a.rewards);
  for (int64_t k0 = 0; k0 < a.K; k0 += W) {
    const int n = static_cast<int>(a.K - k0 < W ? a.K - k0 : W);
    reg tile[W], flags[W];
    for (int i = 0; i < W; ++i) {
      const bool real_row = i < rows;
      tile[i] = real_row ? V::load(rewards + (row0 + i) * a.rewards_row_stride + k0, n) : V::zero();
      if (a.mask != nullptr)
        flags[i] = real_row ? V::load_flag(a.mask + (row0 + i) * a.mask_row_stride + k0, n)
                            : V::zero();
      else
        flags[i] = real_row ? V::set1(1.0f) : V::zero();
    }
    V::transpose(tile);
    V::transpose(flags);
    for (int j = 0; j < n; ++j) {
      V::store(columns + (k0 + j) * W, tile[j], W);
      V::store(present + (k0 + j) * W, flags[j], W);
    }
  }
}

template <class V>
void scatter_gradient(const RankLossArgs& a, int64_t row0, int rows, const float* grads) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  for (int64_t k0 = 0; k0 < a.K; k0 += W) {
    const int n = static_cast<int>(a.K - k0 < W ? a.K - k0 : W);
    reg tile[W];
    for (int j = 0; j < W; ++j) tile[j] = j < n ? V::load(grads + (k0 + j) * W, W) : V::zero();
    V::transpose(tile);
    for (int i = 0; i < rows; ++i) V::store(a.grad + (row0 + i) * a.K + k0, tile[i], n);
  }
}

inline int64_t count_pairs(const RankLossArgs& a, int64_t row0, int rows) {
  int64_t pairs = 0;
  for (int i = 0; i < rows; ++i) {
    int64_t present = a.K;
    if (a.mask != nullptr) {
      present = 0;
      const uint8_t* flags = a.mask + (row0 + i) * a.mask_row_stride;
      for (int64_t k = 0; k < a.K; ++k) present += flags[k] != 0;
    }
    pairs += present * (present - 1) / 2;
  }
  return pairs;
}

// kMasked: some lanes or responses are absent (a mask, or a partial row block).
template <class V, bool kMasked>
typename V::reg accumulate_pairs(int64_t K, const float* columns, const float* present,
                                 float* grads) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  reg loss = V::zero();
  for (int64_t k = 0; k < K * W; k += W) V::store(grads + k, V::zero(), W);
  for (int64_t i = 0; i < K; ++i) {
    const reg better = V::load(columns + i * W, W);
    const typename V::mask better_present = V::nonzero(V::load(present + i * W, W));
    reg grad_better = V::load(grads + i * W, W);
    for (int64_t j = i + 1; j < K; ++j) {
      const reg worse = V::load(columns + j * W, W);
      reg softplus, sigmoid;
      softplus_and_sigmoid<V>(V::sub(worse, better), softplus, sigmoid);
      if (kMasked) {
        const typename V::mask valid =
            V::mand(better_present, V::nonzero(V::load(present + j * W, W)));
        softplus = V::select(valid, softplus, V::zero());
        sigmoid = V::select(valid, sigmoid, V::zero());
      }
      loss = V::add(loss, softplus);
      grad_better = V::sub(grad_better, sigmoid);
      V::store(grads + j * W, V::add(V::load(grads + j * W, W), sigmoid), W);
    }
    V::store(grads + i * W, grad_better, W);
  }
  return loss;
}

template <class V, class T>
RankLossPartial rank_loss_rows(const RankLossArgs& a, int64_t row_begin, int64_t row_end,
                               float* scratch) {
  constexpr int W = V::W;
  float* columns = scratch;
  float* present = scratch + a.K * W;
  float* grads = scratch + 2 * a.K * W;
  RankLossPartial total{0.0, 0};
  for (int64_t row = row_begin; row < row_end; row += W) {
    const int rows = static_cast<int>(row_end - row < W ? row_end - row : W);
    gather_columns<V, T>(a, row, rows, columns, present);
    const bool masked = a.mask != nullptr || rows < W;
    const typename V::reg loss = masked ? accumulate_pairs<V, true>(a.K, columns, present, grads)
                                        : accumulate_pairs<V, false>(a.K, columns, present, grads);
    scatter_gradient<V>(a, row, rows, grads);
    total.loss_sum += V::hsum(loss);
    total.pairs += count_pairs(a, row, rows);
  }
  return total;
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
