// Weight-only quantized GEMV on the GPU: y = x @ dequantize(W).T (+ bias) for one row of x
// (decoding one token), W in the int8 or int4 format of rlhf_fast/quant/weight.py.
//
// Why it is shaped like this. At M = 1 every weight is used for exactly one multiply-add, so
// the kernel is bound by reading the weight (a 4096 x 11008 int4 matrix is 22.5 MB; x is 8 to
// 32 KB and stays in L1/L2). The goal is to stream each weight byte from DRAM exactly once, in
// full 128-byte lines, with enough loads in flight to cover DRAM latency:
//   * one warp per output element y[m, n]: its 32 lanes read consecutive 16-byte pieces of row
//     n, so one load instruction covers 512 contiguous bytes (int4: 1024 weights), and no
//     weight is ever shared between warps. A row's dot product needs no shared memory and no
//     __syncthreads: the lanes' partial sums meet in a 5-step __shfl_xor_sync butterfly.
//   * 16-byte loads through the read-only path (__ldg), kUnroll = 4 of them issued before any
//     is used, so a lane has 64 bytes (a warp 2 KB) in flight; with 4 warps per block and many
//     blocks per SM that is enough to keep HBM busy.
//   * int4 never dequantizes: an int4 block of 32 codes lies inside one group (groups are
//     multiples of 32), and sum x (q s + o) = s * sum x q + o * sum x, so a block costs 32
//     multiply-adds of x with the raw codes, 32 adds for sum x, and two group constants. The
//     packed layout puts q[32b + j] in the low and q[32b + 16 + j] in the high nibble of byte
//     16b + j, so the low nibbles of a 16-byte load pair with 16 consecutive x and the high
//     nibbles with the next 16: x is read with 16-byte loads too, in order.
//   * Accumulation is fp32 (fp16 / bf16 x are widened exactly on load); the result is rounded
//     to x's dtype once. No fast-math: the op promises the reference's fp32 arithmetic.
// Edges: K need not be a multiple of 32 (int4 reads blocks up to ceil(K / 32), never the pad,
// and x past K reads as 0); int8 rows that are not 16-byte multiples (K % 16 != 0) or
// unaligned x fall back to narrower loads of the same coalesced pattern.
//
// M > 1 runs the rows of x along gridDim.y: correct, but W is re-read once per row (mostly from
// L2), so prefill-sized M belongs to a GEMM (the Triton kernel, kernels/quant_matmul.py).
//
// The per-lane program is plain C++ in quant_gemv_lane.cuh, which the CPU tests run in
// emulation (tests/quant_gemv_cuda_emulator.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/quant_gemv.cuh"
#include "cuda/quant_gemv_lane.cuh"

namespace rlhf_fast {
namespace quant_gemv {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int64_t kMaxGridY = 65535;

template <class D>
__device__ __forceinline__ void store(void* y, int64_t index, float value);
template <>
__device__ __forceinline__ void store<F32>(void* y, int64_t index, float value) {
  static_cast<float*>(y)[index] = value;
}
template <>
__device__ __forceinline__ void store<BF16>(void* y, int64_t index, float value) {
  static_cast<__nv_bfloat16*>(y)[index] = __float2bfloat16_rn(value);
}
template <>
__device__ __forceinline__ void store<F16>(void* y, int64_t index, float value) {
  static_cast<__half*>(y)[index] = __float2half_rn(value);
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <class D, bool kInt4>
__global__ void __launch_bounds__(kThreads)
    quant_gemv_kernel(const QuantGemvArgs args, const bool vector_x, const bool vector_w) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= args.N) return;  // n is the same for the whole warp: no lane is left behind
  for (int64_t m = blockIdx.y; m < args.M; m += gridDim.y) {
    float total;
    if constexpr (kInt4) {
      total = warp_sum(int4_lane_partial<D>(args, m, n, lane, vector_x));
      if (lane == 0) store<D>(args.y, m * args.y_row_stride + n, finish_int4(args, n, total));
    } else {
      total = warp_sum(int8_lane_partial<D>(args, m, n, lane, vector_x, vector_w));
      if (lane == 0) store<D>(args.y, m * args.y_row_stride + n, finish_int8(args, n, total));
    }
  }
}

template <class D, bool kInt4>
cudaError_t launch(const QuantGemvArgs& args, cudaStream_t stream) {
  if (args.M <= 0 || args.N <= 0) return cudaSuccess;
  const int64_t blocks = (args.N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x's limit
  // The same choice as the CPU emulation makes (tests/quant_gemv_cuda_emulator.cpp).
  const LoadPaths paths = choose_load_paths(args, kInt4, sizeof(typename D::raw));
  if (!paths.ok) return cudaErrorInvalidValue;
  const bool vector_x = paths.vector_x, vector_w = paths.vector_w;
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>(args.M < kMaxGridY ? args.M : kMaxGridY));
  quant_gemv_kernel<D, kInt4><<<grid, kThreads, 0, stream>>>(args, vector_x, vector_w);
  return cudaGetLastError();
}

template <bool kInt4>
cudaError_t launch_for(const QuantGemvArgs& args, DTypeIndex dtype, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return launch<F32, kInt4>(args, stream);
    case kBF16:
      return launch<BF16, kInt4>(args, stream);
    case kF16:
      return launch<F16, kInt4>(args, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace quant_gemv

cudaError_t launch_quant_gemv_int4(const QuantGemvArgs& args, DTypeIndex dtype,
                                   cudaStream_t stream) {
  return quant_gemv::launch_for<true>(args, dtype, stream);
}

cudaError_t launch_quant_gemv_int8(const QuantGemvArgs& args, DTypeIndex dtype,
                                   cudaStream_t stream) {
  return quant_gemv::launch_for<false>(args, dtype, stream);
}

}  // namespace rlhf_fast
