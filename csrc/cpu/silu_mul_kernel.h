// silu(gate) * up and its gradient over flat arrays of T (float, bf16_t or fp16_t), written
// once over the SIMD type V (see simd.h), for the MLPs of Llama-family models (SwiGLU).
// Elementwise: the caller splits the arrays among threads.
//
// Computed in fp32 whatever T is, each output rounded once to T (torch's bf16 ops round the
// silu, then the product: one rounding more; the forward's kRoundSilu does that too).
// silu(g) = g * sigmoid(g), vmath.h's sigmoid (one exp of -|g|: a few ulps).
// Backward, with s = sigmoid(g):  d_up = dy * silu(g),  d_gate = dy * up * s * (1 + g (1 - s)).
#pragma once

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

// kRoundSilu: the silu rounded to T before the product, as torch's bf16 / fp16 pair
// F.silu(gate) * up rounds it. The decoders use that (decode_silu_mul), so that their logits
// follow HF's unfused MLP's.
template <class V, class T, bool kRoundSilu = false>
void silu_mul_forward(const SiluMulArgs& args, int64_t begin, int64_t end) {
  const T* gate = static_cast<const T*>(args.gate);
  const T* up = static_cast<const T*>(args.up);
  T* out = static_cast<T*>(args.out);
  for (int64_t i = begin; i < end; i += V::W) {
    const int n = static_cast<int>(end - i < V::W ? end - i : V::W);
    const typename V::reg g = V::load(gate + i, n);
    typename V::reg silu = V::mul(g, sigmoid<V>(g));
    if constexpr (kRoundSilu) silu = V::round_as(silu, T{});
    V::store(out + i, V::mul(silu, V::load(up + i, n)), n);
  }
}

template <class V, class T>
void silu_mul_backward(const SiluMulArgs& args, int64_t begin, int64_t end) {
  using reg = typename V::reg;
  const T* gate = static_cast<const T*>(args.gate);
  const T* up = static_cast<const T*>(args.up);
  const T* grad = static_cast<const T*>(args.grad);
  T* grad_gate = static_cast<T*>(args.grad_gate);
  T* grad_up = static_cast<T*>(args.grad_up);
  const reg one = V::set1(1.0f);
  for (int64_t i = begin; i < end; i += V::W) {
    const int n = static_cast<int>(end - i < V::W ? end - i : V::W);
    const reg g = V::load(gate + i, n);
    const reg u = V::load(up + i, n);
    const reg dy = V::load(grad + i, n);
    const reg s = sigmoid<V>(g);
    const reg silu = V::mul(g, s);
    V::store(grad_up + i, V::mul(dy, silu), n);
    const reg slope = V::mul(s, V::fma(g, V::sub(one, s), one));  // silu'(g)
    V::store(grad_gate + i, V::mul(V::mul(dy, u), slope), n);
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
