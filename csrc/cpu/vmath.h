// Vector transcendental functions for the CPU kernels, written once over the SIMD type V.
//
// Only what the kernels need, on the ranges they need it: exp of a non-positive argument and
// log1p of an argument in [0, 1]. Both are accurate to a few fp32 ulps, which is well inside
// the tolerance of a loss averaged over many pairs, and they give the same results on every
// ISA (same polynomials, same order of operations) up to FMA contraction.
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

// exp(x) for x <= 0. Cody-Waite reduction x = n ln2 + f, |f| <= ln2/2, then a degree-7 Taylor
// polynomial (truncation error < 1e-8 relative) and a scale by 2^n. Below -87 the result is
// below the smallest normal float, which the scale cannot make: it is 0 there (torch's is a
// denormal, or 0 below -103). Not ~1e-38: sigmoid(-inf) must be 0, so that silu(-inf) =
// -inf * 0 is NaN as in torch.
template <class V>
inline typename V::reg exp_nonpositive(typename V::reg x) {
  using reg = typename V::reg;
  const typename V::mask underflow = V::ge(V::set1(-87.0f), x);  // false for NaN
  x = V::max(V::set1(-87.0f), x);  // max(a, b) returns b when either is NaN: NaN propagates
  const reg n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  reg f = V::fma(n, V::set1(-0.693145751953125f), x);  // ln2 split in a high part ...
  f = V::fma(n, V::set1(-1.42860682030941723e-6f), f);  // ... and the rest
  reg p = V::set1(1.0f / 5040.0f);
  p = V::fma(p, f, V::set1(1.0f / 720.0f));
  p = V::fma(p, f, V::set1(1.0f / 120.0f));
  p = V::fma(p, f, V::set1(1.0f / 24.0f));
  p = V::fma(p, f, V::set1(1.0f / 6.0f));
  p = V::fma(p, f, V::set1(0.5f));
  p = V::fma(p, f, V::set1(1.0f));
  p = V::fma(p, f, V::set1(1.0f));
  return V::select(underflow, V::zero(), V::scale_pow2(p, n));
}

// log(1 + f) for |f| <= sqrt(2) - 1 via s = f / (2 + f): log(1 + f) = 2 atanh(s)
// = 2 s (1 + s^2/3 + s^4/5 + ...); |s| <= 0.172, so five terms leave < 1e-9.
template <class V>
inline typename V::reg log1p_small(typename V::reg f) {
  using reg = typename V::reg;
  const reg s = V::div(f, V::add(V::set1(2.0f), f));
  const reg s2 = V::mul(s, s);
  reg p = V::set1(1.0f / 9.0f);
  p = V::fma(p, s2, V::set1(1.0f / 7.0f));
  p = V::fma(p, s2, V::set1(1.0f / 5.0f));
  p = V::fma(p, s2, V::set1(1.0f / 3.0f));
  p = V::fma(p, s2, V::set1(1.0f));
  return V::mul(V::add(s, s), p);
}

// log1p(e) for e in [0, 1]. Above sqrt(2) - 1 we use log(1 + e) = ln2 + log(1 + (e - 1) / 2),
// whose argument (e - 1) / 2 is again small; e itself is never rounded by forming 1 + e, so
// tiny e keep their full relative precision.
template <class V>
inline typename V::reg log1p_unit(typename V::reg e) {
  const typename V::mask big = V::ge(e, V::set1(0.41421356237f));
  const typename V::reg halved = V::mul(V::sub(e, V::set1(1.0f)), V::set1(0.5f));
  const typename V::reg f = V::select(big, halved, e);
  const typename V::reg base = V::select(big, V::set1(0.693147180559945f), V::zero());
  return V::add(base, log1p_small<V>(f));
}

// sigmoid(x) from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below.
template <class V>
inline typename V::reg sigmoid_from_exp(typename V::reg x, typename V::reg e) {
  const typename V::reg inv = V::div(V::set1(1.0f), V::add(V::set1(1.0f), e));
  return V::select(V::ge(x, V::zero()), inv, V::mul(e, inv));
}

// sigmoid(x), stable for any |x|: only exp(-|x|) <= 1 is ever formed.
template <class V>
inline typename V::reg sigmoid(typename V::reg x) {
  return sigmoid_from_exp<V>(x, exp_nonpositive<V>(V::sub(V::zero(), V::abs(x))));
}

// softplus(x) = log(1 + exp(x)) = -logsigmoid(-x), and sigmoid(x), sharing one exp.
template <class V>
inline void softplus_and_sigmoid(typename V::reg x, typename V::reg& softplus,
                                 typename V::reg& sigmoid) {
  const typename V::reg e = exp_nonpositive<V>(V::sub(V::zero(), V::abs(x)));
  softplus = V::add(V::max(V::zero(), x), log1p_unit<V>(e));
  sigmoid = sigmoid_from_exp<V>(x, e);
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
