// rlhf_fast::quant_matmul_int8 / quant_matmul_int4 on the CPU: checks, fp32 activations,
// and parallelism over output channels (each thread streams its own rows of the weight).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

// 16-bit activations are widened once (M x K is small next to the weight): every dtype gets
// fp32-exact products, except in the int4 VNNI GEMV for 16-bit x (quant_gemv_vnni_avx512.h),
// used only where the CPU lacks AVX512_BF16 (else quant_gemv_bf16dot_avx512.h: exact products
// of x's bf16 terms, fp32 sums).
at::Tensor fp32_rows(const at::Tensor& x) {
  return unit_stride_rows(x.scalar_type() == at::kFloat ? x : x.to(at::kFloat));
}

void check_x(const at::Tensor& x) {
  check_2d_cpu(x, "x");
  float_dtype_index(x, "x");
}

// Activations of the VNNI GEMV (quant_gemv_vnni_avx512.h): per row and 128 columns, int16
// codes round(x / scale) with scale = max |x| / 32767, in the order of the packed nibbles
// (per 64 columns: the 32 of the low nibbles, then the 32 of the high ones); plus the scale and
// the sum of the quantized x (scale * sum of codes). finite: false when x holds a NaN or an
// inf, which have no code (the caller then runs the fp32 kernel, which propagates them).
struct QuantizedActivations {
  std::vector<int16_t> codes;
  std::vector<float> scales, sums;
  bool finite = true;
};

QuantizedActivations quantize_activations(const at::Tensor& x32, int64_t chunks) {
  const int64_t M = x32.size(0), K = x32.size(1);
  QuantizedActivations q;
  q.codes.assign(M * chunks * 128, 0);
  q.scales.assign(M * chunks, 0.0f);
  q.sums.assign(M * chunks, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = x32.const_data_ptr<float>() + m * x32.stride(0);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = 128 * c, end = std::min(begin + 128, K);
      float amax = 0.0f;
      for (int64_t k = begin; k < end; ++k) {
        amax = std::max(amax, std::fabs(x[k]));
        q.finite = q.finite && std::isfinite(x[k]);
      }
      const float inverse = amax > 0.0f ? 32767.0f / amax : 0.0f;
      int16_t* codes = q.codes.data() + (m * chunks + c) * 128;
      int64_t code_sum = 0;
      for (int i = 0; i < 128; ++i) {
        const int half = i / 64, p = i % 32;
        const int64_t column = begin + 64 * half + 32 * (p / 16) + p % 16 + (i % 64 >= 32 ? 16 : 0);
        if (column < end) codes[i] = static_cast<int16_t>(std::nearbyint(x[column] * inverse));
        code_sum += codes[i];
      }
      q.scales[m * chunks + c] = amax / 32767.0f;
      q.sums[m * chunks + c] = amax / 32767.0f * static_cast<float>(code_sum);
    }
  }
  return q;
}

// Activations of the bf16-dot GEMV (quant_gemv_bf16dot_avx512.h): x as `parts` bf16 terms
// that sum to it (each the bf16 rounding of what the previous ones left), in the kernel's
// column order, zero past K; the fp32 sum of x over each group (zero past the last group, up
// to a whole window of 16); and per 64-column pair of a window, the lane -> group table
// (the same for every window).
struct SplitActivations {
  std::vector<uint16_t> words;
  std::vector<float> group_sums;
  std::vector<int32_t> pair_groups;
  std::vector<float> pair_bias;
  int64_t row_words = 0, row_groups = 0, row_lanes = 0;  // row strides: words, groups, pair_bias
  bool finite = true;
};

