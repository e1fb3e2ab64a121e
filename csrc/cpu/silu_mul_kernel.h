// silu(gate) * up and its gradient over flat fp32 arrays, written once over the SIMD type V
// (see simd.h), for the MLPs of Llama-family models (SwiGLU). Elementwise: the caller splits
// the arrays among threads.
//
// silu(g) = g * sigmoid(g), vmath.h's sigmoid (one exp of -|g|: a few ulps).
// Backward, with s = sigmoid(g):  d_up = dy * silu(g),  d_gate = dy * up * s * (1 + g (1 - s)).
#pragma once

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

template <class V>
void silu_mul_forward(const SiluMulArgs& args, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += V::W) {
    const int n = static_cast<int>(end - i < V::W ? end - i : V::W);
    const typename V::reg g = V::load(args.gate + i, n);
    const typename V::reg u = V::load(args.up + i, n);
    V::store(args.out + i, V::mul(V::mul(g, sigmoid<V>(g)), u), n);
  }
}

template <class V>
void silu_mul_backward(const SiluMulArgs& args, int64_t begin, int64_t end) {
  using reg = typename V::reg;
  const reg one = V::set1(1.0f);
  for (int64_t i = begin; i < end; i += V::W) {
    const int n = static_cast<int>(end - i < V::W ? end - i : V::W);
    const reg g = V::load(args.gate + i, n);
    const reg u = V::load(args.up + i, n);
    const reg dy = V::load(args.grad + i, n);
    const reg s = sigmoid<V>(g);
    const reg silu = V::mul(g, s);
    V::store(args.grad_up + i, V::mul(dy, silu), n);
    const reg slope = V::mul(s, V::fma(g, V::sub(one, s), one));  // silu'(g)
    V::store(args.grad_gate + i, V::mul(V::mul(dy, u), slope), n);
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
