// Plain C++ interface to the CUDA quantized GEMV (no torch): the torch binding in
// registration.cpp fills a QuantGemvArgs and calls launch_quant_gemv_int4 / _int8.
// quant_gemv.cu explains the kernel; formats are in rlhf_fast/quant/weight.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpu/kernels.h"  // DTypeIndex
#include "cuda/quant_gemv_args.h"

namespace rlhf_fast {

// Enqueue the kernel on `stream`. Built for M = 1 (decode); M > 1 runs each row of x as its own
// GEMV (the weight is re-read per row, mostly from L2). Launches nothing when M, N is 0.
// Returns the launch's error (cudaSuccess if none); the kernel itself runs later.
cudaError_t launch_quant_gemv_int4(const QuantGemvArgs& args, DTypeIndex dtype,
                                   cudaStream_t stream);
cudaError_t launch_quant_gemv_int8(const QuantGemvArgs& args, DTypeIndex dtype,
                                   cudaStream_t stream);

}  // namespace rlhf_fast