SplitActivations split_activations(const at::Tensor& x32, int64_t parts, int64_t group_size) {
  const int64_t M = x32.size(0), K = x32.size(1);
  const int64_t blocks = (K + 31) / 32, pairs = (blocks + 1) / 2;
  const int64_t groups = (K + group_size - 1) / group_size;
  SplitActivations s;
  s.row_words = pairs * parts * 64;
  s.row_groups = (groups + 15) / 16 * 16;
  s.words.assign(M * s.row_words, 0);
  s.group_sums.assign(M * s.row_groups, 0.0f);
  s.row_lanes = pairs * 16;
  s.pair_bias.assign(M * s.row_lanes, 0.0f);
  std::vector<double> lane_sums(pairs * 16);
  for (int64_t m = 0; m < M; ++m) {
    const float* x = x32.const_data_ptr<float>() + m * x32.stride(0);
    uint16_t* words = s.words.data() + m * s.row_words;
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0.0;
      for (int64_t k = g * group_size; k < std::min(K, (g + 1) * group_size); ++k) sum += x[k];
      s.group_sums[m * s.row_groups + g] = static_cast<float>(sum);
    }
    std::fill(lane_sums.begin(), lane_sums.end(), 0.0);
    for (int64_t k = 0; k < K; ++k) {
      s.finite = s.finite && std::isfinite(x[k]);
      const int64_t pair = k / 64, block = k % 64 / 32, column = k % 32;
      const int64_t word = 32 * (column / 16) + 16 * block + column % 16;
      lane_sums[pair * 16 + word % 32 / 2] += x[k];  // vdpbf16ps: words 2i, 2i + 1 -> lane i
      float rest = x[k];
      for (int64_t t = 0; t < parts && s.finite; ++t) {
        const c10::BFloat16 term(rest);  // torch's rounding, nearest even
        words[(pair * parts + t) * 64 + word] = term.x;
        rest -= static_cast<float>(term);
      }
    }
    for (int64_t i = 0; i < pairs * 16; ++i)
      s.pair_bias[m * s.row_lanes + i] = static_cast<float>(-128.0 * lane_sums[i]);
  }
  const int64_t pairs_per_window = group_size / 4;
  s.pair_groups.resize(pairs_per_window * 16);
  for (int64_t p = 0; p < pairs_per_window; ++p)
    for (int lane = 0; lane < 16; ++lane)
      s.pair_groups[p * 16 + lane] = static_cast<int32_t>((2 * p + lane / 8) * 32 / group_size);
  return s;
}

// Many rows: dequantize tiles of the weight (~1 MiB, so a tile stays in L2, but at least 256
// channels) and multiply each with torch's GEMM (oneDNN), whose bf16 and fp32 flop rates beat
// our register-dequantizing kernel here once the weight is reused by enough rows. fp32 tiles
// hold exactly dequantize()'s values (fp32 and fp16 x, computed in fp32); bf16 tiles round the
// weight to bf16, the precision the bf16 activations already have (oneDNN sums the products in
// fp32 and rounds the result to bf16 once).
//
// Nothing here allocates per tile: each thread dequantizes into its own tile buffer, kept
// across calls (a fresh 1 MiB block per call is an mmap and 256 page faults under glibc), and
// each tile's GEMM writes straight into its column slice of the output (leading dimension N).
void* thread_tile_buffer(size_t bytes) {
  static thread_local std::vector<unsigned char> buffer;
  constexpr size_t kAlign = 64;
  if (buffer.size() < bytes + kAlign) buffer.resize(bytes + kAlign);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (kAlign - address % kAlign) % kAlign;
}

