// Softmax attention of short sequences (Tq == Tk, up to a few hundred positions), forward and
// backward, one (batch, head) pair at a time, written once over the SIMD type V (simd.h).
//
// Why not a flash-attention loop: at T = 64 a pair's q, k, v and its whole T x T probability
// matrix fit in L1/L2 (64 x 64 x 4 B = 16 KiB each), so there is nothing to stream and no
// online softmax to pay for. Each pair is copied once into fp32 scratch (k transposed, rows
// padded with zeros to multiples of 16), then every product is the same register-blocked
// kernel (`tile`): kRows rows of A broadcast against up to 4 vectors of a row of B, 16
// accumulators. Causality and masks shrink the ranges those products run over: query row i
// only sees keys [lo_i, hi_i) (its first and one past its last visible key), so a block of
// rows multiplies only the key columns its rows can see, and the backward's key blocks only
// the query rows that see them. That skips the masked upper triangle and left padding.
//
// The forward keeps the normalised probabilities P (fp32, zeros where a query sees no key):
// the backward then needs no second Q K^T and no exp (~1/4 of its work at T = 64), for
// T x T floats a pair (1 MiB at the PPO bench's [16, 4, 64, 64]).
//
// Backward, with dS = P * (dP - rowsum(P * dP)) * scale and dP = dO V^T:
//   dq = dS K,  dk = dS^T Q,  dv = P^T dO  (dk, dv summed over the query heads of a KV head).
// A row that sees no key has P = 0: its output and its gradients are 0.
#pragma once

#include "cpu/simd.h"
#include "cpu/vmath.h"

