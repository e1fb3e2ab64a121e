// Llama's rotary position embedding over rows of x [B, T, H, D], written once over the SIMD type
// V (see simd.h) and the storage type T (float, bf16_t or fp16_t). A row is one (batch,
// position): its cos and sin rows are loaded once and serve its H heads.
//
// With r = D / 2, as HF's apply_rotary_pos_emb (x cos + rotate_half(x) sin):
//   forward  y_i = x_i cos_i - x_{i+r} sin_i      (i < r)
//            y_i = x_i cos_i + x_{i-r} sin_i      (i >= r)
//   backward (transpose) dx_i = g_i cos_i + g_{i+r} sin_{i+r}   (i < r)
//                        dx_i = g_i cos_i - g_{i-r} sin_{i-r}   (i >= r)
// In fp32 with two products and one sum, each rounded as HF's three fp32 ops round them (the
// build keeps the compiler from contracting them into an FMA), so fp32 outputs equal HF's bit
// for bit; 16-bit ones are rounded once to T (HF rounds each of its ops in 16-bit).
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <class V, class T>
void rotary_rows(const RotaryArgs& a, int64_t row_begin, int64_t row_end) {
  using reg = typename V::reg;
  const T* xs = static_cast<const T*>(a.x);
  const T* cos = static_cast<const T*>(a.cos);
  const T* sin = static_cast<const T*>(a.sin);
  T* ys = static_cast<T*>(a.y);
  const int64_t r = a.D / 2;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / a.T, t = row % a.T;
    const T* c = cos + b * a.table_stride_b + t * a.D;
    const T* s = sin + b * a.table_stride_b + t * a.D;
    const T* x_row = xs + b * a.x_stride_b + t * a.x_stride_t;
    T* y_row = ys + row * a.H * a.D;
    for (int64_t i = 0; i < r; i += V::W) {
      const int n = static_cast<int>(r - i < V::W ? r - i : V::W);
      const reg c_lo = V::load(c + i, n), c_hi = V::load(c + r + i, n);
      // the sines each half is multiplied by: forward sin_i, sin_{i+r}; transpose swapped
      const reg s_lo = V::load(s + (a.transpose ? r : 0) + i, n);
      const reg s_hi = V::load(s + (a.transpose ? 0 : r) + i, n);
      for (int64_t h = 0; h < a.H; ++h) {
        const T* in = x_row + h * a.x_stride_h;
        T* out = y_row + h * a.D;
        const reg lo = V::load(in + i, n), hi = V::load(in + r + i, n);
        if (!a.transpose) {
          V::store(out + i, V::sub(V::mul(lo, c_lo), V::mul(hi, s_lo)), n);
          V::store(out + r + i, V::add(V::mul(hi, c_hi), V::mul(lo, s_hi)), n);
        } else {
          V::store(out + i, V::add(V::mul(lo, c_lo), V::mul(hi, s_lo)), n);
          V::store(out + r + i, V::sub(V::mul(hi, c_hi), V::mul(lo, s_hi)), n);
        }
      }
    }
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
