// The CUDA quantized GEMV's lane program (csrc/cuda/quant_gemv_lane.cuh) run on the CPU, for
// tests/test_quant_gpu_kernels.py: for each output element one CPU thread plays the warp's 32
// lanes in turn, sums their partials in the order of the GPU's xor butterfly and applies the
// same epilogue. Built with g++ into a shared library, called through ctypes. Outputs are fp32
// (the GPU's final rounding to fp16 / bf16 is left to the GPU tests).
#include "cuda/quant_gemv_lane.cuh"

namespace {

using namespace rlhf_fast;
using namespace rlhf_fast::quant_gemv;

template <class D>
void run_grid(const QuantGemvArgs& args, bool int4, bool vector_x, bool vector_w, float* y) {
  for (int64_t m = 0; m < args.M; ++m) {
    for (int64_t n = 0; n < args.N; ++n) {
      float partial[kWarp];
      for (int lane = 0; lane < kWarp; ++lane) {
        partial[lane] = int4 ? int4_lane_partial<D>(args, m, n, lane, vector_x)
                             : int8_lane_partial<D>(args, m, n, lane, vector_x, vector_w);
      }
      const float total = warp_sum_emulated(partial);
      y[m * args.y_row_stride + n] = int4 ? finish_int4(args, n, total) : finish_int8(args, n, total);
    }
  }
}

}  // namespace

// bits: 4 or 8; dtype: 0 fp32, 1 bf16, 2 fp16 (DTypeIndex). Returns 0, or -1 for bad arguments.
extern "C" int quant_gemv_emulated(const void* x, int64_t x_row_stride, int dtype,
                                   const void* qdata, int64_t qdata_row_stride,
                                   const void* scales, const void* offsets,
                                   int64_t group_row_stride, int64_t group_size,
                                   const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                                   int bits, int vector_x, int vector_w) {
  if (bits != 4 && bits != 8) return -1;
  if (bits == 4 && (group_size <= 0 || group_size % kBlockWeights != 0)) return -1;
  QuantGemvArgs args{};
  args.x = x;
  args.x_row_stride = x_row_stride;
  args.qdata = qdata;
  args.qdata_row_stride = qdata_row_stride;
  args.scales = scales;
  args.offsets = offsets;
  args.group_row_stride = group_row_stride;
  args.group_size = group_size;
  args.bias = bias;
  args.y = y;
  args.y_row_stride = N;
  args.M = M;
  args.N = N;
  args.K = K;
  const bool int4 = bits == 4;
  switch (dtype) {
    case 0:
      run_grid<F32>(args, int4, vector_x != 0, vector_w != 0, y);
      return 0;
    case 1:
      run_grid<BF16>(args, int4, vector_x != 0, vector_w != 0, y);
      return 0;
    case 2:
      run_grid<F16>(args, int4, vector_x != 0, vector_w != 0, y);
      return 0;
    default:
      return -1;
  }
}