namespace rlhf_fast {
namespace RLHF_ISA_NS {
namespace short_attention {

// Rows of A per register block: with 4 vectors of B that is 16 accumulators, which leaves
// room in AVX-512's 32 registers (AVX2's 16 spill a little; it is the fallback).
constexpr int kRows = 4;
constexpr int kMaxVecs = 4;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// C[r, c] = (accumulate ? C[r, c] : 0) + sum_{k0 <= k < k1} A[r * a_row + k * a_k] * B[k, c]
// for r < R, c < NV * W; B rows ldb apart, C rows ldc apart. Strided A lets the same kernel
// multiply by a transposed P or dS without transposing them.
template <class V, int R, int NV>
inline void tile(const float* A, int64_t a_row, int64_t a_k, const float* B, int64_t ldb,
                 float* C, int64_t ldc, int64_t k0, int64_t k1, bool accumulate) {
  using reg = typename V::reg;
  reg acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = accumulate ? V::load(C + r * ldc + c * V::W, V::W) : V::zero();
  for (int64_t k = k0; k < k1; ++k) {
    const float* b = B + k * ldb;
    reg bv[NV];
    for (int c = 0; c < NV; ++c) bv[c] = V::load(b + c * V::W, V::W);
    for (int r = 0; r < R; ++r) {
      const reg a = V::set1(A[r * a_row + k * a_k]);
      for (int c = 0; c < NV; ++c) acc[r][c] = V::fma(a, bv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) V::store(C + r * ldc + c * V::W, acc[r][c], V::W);
}

// `tile` over the columns [n0, n1) (multiples of W) in chunks of up to kMaxVecs vectors.
template <class V, int R>
void gemm_rows(const float* A, int64_t a_row, int64_t a_k, const float* B, int64_t ldb,
               float* C, int64_t ldc, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
               bool accumulate) {
  for (int64_t n = n0; n < n1; n += kMaxVecs * V::W) {
    const int64_t vecs = min64(kMaxVecs, (n1 - n) / V::W);
    const float* b = B + n;
    float* c = C + n;
    switch (vecs) {
      case 4: tile<V, R, 4>(A, a_row, a_k, b, ldb, c, ldc, k0, k1, accumulate); break;
      case 3: tile<V, R, 3>(A, a_row, a_k, b, ldb, c, ldc, k0, k1, accumulate); break;
      case 2: tile<V, R, 2>(A, a_row, a_k, b, ldb, c, ldc, k0, k1, accumulate); break;
      default: tile<V, R, 1>(A, a_row, a_k, b, ldb, c, ldc, k0, k1, accumulate); break;
    }
  }
}

template <class V>
void gemm(int rows, const float* A, int64_t a_row, int64_t a_k, const float* B, int64_t ldb,
          float* C, int64_t ldc, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
          bool accumulate) {
  switch (rows) {
    case 4: gemm_rows<V, 4>(A, a_row, a_k, B, ldb, C, ldc, k0, k1, n0, n1, accumulate); break;
    case 3: gemm_rows<V, 3>(A, a_row, a_k, B, ldb, C, ldc, k0, k1, n0, n1, accumulate); break;
    case 2: gemm_rows<V, 2>(A, a_row, a_k, B, ldb, C, ldc, k0, k1, n0, n1, accumulate); break;
    default: gemm_rows<V, 1>(A, a_row, a_k, B, ldb, C, ldc, k0, k1, n0, n1, accumulate); break;
  }
}

inline void zero(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;
}

// dst[r * ld + c] = src[r * row_stride + c * col_stride] in fp32 for r < rows, c < cols;
// zeros in the padding columns [cols, ld) and rows [rows, padded_rows).
template <class V, class T>
void load_rows(const T* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols,
               float* dst, int64_t ld, int64_t padded_rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    float* d = dst + r * ld;
    if (col_stride == 1) {
      for (int64_t c = 0; c < cols; c += V::W) {
        const int n = static_cast<int>(min64(V::W, cols - c));
        V::store(d + c, V::load(s + c, n), n);
      }
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = to_float(s[c * col_stride]);
    }
    zero(d + cols, ld - cols);
  }
  zero(dst + rows * ld, (padded_rows - rows) * ld);
}

// dst[c * ld + r] = src[r * row_stride + c * col_stride] for c < cols, r < rows; zeros in the
// padding [rows, ld) of each of the cols rows of dst (ld: a multiple of 16). With unit column
// stride, W x W blocks are transposed in registers (a scalar transpose's strided stores took
// a third of the backward's own time at T = 64).
template <class V, class T>
void load_transposed(const T* src, int64_t row_stride, int64_t col_stride, int64_t rows,
                     int64_t cols, float* dst, int64_t ld) {
  if (col_stride == 1 && V::W > 1) {
    typename V::reg block[V::W];
    for (int64_t r0 = 0; r0 < ld; r0 += V::W)
      for (int64_t c0 = 0; c0 < cols; c0 += V::W) {
        const int n = static_cast<int>(min64(V::W, cols - c0));
        for (int r = 0; r < V::W; ++r)
          block[r] = r0 + r < rows ? V::load(src + (r0 + r) * row_stride + c0, n) : V::zero();
        V::transpose(block);
        for (int c = 0; c < n; ++c) V::store(dst + (c0 + c) * ld + r0, block[c], V::W);
      }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = to_float(s[c * col_stride]);
  }
  for (int64_t c = 0; c < cols; ++c) zero(dst + c * ld + rows, ld - rows);
}

template <class V, class T>
void store_row(const float* src, T* dst, int64_t cols) {
  for (int64_t c = 0; c < cols; c += V::W) {
    const int n = static_cast<int>(min64(V::W, cols - c));
    V::store(dst + c, V::load(src + c, n), n);
  }
}

// Query row i sees keys [lo[i], hi[i]) at most (its first and one past its last visible key);
// lo == hi when it sees none. mask: the pair's [T, T] rows (query stride mask_row), or nullptr.
inline void visible_ranges(const uint8_t* mask, int64_t mask_row, bool causal, int64_t T,
                           int32_t* lo, int32_t* hi) {
  for (int64_t i = 0; i < T; ++i) {
    const int64_t end = causal ? i + 1 : T;
    int64_t first = 0, last = end;
    if (mask != nullptr) {
      const uint8_t* row = mask + i * mask_row;
      while (first < end && !row[first]) ++first;
      while (last > first && !row[last - 1]) --last;
    }
    lo[i] = static_cast<int32_t>(first < last ? first : 0);
    hi[i] = static_cast<int32_t>(first < last ? last : 0);
  }
}

// The keys [k0, k1) that rows [i0, i0 + rows) see (k0 == k1: none), and the same range widened
// to multiples of W, [n0, n1), for the products whose columns are keys (scores, dP). Products
// that sum over keys (P V, dS K) run over [k0, k1) alone: P and dS are 0 outside each row's
// keys, so the union's exact bounds lose nothing (and skip ~15% of their work at T = 64).
template <class V>
void block_keys(const int32_t* lo, const int32_t* hi, int64_t i0, int rows, int64_t& k0,
                int64_t& k1, int64_t& n0, int64_t& n1) {
  k0 = 1 << 30;
  k1 = 0;
  for (int r = 0; r < rows; ++r)
    if (hi[i0 + r] > lo[i0 + r]) {
      k0 = min64(k0, lo[i0 + r]);
      k1 = max64(k1, hi[i0 + r]);
    }
  if (k1 == 0) k0 = 0;
  n0 = k0 / V::W * V::W;
  n1 = (k1 + V::W - 1) / V::W * V::W;
}

// The query rows [i0, i1) that see any of the keys [j0, j0 + cols) (i0 == i1: none).
inline void block_queries(const int32_t* lo, const int32_t* hi, int64_t T, int64_t j0, int cols,
                          int64_t& i0, int64_t& i1) {
  i0 = T;
  i1 = 0;
  for (int64_t i = 0; i < T; ++i)
    if (lo[i] < j0 + cols && hi[i] > j0 && hi[i] > lo[i]) {
      i0 = min64(i0, i);
      i1 = i + 1;
    }
  if (i1 == 0) i0 = 0;
}

inline float neg_inf() { return -__builtin_inff(); }

// One row of P: the raw scores Q K^T in p[lo, hi) become softmax(scale * scores) over the
// visible keys, and every other entry of the row's Tp becomes 0.
template <class V>
void softmax_row(float* p, int64_t lo, int64_t hi, const uint8_t* mask_row, float scale,
                 int64_t Tp) {
  using reg = typename V::reg;
  // first n lanes 1, the rest 0: partial vectors without a mask keep their tail lanes out
  alignas(64) static const float kFirstLanes[32] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                                    1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0,
                                                    0, 0, 0, 0, 0, 0, 0, 0};
  if (hi <= lo) {
    zero(p, Tp);
    return;
  }
  const reg scale_v = V::set1(scale), minus_inf = V::set1(neg_inf());
  reg top = minus_inf;
  for (int64_t j = lo; j < hi; j += V::W) {
    const int n = static_cast<int>(min64(V::W, hi - j));
    const reg visible = mask_row != nullptr ? V::load_flag(mask_row + j, n)
                                            : V::load(kFirstLanes + 16 - n, V::W);
    const reg s = V::select(V::nonzero(visible), V::mul(V::load(p + j, n), scale_v), minus_inf);
    V::store(p + j, s, n);
    top = V::max(top, s);
  }
  alignas(64) float lanes[16];
  V::store(lanes, top, V::W);
  float row_max = lanes[0];
  for (int l = 1; l < V::W; ++l) row_max = lanes[l] > row_max ? lanes[l] : row_max;
  const reg max_v = V::set1(row_max);
  reg total = V::zero();
  for (int64_t j = lo; j < hi; j += V::W) {
    const int n = static_cast<int>(min64(V::W, hi - j));
    const reg e = exp_nonpositive<V>(V::sub(V::load(p + j, n), max_v));
    V::store(p + j, e, n);
    total = V::add(total, V::select(V::nonzero(V::load(kFirstLanes + 16 - n, V::W)), e,
                                    V::zero()));
  }
  const reg inverse = V::set1(1.0f / V::hsum_float(total));
  for (int64_t j = lo; j < hi; j += V::W) {
    const int n = static_cast<int>(min64(V::W, hi - j));
    V::store(p + j, V::mul(V::load(p + j, n), inverse), n);
  }
  zero(p, lo);
  zero(p + hi, Tp - hi);
}

}  // namespace short_attention

template <class V, class T>
void short_attention_forward(const ShortAttentionArgs& a, int64_t begin, int64_t end,
                             float* scratch, int32_t* ranges) {
  using namespace short_attention;
  const int64_t T_len = a.T, D = a.D, Tp = a.Tp, Dp = a.Dp, H = a.H;
  const int64_t group = a.H / a.Hkv;
  float* qs = scratch;        // [T, Dp]
  float* kt = qs + Tp * Dp;   // [D, Tp]: k transposed, so scores come out as rows of keys
  float* vs = kt + Tp * Dp;   // [Tp, Dp]
  float* o = vs + Tp * Dp;    // [kRows, Dp]
  int32_t* lo = ranges;
  int32_t* hi = ranges + Tp;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / H, h = pair % H, g = h / group;
    load_rows<V>(q + b * a.q_strides[0] + h * a.q_strides[1], a.q_strides[2], a.q_strides[3],
                 T_len, D, qs, Dp, T_len);
    load_transposed<V>(k + b * a.k_strides[0] + g * a.k_strides[1], a.k_strides[2], a.k_strides[3],
                    T_len, D, kt, Tp);
    load_rows<V>(v + b * a.v_strides[0] + g * a.v_strides[1], a.v_strides[2], a.v_strides[3],
                 T_len, D, vs, Dp, Tp);
    const uint8_t* mask =
        a.mask != nullptr ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] : nullptr;
    visible_ranges(mask, a.mask_strides[2], a.causal, T_len, lo, hi);
    float* P = a.probs + pair * T_len * Tp;
    for (int64_t i0 = 0; i0 < T_len; i0 += kRows) {
      const int rows = static_cast<int>(min64(kRows, T_len - i0));
      int64_t k0, k1, n0, n1;
      block_keys<V>(lo, hi, i0, rows, k0, k1, n0, n1);
      if (k1 > k0)
        gemm<V>(rows, qs + i0 * Dp, Dp, 1, kt, Tp, P + i0 * Tp, Tp, 0, D, n0, n1, false);
      for (int r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        softmax_row<V>(P + i * Tp, lo[i], hi[i],
                       mask != nullptr ? mask + i * a.mask_strides[2] : nullptr, a.scale, Tp);
      }
      gemm<V>(rows, P + i0 * Tp, Tp, 1, vs, Dp, o, Dp, k0, k1, 0, Dp, false);
      for (int r = 0; r < rows; ++r)
        store_row<V>(o + r * Dp, out + ((b * T_len + i0 + r) * H + h) * D, D);
    }
  }
}