// y = x @ dequantize(W).T (+ bias), in x's dtype (bf16 or fp32; x is already one of them).
at::Tensor dequantized_tiles_matmul(const QuantMatmulArgs& args, DequantizeFn dequantize,
                                    const at::Tensor& x, const at::Tensor& bias32, int64_t N) {
  const int64_t M = x.size(0), K = args.K;
  // ~1 MiB tiles, but at least one per thread: a small layer (N = 688, K = 256) would
  // otherwise be one tile, and one thread would do the whole product. And at least 256
  // channels (up to 8 MiB): 1 MiB is only 93 channels at K = 5632 in bf16 (46 in fp32), and
  // oneDNN's GEMM is slow that narrow. Measured, 128 rows x [2048, 5632] int4 g32, old /
  // new per call over 150 alternating pairs on the noisy 2-vCPU VM: bf16 x 1 thread 0.77,
  // 2 threads 0.84; fp32 x 0.94 and 0.57; at K = 2048 (256 bf16 channels already) fp32 x
  // 0.91 and 1.01. Per thread buffer: max(1 MiB, min(256 K-element rows, 8 MiB)).
  const int64_t row_bytes = K * x.element_size();
  const int64_t min_tile = std::min<int64_t>(256, (int64_t(8) << 20) / row_bytes);
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t widest = std::max((int64_t(1) << 20) / row_bytes, min_tile);
  const int64_t tile = std::max<int64_t>(16, std::min(widest, (per_thread + 15) / 16 * 16));
  const at::Tensor xc = x.contiguous();
  at::Tensor y = new_output({M, N}, x.scalar_type());
  // Worker threads do not inherit the caller's grad / inference mode: without this, a call
  // under torch.inference_mode() fails in mm_out ("inplace update to inference tensor").
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, (N + tile - 1) / tile, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    void* buffer = thread_tile_buffer(static_cast<size_t>(tile * row_bytes));
    for (int64_t t = first; t < last; ++t) {
      const int64_t n0 = t * tile, n1 = std::min(n0 + tile, N);
      dequantize(args, n0, n1, buffer);
      const at::Tensor w = at::from_blob(buffer, {n1 - n0, K}, x.options());
      at::Tensor out = y.narrow(1, n0, n1 - n0);
      at::mm_out(out, xc, w.t());
    }
  });
  // bf16 y: the GEMM already rounded each product sum to bf16 (torch's CPU GEMM has no fp32
  // output for bf16 operands); the bias is added in fp32 and the sum rounded again, which can
  // land one bf16 step from rounding product + bias once (measured: 14% of elements).
  if (bias32.defined()) y.add_(bias32);
  return y;
}

