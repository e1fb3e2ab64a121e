// Plain C++ interface between the torch bindings (ops.cpp) and the ISA-specific kernels.
//
// Nothing here includes torch: the kernel translation units stay cheap to compile and free of
// inline library code that could leak across ISAs. Each ISA exports one KernelTable.
#pragma once

#include <cstdint>

namespace rlhf_fast {

// Storage types of 16-bit inputs; kernels convert them to fp32 on load.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

enum DTypeIndex : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };

// gae: rows [row_begin, row_end) of [B, T] inputs. Strides are in elements; the time
// stride of every input is 1. Outputs are contiguous fp32 [B, T].
struct GaeArgs {
  const void* rewards;
  const void* values;
  const uint8_t* mask;  // nullptr: every step is valid
  int64_t rewards_row_stride;
  int64_t values_row_stride;
  int64_t mask_row_stride;
  int64_t T;
  float gamma;
  float lam;
  float* advantages;
  float* returns;
};
using GaeFn = void (*)(const GaeArgs&, int64_t row_begin, int64_t row_end);

// rank_loss: rows [row_begin, row_end) of [B, K] rewards. Writes the *unnormalized* gradient
// (sum over the row's valid pairs) to grad (contiguous fp32 [B, K]); the caller divides by
// the batch's pair count once every row is done.
struct RankLossArgs {
  const void* rewards;
  const uint8_t* mask;  // nullptr: every response is present
  int64_t rewards_row_stride;
  int64_t mask_row_stride;
  int64_t K;
  float* grad;
};
struct RankLossPartial {
  double loss_sum;
  int64_t pairs;
};
// scratch: at least rank_loss_scratch_floats(K, width) floats, private to the caller.
using RankLossFn = RankLossPartial (*)(const RankLossArgs&, int64_t row_begin, int64_t row_end,
                                       float* scratch);
inline int64_t rank_loss_scratch_floats(int64_t K, int width) { return 3 * K * width; }

// quant_matmul: y[M, N] = x @ dequantize(W).T (+ bias) for output channels [n_begin, n_end).
// x is fp32 with unit column stride; y is fp32 [M, N] rows. Formats: rlhf_fast/quant/weight.py.
struct QuantMatmulArgs {
  const float* x;
  int64_t x_row_stride;
  int64_t M, K;
  const void* qdata;  // int8 [N, K] or packed int4 uint8 [N, Kp / 2]
  int64_t qdata_row_stride;
  const float* scales_f32;      // int8: per-channel scales [N]
  const uint16_t* scales_f16;   // int4: fp16 bits [N, groups]
  const uint16_t* offsets_f16;  // int4: fp16 bits [N, groups]
  int64_t group_row_stride;     // int4: elements between channels in scales and offsets
  int64_t group_size;           // int4: a multiple of 32
  const int16_t* x_q;           // int4 VNNI GEMV only (quant_gemv_vnni_avx512.h): x quantized
  const float* x_scales;        // per 128 columns [M, x_chunks], their scales [M, x_chunks]
  const float* x_sums;          // and the sums of the quantized x [M, x_chunks]
  int64_t x_chunks;
  const uint16_t* x_bf16;       // int4 bf16-dot GEMV only (quant_gemv_bf16dot_avx512.h): x as
  int64_t x_parts;              // x_parts bf16 terms, [M, x_bf16_row_stride] words, the sums
  int64_t x_bf16_row_stride;    // of x per group [M, x_group_sums_stride] (zero past K),
  const float* x_group_sums;    // and the lane -> group table of each pair of a window
                                // [group_size / 4, 16], the same for every window
  int64_t x_group_sums_stride;
  const int32_t* pair_groups;
  const float* x_pair_bias;     // per pair, -128 * the x of each lane [M, pairs * 16]
  int64_t x_pair_bias_row_stride;
  const float* bias;            // nullptr: no bias
  float* y;
  int64_t y_row_stride;
};
using QuantMatmulFn = void (*)(const QuantMatmulArgs&, int64_t n_begin, int64_t n_end);
// Writes int4 channels [n_begin, n_end) dequantized (fp32, or bf16 bits), rows of K, to out.
using DequantizeFn = void (*)(const QuantMatmulArgs&, int64_t n_begin, int64_t n_end, void* out);
enum QuantFormat : int { kInt8 = 0, kInt4 = 1, kNumQuantFormats = 2 };

// silu_mul: elements [begin, end) of flat arrays, all of one dtype (the table's index).
// Forward reads gate, up and writes out; backward reads grad, gate, up and writes grad_gate,
// grad_up.
struct SiluMulArgs {
  const void* gate;
  const void* up;
  const void* grad;
  void* out;
  void* grad_gate;
  void* grad_up;
};
using SiluMulFn = void (*)(const SiluMulArgs&, int64_t begin, int64_t end);

// decode attention of one fp32 query q[D] over `length` cached positions (rows of D in keys and
// values, of the table's dtype), skipping those whose visible[j] is false (nullptr: all
// visible): acc[D] = sum_j exp(s_j - max s) v_j, unnormalised; returns the softmax's total (0
// when no position is visible). scores: scratch for 2 x `length` floats.
using DecodeAttendFn = float (*)(const float* q, const void* keys, const void* values,
                                 const bool* visible, int64_t length, int64_t D, float scale,
                                 float* scores, float* acc);