template <class V, class T>
void short_attention_backward(const ShortAttentionArgs& a, int64_t begin, int64_t end,
                              float* scratch, int32_t* ranges) {
  using namespace short_attention;
  using reg = typename V::reg;
  const int64_t T_len = a.T, D = a.D, Tp = a.Tp, Dp = a.Dp, H = a.H, Hkv = a.Hkv;
  const int64_t group = H / Hkv;
  float* ks = scratch;        // [Tp, Dp]
  float* vt = ks + Tp * Dp;   // [D, Tp]: v transposed, for dP = dO V^T as rows of keys
  float* dk = vt + Tp * Dp;   // [Tp, Dp] fp32 sums over the group's heads
  float* dv = dk + Tp * Dp;   // [Tp, Dp]
  float* qh = dv + Tp * Dp;   // [Tp, Dp]
  float* dout = qh + Tp * Dp; // [Tp, Dp]
  float* ds = dout + Tp * Dp; // [T, Tp]: dP, then dS
  float* tmp = ds + T_len * Tp;  // [kRows, Dp]
  int32_t* lo = ranges;
  int32_t* hi = ranges + Tp;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* grad = static_cast<const T*>(a.grad);
  T* dq_out = static_cast<T*>(a.dq);
  T* dk_out = static_cast<T*>(a.dk);
  T* dv_out = static_cast<T*>(a.dv);
  const reg scale_v = V::set1(a.scale);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t b = pair / Hkv, g = pair % Hkv;
    load_rows<V>(k + b * a.k_strides[0] + g * a.k_strides[1], a.k_strides[2], a.k_strides[3],
                 T_len, D, ks, Dp, Tp);
    load_transposed<V>(v + b * a.v_strides[0] + g * a.v_strides[1], a.v_strides[2], a.v_strides[3],
                    T_len, D, vt, Tp);
    zero(dk, Tp * Dp);
    zero(dv, Tp * Dp);
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      load_rows<V>(q + b * a.q_strides[0] + h * a.q_strides[1], a.q_strides[2], a.q_strides[3],
                   T_len, D, qh, Dp, Tp);
      load_rows<V>(grad + b * a.grad_strides[0] + h * a.grad_strides[1], a.grad_strides[2],
                   a.grad_strides[3], T_len, D, dout, Dp, Tp);
      const uint8_t* mask =
          a.mask != nullptr ? a.mask + b * a.mask_strides[0] + h * a.mask_strides[1] : nullptr;
      visible_ranges(mask, a.mask_strides[2], a.causal, T_len, lo, hi);
      const float* P = a.probs + (b * H + h) * T_len * Tp;
      for (int64_t i0 = 0; i0 < T_len; i0 += kRows) {
        const int rows = static_cast<int>(min64(kRows, T_len - i0));
        int64_t k0, k1, n0, n1;
        block_keys<V>(lo, hi, i0, rows, k0, k1, n0, n1);
        if (k1 > k0)
          gemm<V>(rows, dout + i0 * Dp, Dp, 1, vt, Tp, ds + i0 * Tp, Tp, 0, D, n0, n1, false);
        for (int r = 0; r < rows; ++r) {
          const float* p = P + (i0 + r) * Tp;
          float* d = ds + (i0 + r) * Tp;
          // P is 0 outside the row's visible keys, so [n0, n1) holds all of its sum
          reg sum = V::zero();
          for (int64_t j = n0; j < n1; j += V::W)
            sum = V::fma(V::load(p + j, V::W), V::load(d + j, V::W), sum);
          const reg delta = V::set1(V::hsum_float(sum));
          for (int64_t j = n0; j < n1; j += V::W) {
            const reg dp = V::sub(V::load(d + j, V::W), delta);
            V::store(d + j, V::mul(V::mul(V::load(p + j, V::W), dp), scale_v), V::W);
          }
          zero(d, n0);  // the key blocks below read dS columns this row block did not compute
          zero(d + n1, Tp - n1);
        }
        gemm<V>(rows, ds + i0 * Tp, Tp, 1, ks, Dp, tmp, Dp, k0, k1, 0, Dp, false);
        for (int r = 0; r < rows; ++r)
          store_row<V>(tmp + r * Dp, dq_out + ((b * T_len + i0 + r) * H + h) * D, D);
      }
      for (int64_t j0 = 0; j0 < T_len; j0 += kRows) {
        const int cols = static_cast<int>(min64(kRows, T_len - j0));
        int64_t i0, i1;
        block_queries(lo, hi, T_len, j0, cols, i0, i1);
        if (i1 <= i0) continue;
        gemm<V>(cols, P + j0, 1, Tp, dout, Dp, dv + j0 * Dp, Dp, i0, i1, 0, Dp, true);
        gemm<V>(cols, ds + j0, 1, Tp, qh, Dp, dk + j0 * Dp, Dp, i0, i1, 0, Dp, true);
      }
    }
    for (int64_t j = 0; j < T_len; ++j) {
      store_row<V>(dk + j * Dp, dk_out + ((b * T_len + j) * Hkv + g) * D, D);
      store_row<V>(dv + j * Dp, dv_out + ((b * T_len + j) * Hkv + g) * D, D);
    }
  }
}

}  // namespace RLHF_ISA_NS
}  // namespace rlhf_fast
