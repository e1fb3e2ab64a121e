// HF's LlamaRMSNorm over rows of x [M, H], forward and backward, written once over the SIMD
// type V (see simd.h), x's storage type T (float, bf16_t or fp16_t) and the type of y (forward)
// or dy (backward): T or float. All arithmetic is fp32; see rms_norm_op.cpp for the formulas.
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <class V, class T>
float sum_of_squares(const T* x, int64_t H) {
  typename V::reg acc = V::zero();
  for (int64_t k = 0; k < H; k += V::W) {
    const int lanes = static_cast<int>(H - k < V::W ? H - k : V::W);
    const typename V::reg v = V::load(x + k, lanes);
    acc = V::fma(v, v, acc);
  }
  return static_cast<float>(V::hsum(acc));
}

template <class V, class T, class Y>
void rms_norm_rows(const RmsNormArgs& a, int64_t m_begin, int64_t m_end) {
  using reg = typename V::reg;
  const int64_t H = a.H;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const T* x = static_cast<const T*>(a.x) + m * H;
    Y* y = static_cast<Y*>(a.y) + m * H;
    const float r = 1.0f / __builtin_sqrtf(sum_of_squares<V>(x, H) / float(H) + a.eps);
    a.rstd_out[m] = r;
    const reg rv = V::set1(r);
    for (int64_t k = 0; k < H; k += V::W) {
      const int lanes = static_cast<int>(H - k < V::W ? H - k : V::W);
      // HF rounds the normalized h to x's dtype before the weight multiplies it
      const reg h = V::round_as(V::mul(V::load(x + k, lanes), rv), T{});
      V::store(y + k, V::mul(V::load(a.weight + k, lanes), h), lanes);
    }
  }
}

// Rows [m_begin, m_end); `dweight` (nullptr: the weight is frozen) gets each row's
// dy * round(hx) added, in row order.
template <class V, class T, class G>
void rms_norm_backward_rows(const RmsNormArgs& a, int64_t m_begin, int64_t m_end,
                            float* dweight) {
  using reg = typename V::reg;
  const int64_t H = a.H;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const T* x = static_cast<const T*>(a.x) + m * H;
    const G* dy = static_cast<const G*>(a.dy) + m * H;
    T* dx = static_cast<T*>(a.dx) + m * H;
    const reg r = V::set1(a.rstd[m]);
    reg acc = V::zero();  // sum of g * hx, g = dy * weight, hx = x * rstd
    for (int64_t k = 0; k < H; k += V::W) {
      const int lanes = static_cast<int>(H - k < V::W ? H - k : V::W);
      const reg g = V::mul(V::load(dy + k, lanes), V::load(a.weight + k, lanes));
      acc = V::fma(g, V::mul(V::load(x + k, lanes), r), acc);
    }
    const reg mean = V::set1(static_cast<float>(V::hsum(acc)) / float(H));
    for (int64_t k = 0; k < H; k += V::W) {
      const int lanes = static_cast<int>(H - k < V::W ? H - k : V::W);
      const reg d = V::load(dy + k, lanes);
      const reg hx = V::mul(V::load(x + k, lanes), r);
      const reg g = V::mul(d, V::load(a.weight + k, lanes));
      V::store(dx + k, V::mul(r, V::sub(g, V::mul(hx, mean))), lanes);
      if (dweight != nullptr) {
        const reg sum = V::load(dweight + k, lanes);
        V::store(dweight + k, V::add(sum, V::mul(d, V::round_as(hx, T{}))), lanes);
      }
    }
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
