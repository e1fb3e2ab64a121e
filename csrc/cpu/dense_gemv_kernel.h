// The few-row products of token generation with dense (fp32, bf16 or fp16) weights: y = x @ W.T
// for M <= 16 rows, written once over the SIMD type V (see simd.h) and the weight type T.
//
// Why: at M = 1-16 a linear layer is a stream over its weights, and torch's bf16 path (oneDNN)
// streams a 2048 x 5632 bf16 matrix at ~16 GB/s on the dev VM, slower than its fp32 GEMV reads
// twice the bytes (~41 GB/s): a bf16 model decoded slower than the same model in fp32. Here each
// weight row is read once per block of 4 rows of x (from L1 after the first), converted to
// fp32 in registers and multiplied into fp32 sums; four output channels share each load of x.
#pragma once

#include "cpu/simd.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {

// Rows [m0, m0 + R) of x against channels [n, n + channels), channels <= 4 (missing channels
// re-read the first one's row and are not written): R * 4 independent sums, so that neither
// the FMA latency nor a single weight stream limits the loop; the 4 weight rows are prefetched
// a few cache lines ahead (4 streams per thread keep more DRAM requests in flight). The sums
// are named variables, not an array: GCC keeps an array of 16 vectors in memory and stores it
// every iteration (it is too large for its scalar replacement of aggregates).
template <class V, class T, int R>
void dense_gemv_block(const DenseGemvArgs& a, int64_t m0, int64_t n, int channels) {
  using reg = typename V::reg;
  constexpr int64_t kAhead = 512 / sizeof(T);  // elements: 8 lines ahead of the loads
  // locals, not reads through `a` in the loop (the build's -fno-strict-aliasing, from Python's
  // flags, would have them reloaded around stores)
  const int64_t K = a.K, ldw = a.ldw;
  const T* w0 = static_cast<const T*>(a.w) + n * ldw;
  const T* w1 = w0 + (channels > 1 ? ldw : 0);
  const T* w2 = w0 + (channels > 2 ? 2 * ldw : 0);
  const T* w3 = w0 + (channels > 3 ? 3 * ldw : 0);
  const float* x0 = a.x + m0 * K;
  const float* x1 = x0 + (R > 1 ? K : 0);
  const float* x2 = x0 + (R > 2 ? 2 * K : 0);
  const float* x3 = x0 + (R > 3 ? 3 * K : 0);
  reg s00 = V::zero(), s01 = s00, s02 = s00, s03 = s00, s10 = s00, s11 = s00, s12 = s00;
  reg s13 = s00, s20 = s00, s21 = s00, s22 = s00, s23 = s00, s30 = s00, s31 = s00, s32 = s00;
  reg s33 = s00;
  auto step = [&](int64_t k, int lanes) {
    __builtin_prefetch(w0 + k + kAhead);
    __builtin_prefetch(w1 + k + kAhead);
    __builtin_prefetch(w2 + k + kAhead);
    __builtin_prefetch(w3 + k + kAhead);
    const reg c0 = V::load(w0 + k, lanes), c1 = V::load(w1 + k, lanes);
    const reg c2 = V::load(w2 + k, lanes), c3 = V::load(w3 + k, lanes);
    auto row = [&](const float* x, reg& t0, reg& t1, reg& t2, reg& t3) {
      const reg xv = V::load(x + k, lanes);
      t0 = V::fma(c0, xv, t0);
      t1 = V::fma(c1, xv, t1);
      t2 = V::fma(c2, xv, t2);
      t3 = V::fma(c3, xv, t3);
    };
    row(x0, s00, s01, s02, s03);
    if constexpr (R > 1) row(x1, s10, s11, s12, s13);
    if constexpr (R > 2) row(x2, s20, s21, s22, s23);
    if constexpr (R > 3) row(x3, s30, s31, s32, s33);
  };
  int64_t k = 0;
  for (; k + V::W <= K; k += V::W) step(k, V::W);
  if (k < K) step(k, static_cast<int>(K - k));
  const reg sums[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13},
                          {s20, s21, s22, s23}, {s30, s31, s32, s33}};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < channels; ++c)
      a.y[(m0 + r) * a.N + n + c] = V::hsum_float(sums[r][c]) + (a.bias ? a.bias[n + c] : 0.0f);
}

template <class V, class T>
void dense_gemv_channels(const DenseGemvArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; n += 4) {
    const int channels = static_cast<int>(n_end - n < 4 ? n_end - n : 4);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      switch (a.M - m0 < 4 ? a.M - m0 : 4) {
        case 1: dense_gemv_block<V, T, 1>(a, m0, n, channels); break;
        case 2: dense_gemv_block<V, T, 2>(a, m0, n, channels); break;
        case 3: dense_gemv_block<V, T, 3>(a, m0, n, channels); break;
        default: dense_gemv_block<V, T, 4>(a, m0, n, channels); break;
      }
    }
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
