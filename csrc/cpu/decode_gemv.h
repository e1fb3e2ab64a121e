// Plain C++ interface of the decode GEMVs (decode_gemv_avx512vnni.cpp): int4 / int8 weights
// times activations quantized to int16 on the fly, with AVX512_VNNI integer dot products.
//
// Why a separate kernel: at decode (M = 1) the fp32 kernels of quant_matmul_kernel.h spend
// ~12 instructions per 32 int4 weights (a 16-entry value table per group of 32, two vpermps,
// two FMAs) and are compute bound at 8-9 G weights/s per core, far under the memory's rate.
// vpdpwssd multiplies 32 int16 codes by 32 int16 activations per instruction, so a 64-weight
// pair of int4 blocks costs ~9 instructions, and int8 ~3 per 32 weights.
//
// Activations: per chunk of columns (32 for int4, one block and so one weight group; 128 for
// int8) x_k ~= c_k * s with c_k = round(x_k / s) in [-32767, 32767], s = max |x_k| / 32767:
// the error is at most 2^-16 of the chunk's largest |x|, finer than bf16 rounding (2^-9).
// int4 weights w = q * scale + offset give
//   sum_k w_k x_k = sum_blocks (scale * s_b * sum_k q_k c_k + offset * s_b * sum_k c_k),
// int8 weights w = q * scale give scale * sum_chunks s_c * sum_k q_k c_k.
#pragma once

#include <cstdint>

namespace rlhf_fast {

// int4 codes of one row of x: per pair of 32-column blocks (2p, 2p + 1), 64 int16 codes in the
// order the packed bytes unpack to: the 16 low-nibble columns of block 2p, those of block
// 2p + 1, then the 16 high-nibble columns of each. Blocks past K hold zeros.
// int8 codes: natural column order, zero past K, padded to whole chunks of 128.
struct DecodeActivations {
  const int16_t* codes;  // [M, row_codes]
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
// Quantize rows of fp32 x ([M, K], row stride x_stride) into the layouts above.
void quantize_int4_activations(const float* x, int64_t x_stride, int64_t M, int64_t K,
                               int64_t chunks, int16_t* codes, float* scales, float* sums);
void quantize_int8_activations(const float* x, int64_t x_stride, int64_t M, int64_t K,
                               int64_t chunks, int16_t* codes, float* scales);
// Output channels [n_begin, n_end) of every row.
void decode_gemv_int4(const DecodeGemvArgs& args, int64_t n_begin, int64_t n_end);
void decode_gemv_int8(const DecodeGemvArgs& args, int64_t n_begin, int64_t n_end);
}  // namespace avx512vnni

}  // namespace rlhf_fast
