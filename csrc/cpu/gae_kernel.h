// Generalized advantage estimation, CPU kernel (template over the SIMD vector type V).
//
// Definition (DESIGN.md): each row's valid steps, in order, form one episode whose value after
// its last valid step is 0. Walking backwards and carrying the advantage and value of the next
// *valid* step,
//     delta_t = r_t + gamma * V_next - V_t
//     A_t     = delta_t + gamma * lam * A_next
// while an invalid step leaves both carries untouched and outputs 0.
//
// Why it is shaped like this: the recurrence over t is a chain of dependent FMAs (4-cycle
// latency each), so one row at a time runs at a fraction of the core's throughput. We put W
// rows in the W lanes instead: load a W-row x W-step tile (contiguous along time, so plain
// vector loads), transpose it in registers so that register j holds step t0 + j of all W rows,
// run the recurrence down the W registers, transpose back and store. Time is walked in chunks
// from the end; the last chunk is partial and its padding steps are simply never visited.
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

// The recurrence down one transposed tile: register j holds step t0 + j of every row.
// Advantages overwrite r[j] and returns overwrite v[j].
template <class V, bool kHasMask>
inline __attribute__((always_inline)) void gae_tile(
    typename V::reg* r, typename V::reg* v, const typename V::reg* m, int steps,
    typename V::reg gamma, typename V::reg gamma_lam, typename V::reg& next_advantage,
    typename V::reg& next_value) {
  using reg = typename V::reg;
  const reg zero = V::zero();
  for (int j = steps - 1; j >= 0; --j) {
    const reg delta = V::fma(gamma, next_value, V::sub(r[j], v[j]));
    const reg advantage = V::fma(gamma_lam, next_advantage, delta);
    const reg ret = V::add(advantage, v[j]);
    if (kHasMask) {
      const typename V::mask valid = V::nonzero(m[j]);
      next_advantage = V::select(valid, advantage, next_advantage);
      next_value = V::select(valid, v[j], next_value);
      r[j] = V::select(valid, advantage, zero);
      v[j] = V::select(valid, ret, zero);
    } else {
      next_advantage = advantage;
      next_value = v[j];
      r[j] = advantage;
      v[j] = ret;
    }
  }
}

template <class V, class T, bool kHasMask>
void gae_row_block(const GaeArgs& a, int64_t row0, int rows) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const T* rewards = static_cast<const T*>(a.rewards);
  const T* values = static_cast<const T*>(a.values);
  const reg gamma = V::set1(a.gamma);
  const reg gamma_lam = V::set1(a.gamma * a.lam);
  const reg zero = V::zero();
  reg next_advantage = zero;  // advantage of the next valid step, per row
  reg next_value = zero;      // value of the next valid step, per row

  const int64_t chunks = (a.T + W - 1) / W;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * W;
    const int steps = static_cast<int>(a.T - t0 < W ? a.T - t0 : W);
    reg r[W], v[W], m[W];
    for (int i = 0; i < W; ++i) {
      if (i < rows) {
        const int64_t row = row0 + i;
        r[i] = V::load(rewards + row * a.rewards_row_stride + t0, steps);
        v[i] = V::load(values + row * a.values_row_stride + t0, steps);
        if (kHasMask) m[i] = V::load_flag(a.mask + row * a.mask_row_stride + t0, steps);
      } else {
        r[i] = v[i] = m[i] = zero;
      }
    }
    V::transpose(r);
    V::transpose(v);
    if (kHasMask) V::transpose(m);

    // After the transposes r[j], v[j] hold step t0 + j of every row; results overwrite them.
    // Full chunks take the fully unrolled path (constant trip count keeps the tile in
    // registers); only the one partial chunk at the end of time takes the generic loop.
    if (steps == W)
      gae_tile<V, kHasMask>(r, v, m, W, gamma, gamma_lam, next_advantage, next_value);
    else
      gae_tile<V, kHasMask>(r, v, m, steps, gamma, gamma_lam, next_advantage, next_value);

    V::transpose(r);
    V::transpose(v);
    for (int i = 0; i < rows; ++i) {
      const int64_t offset = (row0 + i) * a.T + t0;
      V::store(a.advantages + offset, r[i], steps);
      V::store(a.returns + offset, v[i], steps);
    }
  }
}

template <class V, class T>
void gae_rows(const GaeArgs& a, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; row += V::W) {
    const int rows = static_cast<int>(row_end - row < V::W ? row_end - row : V::W);
    if (a.mask != nullptr)
      gae_row_block<V, T, true>(a, row, rows);
    else
      gae_row_block<V, T, false>(a, row, rows);
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
