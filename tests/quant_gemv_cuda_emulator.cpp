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
      y[m * args.y_row_stride + n] =
          int4 ? finish_int4(args, n, total) : finish_int8(args, n, total);
    }
  }
}

QuantGemvArgs make_args(const void* x, int64_t x_row_stride, const void* qdata,
                        int64_t qdata_row_stride, const void* scales, const void* offsets,
                        int64_t group_row_stride, int64_t group_size, const float* bias,
                        float* y, int64_t M, int64_t N, int64_t K) {
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
  return args;
}

// Runs the grid; -2 if a lane made a 16-byte load from an address the GPU cannot load from.
int run(const QuantGemvArgs& args, int dtype, bool int4, bool vector_x, bool vector_w) {
  misaligned_vector_loads() = 0;
  switch (dtype) {
    case 0:
      run_grid<F32>(args, int4, vector_x, vector_w, static_cast<float*>(args.y));
      break;
    case 1:
      run_grid<BF16>(args, int4, vector_x, vector_w, static_cast<float*>(args.y));
      break;
    case 2:
      run_grid<F16>(args, int4, vector_x, vector_w, static_cast<float*>(args.y));
      break;
    default:
      return -1;
  }
  return misaligned_vector_loads() == 0 ? 0 : -2;
}

}  // namespace

// bits: 4 or 8; dtype: 0 fp32, 1 bf16, 2 fp16 (DTypeIndex). The caller picks the load paths.
// Returns 0, -1 for bad arguments, or -2 for a vector load from an address that is not
// 16-byte aligned (which faults on a GPU).
extern "C" int quant_gemv_emulated(const void* x, int64_t x_row_stride, int dtype,
                                   const void* qdata, int64_t qdata_row_stride,
                                   const void* scales, const void* offsets,
                                   int64_t group_row_stride, int64_t group_size,
                                   const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                                   int bits, int vector_x, int vector_w) {
  if (bits != 4 && bits != 8) return -1;
  if (bits == 4 && (group_size <= 0 || group_size % kBlockWeights != 0)) return -1;
  const QuantGemvArgs args = make_args(x, x_row_stride, qdata, qdata_row_stride, scales, offsets,
                                       group_row_stride, group_size, bias, y, M, N, K);
  return run(args, dtype, bits == 4, vector_x != 0, vector_w != 0);
}

// As quant_gemv_emulated, with the load paths the launcher (quant_gemv.cu) picks for these
// pointers and strides: -1 where it would refuse to launch.
extern "C" int quant_gemv_emulated_as_launched(const void* x, int64_t x_row_stride, int dtype,
                                               const void* qdata, int64_t qdata_row_stride,
                                               const void* scales, const void* offsets,
                                               int64_t group_row_stride, int64_t group_size,
                                               const float* bias, float* y, int64_t M,
                                               int64_t N, int64_t K, int bits) {
  if ((bits != 4 && bits != 8) || dtype < 0 || dtype > 2) return -1;
  const QuantGemvArgs args = make_args(x, x_row_stride, qdata, qdata_row_stride, scales, offsets,
                                       group_row_stride, group_size, bias, y, M, N, K);
  const LoadPaths paths = choose_load_paths(args, bits == 4, dtype == 0 ? 4 : 2);
  if (!paths.ok) return -1;
  return run(args, dtype, bits == 4, paths.vector_x, paths.vector_w);
}

#if defined(QUANT_GEMV_EMULATOR_SELF_TEST)
// Built as a program under AddressSanitizer by the tests: every buffer has exactly the size the
// format gives it (x exactly M x K, so a read past K is caught), and results are compared with
// a double-precision sum over the same codes.
#include <cmath>
#include <cstdio>
#include <type_traits>
#include <vector>

