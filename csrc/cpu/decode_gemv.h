// Plain C++ interface of the decode GEMVs (decode_gemv_avx512vnni.cpp): int4 / int8 weights
// times activations quantized on the fly, with AVX512_VNNI integer dot products.
//
// Why a separate kernel: at decode (M = 1) the fp32 kernels of quant_matmul_kernel.h spend
// ~12 instructions per 32 int4 weights (a 16-entry value table per group of 32, two vpermps,
// two FMAs) and are compute bound at 8-9 G weights/s per core, far under the memory's rate.
//
// int4: activations are quantized to int8 per 32-column block (one weight group or part of
// one), as llama.cpp's Q8 activations for its 4-bit formats: vpdpbusd multiplies 64 unsigned
// 4-bit codes by 64 int8 activations per instruction, so 128 weights (4 blocks) cost 8 vector
// instructions per channel. The activation error (at most 1/254 of the block's largest |x|) is
// ~20x under the weights' own 4-bit rounding error; logits move by well under 1%.
// int8: activations are quantized to int16 per 128 columns (error <= 2^-16 of the chunk's
// largest |x|), vpdpwssd on sign-extended weights: 3 instructions per 32 weights.
//
// With x_k ~= c_k * s per chunk (s = max |x_k| / 127 or / 32767), int4 weights
// w = q * scale + offset give
//   sum_k w_k x_k = sum_blocks (scale * s_b * sum_k q_k c_k + offset * s_b * sum_k c_k),
// int8 weights w = q * scale give scale * sum_chunks s_c * sum_k q_k c_k.
#pragma once

#include <cstdint>

namespace rlhf_fast {

// int4 codes (int8) of one row of x: per quad of 32-column blocks (4q .. 4q + 3), 128 codes in
// the order of the quad's 64 packed bytes: the 16 low-nibble columns of each block, then the 16
// high-nibble columns of each. Blocks past K hold zeros.
// int8 codes (int16): natural column order, zero past K, padded to whole chunks of 128.
struct DecodeActivations {
  const void* codes;     // [M, row_codes]: int8 (int4 weights) or int16 (int8 weights)
  const float* scales;   // [M, chunks]: s of each chunk (0 past K)
  const float* sums;     // int4 only: [M, chunks]: s * sum of the chunk's codes
  int64_t row_codes;     // codes per row
  int64_t chunks;        // chunks per row, padded (int4: to a multiple of 16 blocks)
};

struct DecodeGemvArgs {
  DecodeActivations x;
  int64_t M, K;
  const void* qdata;  // int8 [N, K] or packed int4 [N, Kp / 2] (rlhf_fast/quant/weight.py)
  int64_t qdata_row_stride;
  const float* scales_f32;      // int8: [N]
  const uint16_t* scales_f16;   // int4: fp16 bits [N, groups]
  const uint16_t* offsets_f16;  // int4: fp16 bits [N, groups]
  int64_t groups;               // int4: groups per row (also the row stride of scales)
  int64_t group_size;           // int4: a multiple of 32
  const int32_t* group_index;   // int4: per block window of 16, [chunks]: block -> group - base
  const float* bias;            // nullptr: none
  float* y;                     // [M, N] fp32
  int64_t y_row_stride;
};

namespace avx512vnni {
// Quantize rows of fp32 x ([M, K], row stride x_stride) into the layouts above. They return
// false when x holds a NaN or an inf, which no code represents (the codes are then garbage).
bool quantize_int4_activations(const float* x, int64_t x_stride, int64_t M, int64_t K,
                               int64_t chunks, int8_t* codes, float* scales, float* sums);
bool quantize_int8_activations(const float* x, int64_t x_stride, int64_t M, int64_t K,
                               int64_t chunks, int16_t* codes, float* scales);
// Output channels [n_begin, n_end) of every row.
void decode_gemv_int4(const DecodeGemvArgs& args, int64_t n_begin, int64_t n_end);
void decode_gemv_int8(const DecodeGemvArgs& args, int64_t n_begin, int64_t n_end);
}  // namespace avx512vnni

}  // namespace rlhf_fast