at::Tensor run(QuantMatmulArgs& args, QuantFormat format, const at::Tensor& x,
               const at::Tensor& bias32, int64_t N) {
  const int64_t M = x.size(0);
  const KernelTable& kernels = active_kernels();
  if (format == kInt4 && args.K > 0 && N > 0) {
    if (x.scalar_type() == at::kBFloat16 && M >= 32 && kernels.dequantize_int4_bf16 != nullptr)
      return dequantized_tiles_matmul(args, kernels.dequantize_int4_bf16, x, bias32, N);
    if (x.scalar_type() != at::kBFloat16 && M >= 64)
      return dequantized_tiles_matmul(args, kernels.dequantize_int4_f32, fp32_rows(x), bias32, N)
          .to(x.scalar_type());
  }
  QuantMatmulFn kernel = kernels.quant_matmul[format];
  const at::Tensor x32 = fp32_rows(x);
  args.x = x32.const_data_ptr<float>();
  args.x_row_stride = x32.stride(0);
  QuantizedActivations quantized;
  SplitActivations split;
  // Up to 16 rows the bf16 terms of x (M x K x parts words) stay in L2 while every channel
  // tile reads them. fp32 x (3 terms) only up to 2 rows: measured on Zen 4, 1 thread, weights
  // from DRAM, against the fp32 kernel before it: 1.6-2.0x at 1 row, 1.2-1.6x at 2, but even
  // at 4 rows and 0.8x at 8 (three vdpbf16ps per 32 weights and row outweigh the unpacking).
  // Against aten's _weight_int4pack_mm_for_cpu at g32 (bf16 x), one row, weights from DRAM,
  // Zen 4, medians of interleaved rounds: K x N = 2048 x 5632 bf16 x 1.53-1.68x (1 thread),
  // 1.26-1.38x (2); fp32 x 0.98-1.01x / 0.96x. 5632 x 2048 (long rows: the next tile's codes
  // are prefetched into L2, see quant_gemv_bf16dot_avx512.h) bf16 x 1.04-1.13x / 0.95-0.96x
  // (0.84-0.88x / 0.77-0.80x with the L1 prefetch); fp32 x 0.82-0.88x / 0.73-0.78x, its three
  // vdpbf16ps per 32 weights leave it compute-bound at ~12 GB/s even from L3.
  const int64_t parts =
      x.scalar_type() == at::kBFloat16 ? 1 : x.scalar_type() == at::kHalf ? 2 : 3;
  if (format == kInt4 && M <= (parts == 3 ? 2 : 16) &&
      kernels.quant_gemv_int4_bf16dot != nullptr) {
    split = split_activations(x32, parts, args.group_size);
    if (split.finite) {
      args.x_bf16 = split.words.data();
      args.x_parts = parts;
      args.x_bf16_row_stride = split.row_words;
      args.x_group_sums = split.group_sums.data();
      args.x_group_sums_stride = split.row_groups;
      args.pair_groups = split.pair_groups.data();
      args.x_pair_bias = split.pair_bias.data();
      args.x_pair_bias_row_stride = split.row_lanes;
      kernel = kernels.quant_gemv_int4_bf16dot;
    }
  }
  // Up to 16 rows the quantized x (M x K int16) stays in L2 while every channel tile reads it.
  // (where the bf16-dot GEMV did not take it)
  if (format == kInt4 && kernel == kernels.quant_matmul[format] &&
      x.scalar_type() != at::kFloat && M <= 16 && args.group_size % 128 == 0 &&
      kernels.quant_gemv_int4_vnni != nullptr) {
    args.x_chunks = (args.K + 127) / 128;
    quantized = quantize_activations(x32, args.x_chunks);
    if (quantized.finite) {
      args.x_q = quantized.codes.data();
      args.x_scales = quantized.scales.data();
      args.x_sums = quantized.sums.data();
      kernel = kernels.quant_gemv_int4_vnni;
    }
  }
  at::Tensor y = new_output({M, N});
  if (M > 0 && N > 0) {
    if (args.K == 0) {
      bias32.defined() ? y.copy_(bias32.expand({M, N})) : y.zero_();
    } else {
      args.M = M;
      args.bias = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
      args.y = y.data_ptr<float>();
      args.y_row_stride = N;
      // Tasks of whole 4-channel tiles; at least ~1M weights each so threads pay off.
      const int64_t tiles = (N + 3) / 4;
      const int64_t grain = std::max<int64_t>(1, (1 << 20) / (4 * args.K * std::max<int64_t>(M, 1)));
      at::parallel_for(0, tiles, grain, [&](int64_t first, int64_t last) {
        kernel(args, first * 4, std::min(last * 4, N));
      });
    }
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

at::Tensor quant_matmul_int8_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  check_x(x);
  TORCH_CHECK_VALUE(qdata.dim() == 2, "qdata must be 2-D [out_features, in_features], got ",
                    qdata.sizes());
  const int64_t N = qdata.size(0), K = x.size(1);
  check_weight_tensor(qdata, "qdata", at::kChar, {N, K});
  check_weight_tensor(scales, "scales", at::kFloat, {N});
  const at::Tensor q = qdata.contiguous(), s = scales.contiguous();
  const at::Tensor bias32 = bias_fp32(bias, N);

  QuantMatmulArgs args{};
  args.K = K;
  args.qdata = q.const_data_ptr();
  args.qdata_row_stride = K;
  args.scales_f32 = s.const_data_ptr<float>();
  return run(args, kInt8, x, bias32, N);
}

at::Tensor quant_matmul_int4_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                 const at::Tensor& scales, const at::Tensor& offsets,
                                 int64_t group_size, int64_t in_features,
                                 const std::optional<at::Tensor>& bias) {
  check_x(x);
  const int64_t groups = check_int4_arguments(x, qdata, group_size, in_features);
  const int64_t N = qdata.size(0), K = in_features;
  check_weight_tensor(qdata, "qdata", at::kByte, {N, groups * group_size / 2});
  check_weight_tensor(scales, "scales", at::kHalf, {N, groups});
  check_weight_tensor(offsets, "offsets", at::kHalf, {N, groups});
  const at::Tensor q = qdata.contiguous(), s = scales.contiguous(), o = offsets.contiguous();
  const at::Tensor bias32 = bias_fp32(bias, N);

  QuantMatmulArgs args{};
  args.K = K;
  args.qdata = q.const_data_ptr();
  args.qdata_row_stride = groups * group_size / 2;
  args.scales_f16 = reinterpret_cast<const uint16_t*>(s.const_data_ptr<at::Half>());
  args.offsets_f16 = reinterpret_cast<const uint16_t*>(o.const_data_ptr<at::Half>());
  args.group_row_stride = groups;
  args.group_size = group_size;
  return run(args, kInt4, x, bias32, N);
}

}  // namespace rlhf_fast
