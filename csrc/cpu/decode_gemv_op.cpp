// rlhf_fast::decode_gemv_int4 / decode_gemv_int8: the few-row GEMVs of token generation,
// with activations quantized per chunk (int8 / int16: decode_gemv.h). On a CPU without
// AVX512_VNNI they are the exact quant_matmul kernels, so callers never need a second path.
// rlhf_fast::decode_gemv_dense: the same products with dense fp32 / bf16 / fp16 weights and
// fp32 activations and sums (dense_gemv_kernel.h, per SIMD level); bf16 activations with bf16
// weights on AMX-BF16 tiles where the CPU has them (dense_gemv_bf16_amx.cpp), else with
// AVX512_BF16's vdpbf16ps where it has that (dense_gemv_bf16_dot_avx512.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#include "cpu/decode_gemv.h"
#include "cpu/decode_ops.h"
#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {
namespace {

// The CPU has AVX512_VNNI and the kernels in use are AVX-512 ones (tests lower the ISA with
// rlhf_fast._C.set_cpu_isa, and then these ops run the kernels of that ISA).
bool have_vnni() {
  static const bool supported =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return supported && std::strcmp(active_kernels().isa, "avx512") == 0;
}

// Small GEMVs finish in microseconds: a thread only pays off with ~256K products of its own
// (`thread_products`: the AMX tiles, faster per product, ask for more).
void parallel_channels(int64_t N, int64_t K, int64_t M,
                       const std::function<void(int64_t, int64_t)>& body,
                       int64_t thread_products = int64_t(1) << 18) {
  const int64_t tiles = (N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, thread_products / (4 * K * std::max<int64_t>(M, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t first, int64_t last) {
    body(first * 4, std::min(last * 4, N));
  });
}

at::Tensor fp32_contiguous(const at::Tensor& x) {
  return (x.scalar_type() == at::kFloat ? x : x.to(at::kFloat)).contiguous();
}

// bf16 x [M, K] as `pairs` pairs of its columns, pair-major: (x[m, 2p], x[m, 2p + 1]) at
// p * M + m, zeros past K (DenseGemvArgs::x_pairs).
std::vector<uint32_t> pack_bf16_pairs(const at::Tensor& x, int64_t pairs) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<uint32_t> packed(pairs * M, 0);
  auto* halves = reinterpret_cast<uint16_t*>(packed.data());
  const auto* bits = static_cast<const uint16_t*>(x.const_data_ptr());
  const int64_t row_stride = x.stride(0), column_stride = x.stride(1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      halves[((k / 2) * M + m) * 2 + k % 2] = bits[m * row_stride + k * column_stride];
  return packed;
}

// bf16 x [M, K] as rows of `ldx` bf16, zeros past K (DenseGemvArgs::x_bf16).
std::vector<uint16_t> pad_bf16_rows(const at::Tensor& x, int64_t ldx) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<uint16_t> padded(M * ldx, 0);
  const auto* bits = static_cast<const uint16_t*>(x.const_data_ptr());
  const int64_t row_stride = x.stride(0), column_stride = x.stride(1);
  for (int64_t m = 0; m < M; ++m) {
    if (column_stride == 1) {
      std::memcpy(padded.data() + m * ldx, bits + m * row_stride, K * 2);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) padded[m * ldx + k] = bits[m * row_stride + k * column_stride];
  }
  return padded;
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x) {
  return x.scalar_type() == y.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

at::Tensor decode_gemv_int4_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                const at::Tensor& scales, const at::Tensor& offsets,
                                int64_t group_size, int64_t in_features,
                                const std::optional<at::Tensor>& bias) {
  check_2d_cpu(x, "x");
  float_dtype_index(x, "x");
  if (!have_vnni() || x.size(0) == 0 || in_features == 0 || qdata.size(0) == 0)
    return quant_matmul_int4_cpu(x, qdata, scales, offsets, group_size, in_features, bias);
  const int64_t groups = check_int4_arguments(x, qdata, group_size, in_features);
  const int64_t M = x.size(0), N = qdata.size(0), K = in_features;
  check_weight_tensor(qdata, "qdata", at::kByte, {N, groups * group_size / 2});
  check_weight_tensor(scales, "scales", at::kHalf, {N, groups});
  check_weight_tensor(offsets, "offsets", at::kHalf, {N, groups});
  const at::Tensor q = qdata.contiguous(), s = scales.contiguous(), o = offsets.contiguous();
  const at::Tensor bias32 = bias_fp32(bias, N);
  const at::Tensor x32 = fp32_contiguous(x);

  const int64_t blocks = (K + 31) / 32;
  const int64_t chunks = (blocks + 15) / 16 * 16;
  std::vector<int8_t> codes(M * chunks * 32);
  std::vector<float> x_scales(M * chunks), x_sums(M * chunks);
  // NaN / inf: the exact kernels, which propagate them as x @ W.T does
  if (!avx512vnni::quantize_int4_activations(x32.const_data_ptr<float>(), K, M, K, chunks,
                                             codes.data(), x_scales.data(), x_sums.data()))
    return quant_matmul_int4_cpu(x, qdata, scales, offsets, group_size, in_features, bias);
  std::vector<int32_t> group_index(chunks);
  for (int64_t b = 0; b < chunks; ++b)
    group_index[b] = static_cast<int32_t>(b * 32 / group_size - (b / 16) * 16 * 32 / group_size);

  at::Tensor y = new_output({M, N});
  DecodeGemvArgs args{};
  args.x = {codes.data(), x_scales.data(), x_sums.data(), chunks * 32, chunks};
  args.M = M;
  args.K = K;
  args.qdata = q.const_data_ptr();
  args.qdata_row_stride = groups * group_size / 2;
  args.scales_f16 = reinterpret_cast<const uint16_t*>(s.const_data_ptr<at::Half>());
  args.offsets_f16 = reinterpret_cast<const uint16_t*>(o.const_data_ptr<at::Half>());
  args.groups = groups;
  args.group_size = group_size;
  args.group_index = group_index.data();
  args.bias = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
  args.y = y.data_ptr<float>();
  args.y_row_stride = N;
  parallel_channels(N, K, M, [&](int64_t n0, int64_t n1) {
    avx512vnni::decode_gemv_int4(args, n0, n1);
  });
  return finish(y, x);
}

at::Tensor decode_gemv_int8_cpu(const at::Tensor& x, const at::Tensor& qdata,
                                const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  check_2d_cpu(x, "x");
  float_dtype_index(x, "x");
  if (!have_vnni() || x.size(0) == 0 || x.size(1) == 0 || qdata.dim() != 2 || qdata.size(0) == 0)
    return quant_matmul_int8_cpu(x, qdata, scales, bias);
  const int64_t M = x.size(0), N = qdata.size(0), K = x.size(1);
  check_weight_tensor(qdata, "qdata", at::kChar, {N, K});
  check_weight_tensor(scales, "scales", at::kFloat, {N});
  const at::Tensor q = qdata.contiguous(), s = scales.contiguous();
  const at::Tensor bias32 = bias_fp32(bias, N);
  const at::Tensor x32 = fp32_contiguous(x);

  const int64_t chunks = (K + 127) / 128;
  std::vector<int16_t> codes(M * chunks * 128);
  std::vector<float> x_scales(M * chunks);
  if (!avx512vnni::quantize_int8_activations(x32.const_data_ptr<float>(), K, M, K, chunks,
                                             codes.data(), x_scales.data()))
    return quant_matmul_int8_cpu(x, qdata, scales, bias);  // NaN / inf: as for int4
  at::Tensor y = new_output({M, N});
  DecodeGemvArgs args{};
  args.x = {codes.data(), x_scales.data(), nullptr, chunks * 128, chunks};
  args.M = M;
  args.K = K;
  args.qdata = q.const_data_ptr();
  args.qdata_row_stride = K;
  args.scales_f32 = s.const_data_ptr<float>();
  args.bias = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
  args.y = y.data_ptr<float>();
  args.y_row_stride = N;
  parallel_channels(N, K, M, [&](int64_t n0, int64_t n1) {
    avx512vnni::decode_gemv_int8(args, n0, n1);
  });
  return finish(y, x);
}

at::Tensor decode_gemv_dense_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  check_2d_cpu(x, "x");
  float_dtype_index(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(M <= kDenseGemvMaxRows, "x must have at most ", kDenseGemvMaxRows,
                    " rows (a decode step's), got ", M);
  check_2d_cpu(weight, "weight");
  const DTypeIndex weight_dtype = float_dtype_index(weight, "weight");
  TORCH_CHECK_VALUE(weight.size(1) == K, "weight must be [out_features, ", K,
                    "] (x's in_features), got ", weight.sizes());
  const at::Tensor w = (K <= 1 || weight.stride(1) == 1) ? weight : weight.contiguous();
  const int64_t N = w.size(0);
  const at::Tensor bias32 = bias_fp32(bias, N);
  // bf16 x and W (a bf16 model's decode step): AMX tiles where the CPU has them, x packed into
  // the pairs their B tiles read; else vdpbf16ps where the CPU has AVX512_BF16, x read as it
  // is; either writes y in bf16. Otherwise x in fp32 and the weights widened to fp32, y in fp32
  // (converted to x's dtype at the end).
  const KernelTable& kernels = active_kernels();
  const bool bf16_inputs = weight_dtype == kBF16 && x.scalar_type() == at::kBFloat16;
  const bool tiles = bf16_inputs && kernels.dense_gemv_bf16_amx != nullptr;
  const bool dot = bf16_inputs && !tiles && kernels.dense_gemv_bf16_dot != nullptr;
  at::Tensor y = new_output({M, N}, tiles || dot ? at::kBFloat16 : at::kFloat);
  if (M == 0 || N == 0 || K == 0) {  // nothing to sum: the bias, or zeros
    if (bias32.defined())
      y.copy_(bias32.expand({M, N}));
    else
      y.zero_();
    return finish(y, x);
  }
  DenseGemvArgs args{};
  args.w = w.const_data_ptr();
  args.bias = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
  args.M = M;
  args.K = K;
  args.N = N;
  args.ldw = N > 1 ? w.stride(0) : K;
  DenseGemvFn kernel;
  at::Tensor x32;
  std::vector<uint32_t> x_pairs;
  std::vector<uint16_t> x_padded;
  if (tiles) {
    x_pairs = pack_bf16_pairs(x, (K + 31) / 32 * 16);
    args.x_pairs = x_pairs.data();
    args.y_bf16 = static_cast<bf16_t*>(y.data_ptr());
    kernel = kernels.dense_gemv_bf16_amx;
  } else if (dot) {
    // rows padded to whole 32-column steps (the kernel reads x in pairs up to there), plus one
    // cache line so that rows of 2^n bytes do not share one L1 set with each other and with
    // the weight rows (a precaution: not measured apart from the kernel's own x copy)
    args.ldx = (K + 31) / 32 * 32 + 32;
    x_padded = pad_bf16_rows(x, args.ldx);
    args.x_bf16 = reinterpret_cast<const bf16_t*>(x_padded.data());
    args.y_bf16 = static_cast<bf16_t*>(y.data_ptr());
    kernel = kernels.dense_gemv_bf16_dot;
  } else {
    x32 = fp32_contiguous(x);
    args.x = x32.const_data_ptr<float>();
    args.y = y.data_ptr<float>();
    kernel = kernels.dense_gemv[weight_dtype];
  }
  // AMX: ~150 products per ns on one core, ~8x the widened kernel, so ~4M products make the
  // ~25 us of work that pays for a second thread (2000 x 256 at 8 rows, 4M products, ran 54 us
  // on two threads and 29 us on one). vdpbf16ps splits as the widened kernel does: with 2^19
  // products a thread, 2000 x 256 at one row stayed on one thread and ran 17.7 us on two,
  // where the widened kernel split and ran 15.4 us (Zen 4).
  parallel_channels(
      N, K, M, [&](int64_t n0, int64_t n1) { kernel(args, n0, n1); },
      tiles ? int64_t(1) << 22 : int64_t(1) << 18);
  return finish(y, x);
}

}  // namespace rlhf_fast