namespace {

uint32_t next_random(uint32_t& state) {
  state = state * 1664525u + 1013904223u;
  return state >> 8;
}

template <class D>
typename D::raw random_activation(uint32_t& state);
template <>
float random_activation<F32>(uint32_t& state) {
  return static_cast<float>(next_random(state) % 2001) / 1000.0f - 1.0f;
}
template <>
uint16_t random_activation<BF16>(uint32_t& state) {  // |x| in [2^-4, 2)
  const uint32_t exponent = 123u + next_random(state) % 5;
  return static_cast<uint16_t>((next_random(state) & 0x807fu) | (exponent << 7));
}

uint16_t random_half(uint32_t& state) {  // |x| in [2^-4, 2)
  const uint32_t exponent = 11u + next_random(state) % 5;
  return static_cast<uint16_t>((next_random(state) & 0x83ffu) | (exponent << 10));
}

template <class D>
int check(int bits, int64_t M, int64_t N, int64_t K, int64_t group_size, bool with_bias,
          uint32_t& state) {
  const int64_t padded = bits == 4 ? (K + group_size - 1) / group_size * group_size : K;
  const int64_t groups = bits == 4 ? padded / group_size : 1;
  std::vector<typename D::raw> x(static_cast<size_t>(M * K));
  for (auto& value : x) {
    if constexpr (std::is_same_v<D, F16>)
      value = random_half(state);
    else
      value = random_activation<D>(state);
  }
  const int64_t row_bytes = bits == 4 ? padded / 2 : K;
  std::vector<uint8_t> qdata(static_cast<size_t>(N * row_bytes));
  for (auto& byte : qdata) byte = static_cast<uint8_t>(next_random(state));
  std::vector<float> scales32(static_cast<size_t>(N));
  std::vector<uint16_t> scales16(static_cast<size_t>(N * groups)), offsets16(scales16.size());
  for (auto& s : scales32) s = static_cast<float>(next_random(state) % 1000 + 1) / 8192.0f;
  for (auto& s : scales16) s = static_cast<uint16_t>(0x2000u + next_random(state) % 0x400u);
  for (auto& o : offsets16) o = static_cast<uint16_t>(0xA400u + next_random(state) % 0x400u);
  std::vector<float> bias(static_cast<size_t>(N));
  for (auto& b : bias) b = static_cast<float>(next_random(state) % 2001) / 1000.0f - 1.0f;
  std::vector<float> y(static_cast<size_t>(M * N));
  const int status = quant_gemv_emulated_as_launched(
      x.data(), K, std::is_same_v<D, F32> ? 0 : std::is_same_v<D, BF16> ? 1 : 2, qdata.data(),
      row_bytes, bits == 4 ? static_cast<const void*>(scales16.data()) : scales32.data(),
      bits == 4 ? offsets16.data() : nullptr, groups, group_size,
      with_bias ? bias.data() : nullptr, y.data(), M, N, K, bits);
  if (status != 0) return 1;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double expected = with_bias ? bias[n] : 0.0, magnitude = std::fabs(expected);
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* row = qdata.data() + n * row_bytes;
        double w;
        if (bits == 8) {
          w = static_cast<int8_t>(row[k]) * static_cast<double>(scales32[n]);
        } else {
          const int64_t b = k / 32, j = k % 32;
          const int q = j < 16 ? row[16 * b + j] & 0xF : row[16 * b + j - 16] >> 4;
          const int64_t g = n * groups + k / group_size;
          w = q * static_cast<double>(half_to_float(scales16[g])) + half_to_float(offsets16[g]);
        }
        const double term = D::to_float(x[m * K + k]) * w;
        expected += term;
        magnitude += std::fabs(term);
      }
      const double error = std::fabs(y[m * N + n] - expected);
      if (!(error <= 1e-5 * magnitude + 1e-6)) {
        std::printf("mismatch bits=%d K=%lld g=%lld m=%lld n=%lld: %g vs %g\n", bits,
                    static_cast<long long>(K), static_cast<long long>(group_size),
                    static_cast<long long>(m), static_cast<long long>(n), y[m * N + n], expected);
        return 1;
      }
    }
  }
  return 0;
}

template <class D>
int check_all(uint32_t& state) {
  int failures = 0;
  for (const int64_t K : {1, 5, 16, 31, 32, 33, 80, 4112, 4200}) {
    for (const int64_t group_size : {32, 64, 96}) {
      failures += check<D>(4, 2, 5, K, group_size, K % 2 == 0, state);
    }
    failures += check<D>(8, 2, 5, K, -1, K % 2 == 1, state);
  }
  return failures;
}

}  // namespace

int main() {
  uint32_t state = 12345;
  const int failures = check_all<F32>(state) + check_all<BF16>(state) + check_all<F16>(state);
  std::printf(failures == 0 ? "ok\n" : "%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
#endif
