// Plain C++ interface to the CUDA gae kernel (no torch): the torch binding in registration.cpp
// fills the same GaeArgs as the CPU op does and calls launch_gae.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cpu/kernels.h"

namespace rlhf_fast {

// gae over all `rows` rows of [rows, args.T] inputs of type `dtype`, enqueued on `stream`.
// Inputs have unit time stride and any row stride (in elements); the outputs are contiguous
// fp32 [rows, T] device arrays. Pointers are device pointers. Launches nothing when rows or T
// is 0. Returns the launch's error (cudaSuccess if none); the kernel itself runs later.
cudaError_t launch_gae(const GaeArgs& args, int64_t rows, DTypeIndex dtype, cudaStream_t stream);

}  // namespace rlhf_fast