// rotary: rows [row_begin, row_end) of the B * T (batch, position) rows of x [B, T, H, D]
// (unit stride along D), by cos and sin rows of D; y is contiguous [B, T, H, D]; all of one
// dtype (the table's index). transpose: the backward (see rotary_kernel.h).
struct RotaryArgs {
  const void* x;
  const void* cos;
  const void* sin;
  void* y;
  int64_t x_stride_b, x_stride_t, x_stride_h;
  int64_t table_stride_b;  // 0: one table row per position for the whole batch
  int64_t T, H, D;
  bool transpose;
};
using RotaryFn = void (*)(const RotaryArgs&, int64_t row_begin, int64_t row_end);

// dense_gemv: y[M, N] = x @ W.T (+ bias) for output channels [n_begin, n_end), M <= 16 rows of
// fp32 x, W rows of the table index's dtype (row stride ldw, unit column stride), fp32 sums.
// dense_gemv_bf16_amx reads bf16 W and x as bf16 pairs (x_pairs) and writes bf16 y (y_bf16);
// dense_gemv_bf16_dot reads bf16 W and bf16 x (x_bf16) and writes bf16 y (y_bf16).
struct DenseGemvArgs {
  const float* x;  // [M, K] contiguous
  // dense_gemv_bf16_dot's x: [M, ldx], ldx >= K rounded up to 32, zeros past K
  const bf16_t* x_bf16;
  // dense_gemv_bf16_amx's x: bf16 pairs (x[m, 2p], x[m, 2p + 1]) at p * M + m, for p up to
  // K rounded up to 32, over 2 (zeros past K)
  const uint32_t* x_pairs;
  bf16_t* y_bf16;  // the bf16 kernels' y: [M, N] contiguous, rounded to bf16 (y unused)
  const void* w;   // [N, K] rows
  const float* bias;  // nullptr or [N]
  float* y;           // [M, N] contiguous
  int64_t M, K, N, ldw;
  int64_t ldx;  // x_bf16's row stride
};
using DenseGemvFn = void (*)(const DenseGemvArgs&, int64_t n_begin, int64_t n_end);
constexpr int64_t kDenseGemvMaxRows = 16;

// rms_norm: rows [m_begin, m_end) of a contiguous x [M, H], weight fp32 [H]; the table's
// first index is x's dtype, the second whether y (forward) or dy (backward) is fp32 (1) or x's
// dtype (0). rstd: one fp32 per row, written by the forward (rstd_out), read by the backward.
struct RmsNormArgs {
  const void* x;
  const float* weight;
  const void* dy;
  void* y;
  void* dx;
  float* rstd_out;     // forward: written
  const float* rstd;   // backward: the forward's
  int64_t H;
  float eps;
};
using RmsNormFn = void (*)(const RmsNormArgs&, int64_t m_begin, int64_t m_end);
using RmsNormBackwardFn = void (*)(const RmsNormArgs&, int64_t m_begin, int64_t m_end,
                                   float* dweight);

// token_logprobs: rows [row_begin, row_end) of the B * T rows of logits [B, T, V] (strides in
// elements, unit stride along V), tokens int64 [B * T] in [0, V). Forward writes logprobs,
// entropy (fp32 [B * T]) and stats (fp32 [B * T, 2]: the row's max logit and log sum exp of
// (x - max) / temperature); backward reads grad (fp32 [B * T]) and stats and writes
// grad_logits (contiguous [B, T, V], the logits' dtype). See token_logprobs_kernel.h.
struct TokenLogprobsArgs {
  const void* logits;
  int64_t stride_b, stride_t;
  int64_t T, V;
  const int64_t* tokens;
  float inv_temperature;
  float* logprobs;
  float* entropy;
  float* stats;
  const float* grad;
  void* grad_logits;
};
using TokenLogprobsFn = void (*)(const TokenLogprobsArgs&, int64_t row_begin, int64_t row_end);

// sample_logits: rows [row_begin, row_end) of logits [B, V] (row_stride in elements, unit
// stride along V): tokens (int64 [B]) drawn with uniforms (fp64 [B], in [0, 1)) from
// softmax(logits / temperature) restricted to the top_k largest (0: all), and their log-probs
// under the unrestricted softmax (fp32 [B]); bad[row] = 1 for a row with no distribution (a
// NaN or +inf logit, or only -inf). See sample_logits_kernel.h.
struct SampleLogitsArgs {
  const void* logits;
  int64_t row_stride, V, top_k;
  float inv_temperature;
  const double* uniforms;
  int64_t* tokens;
  float* logprobs;
  uint8_t* bad;
};
using SampleLogitsFn = void (*)(const SampleLogitsArgs&, int64_t row_begin, int64_t row_end);

