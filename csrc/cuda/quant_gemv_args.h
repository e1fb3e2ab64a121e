// The argument block of the quantized GEMV (quant_gemv.cu), shared by its launcher and its
// CPU emulation: plain C++, no CUDA headers.
#pragma once

#include <cstdint>

namespace rlhf_fast {

// y[M, N] = x[M, K] @ dequantize(W).T (+ bias). x and y have x's dtype (`dtype`), unit column
// stride and any row stride (in elements). All pointers are device pointers.
//   int8: qdata int8 [N, K] rows qdata_row_stride bytes apart; scales fp32 [N].
//   int4: qdata uint8 [N, Kp / 2] (Kp = K rounded up to group_size), 16-byte aligned, rows
//         qdata_row_stride bytes apart (a multiple of 16); scales and offsets fp16 [N, Kp / g],
//         rows group_row_stride elements apart; group_size a multiple of 32.
struct QuantGemvArgs {
  const void* x;
  int64_t x_row_stride;
  const void* qdata;
  int64_t qdata_row_stride;
  const void* scales;   // int8: const float*; int4: fp16 bits (const uint16_t*)
  const void* offsets;  // int4 only: fp16 bits
  int64_t group_row_stride;
  int64_t group_size;
  const float* bias;  // nullptr: no bias
  void* y;
  int64_t y_row_stride;
  int64_t M, N, K;
};

}  // namespace rlhf_fast