// short_attention: causal / masked softmax attention of short sequences (Tq == Tk), forward
// and backward, one (batch, head) pair at a time (short_attention_kernel.h). q [B, H, T, D],
// k and v [B, Hkv, T, D] with any strides (in elements); the mask, when given, bytes with unit
// stride along keys and stride 0 on its broadcast dimensions. Outputs: out and dq contiguous
// [B, T, H, D], dk and dv contiguous [B, T, Hkv, D] (the projections' layout, so HF's
// transpose back is free), probs fp32 [B, H, T, Tp] (Tp: T rounded up to 16; zeros wherever
// a query does not see a key, and past T).
struct ShortAttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* grad;  // backward: d out, [B, H, T, D] with grad_strides
  int64_t q_strides[4], k_strides[4], v_strides[4], grad_strides[4];
  const uint8_t* mask;  // nullptr: no mask
  int64_t mask_strides[3];  // batch, head, query (the key stride is 1)
  bool causal;
  int64_t B, H, Hkv, T, D, Tp, Dp;  // Dp: D rounded up to 16
  float scale;
  void* out;
  float* probs;  // forward: written; backward: read
  void* dq;
  void* dk;
  void* dv;
};
// Forward: pairs [begin, end) of the B * H (batch, head) pairs; backward: pairs of the
// B * Hkv (batch, kv head) pairs, each summing dk and dv over its query heads. scratch:
// short_attention_scratch_floats() floats private to the caller, ranges 4 * Tp int32.
using ShortAttentionFn = void (*)(const ShortAttentionArgs&, int64_t begin, int64_t end,
                                  float* scratch, int32_t* ranges);
inline int64_t short_attention_scratch_floats(int64_t T, int64_t Tp, int64_t Dp) {
  return 6 * Tp * Dp + T * Tp + 16 * Dp;
}

struct KernelTable {
  const char* isa;
  int width;  // fp32 lanes; row blocks are this many rows
  GaeFn gae[kNumDTypes];
  RankLossFn rank_loss[kNumDTypes];
  QuantMatmulFn quant_matmul[kNumQuantFormats];
  // int4 x 16-bit activations, M <= 16, group size a multiple of 128 (AVX512_VNNI, int16
  // activations); nullptr where the CPU lacks VNNI.
  QuantMatmulFn quant_gemv_int4_vnni;
  // int4 x any float activations, M <= 16, any group size (AVX512_BF16: vdpbf16ps on exact
  // bf16 codes and x split into bf16 terms); nullptr where the CPU lacks AVX512_BF16.
  QuantMatmulFn quant_gemv_int4_bf16dot;
  // int4 -> fp32 / bf16 tiles for the large-M paths (bf16: nullptr below AVX-512).
  DequantizeFn dequantize_int4_f32;
  DequantizeFn dequantize_int4_bf16;
  SiluMulFn silu_mul_forward[kNumDTypes];
  SiluMulFn silu_mul_backward[kNumDTypes];
  SiluMulFn silu_mul_forward_as_torch[kNumDTypes];  // the silu rounded first (decoders)
  DecodeAttendFn decode_attend[kNumDTypes];
  RotaryFn rotary[kNumDTypes];
  DenseGemvFn dense_gemv[kNumDTypes];
  // bf16 x and W on AMX-BF16 tiles; nullptr where the CPU (or the OS) does not grant them.
  DenseGemvFn dense_gemv_bf16_amx;
  // bf16 x and W with vdpbf16ps (AVX512_BF16); nullptr where the CPU lacks it. The op prefers
  // the AMX tiles where both exist.
  DenseGemvFn dense_gemv_bf16_dot;
  RmsNormFn rms_norm[kNumDTypes][2];
  RmsNormBackwardFn rms_norm_backward[kNumDTypes][2];
  TokenLogprobsFn token_logprobs[kNumDTypes];
  TokenLogprobsFn token_logprobs_backward[kNumDTypes];
  SampleLogitsFn sample_logits[kNumDTypes];
  ShortAttentionFn short_attention_forward[kNumDTypes];
  ShortAttentionFn short_attention_backward[kNumDTypes];
};

namespace scalar {
const KernelTable& kernel_table();
}
namespace avx2 {
const KernelTable& kernel_table();
}
namespace avx512 {
const KernelTable& kernel_table();
}
namespace avx512vnni {
void quant_gemv_int4_vnni(const QuantMatmulArgs& args, int64_t n_begin, int64_t n_end);
}
namespace avx512bf16 {
void quant_gemv_int4_bf16dot(const QuantMatmulArgs& args, int64_t n_begin, int64_t n_end);
void dense_gemv_bf16_dot(const DenseGemvArgs& args, int64_t n_begin, int64_t n_end);
}
namespace avx512amx {
bool enable_amx();  // whether the CPU has AMX-BF16 and Linux let this process use the tiles
void dense_gemv_bf16_amx(const DenseGemvArgs& args, int64_t n_begin, int64_t n_end);
}


// Chosen once at load time from the CPU's features; RLHF_FAST_CPU_ISA=scalar|avx2|avx512
// forces a lower level (never a level the CPU lacks).
const KernelTable& active_kernels();
// Returns false (and changes nothing) when the CPU cannot run `isa`.
bool set_active_isa(const char* isa);
bool cpu_supports(const char* isa);

}  // namespace rlhf_fast
