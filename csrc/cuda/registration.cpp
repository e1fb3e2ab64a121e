// CUDA kernels of the rlhf_fast:: torch ops (schemas: csrc/cpu/registration.cpp), and the
// module rlhf_fast._cuda, whose import registers them. Checks, output allocation, device guard
// and stream live here; the kernels themselves see only pointers (csrc/cuda/*.cuh).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/op_checks.h"
#include "cuda/gae.cuh"
#include "cuda/quant_gemv.cuh"

namespace rlhf_fast {
namespace {

void check_2d_like(const at::Tensor& t, const char* name, const at::Tensor& rewards) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [B, T], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == rewards.device(), name, " must be on ", rewards.device(),
                    " (the device of rewards), got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == rewards.sizes(), name, " must have the shape of rewards ",
                    rewards.sizes(), ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const std::optional<at::Tensor>& mask, double gamma,
                                            double lam) {
  TORCH_CHECK_VALUE(rewards.is_cuda(), "rewards must be a CUDA tensor, got ", rewards.device());
  check_2d_like(rewards, "rewards", rewards);
  check_2d_like(values, "values", rewards);
  TORCH_CHECK_TYPE(values.scalar_type() == rewards.scalar_type(),
                   "values must have the dtype of rewards (", rewards.scalar_type(), "), got ",
                   values.scalar_type());
  const DTypeIndex dtype = float_dtype_index(rewards, "rewards");
  if (mask.has_value()) {
    check_2d_like(*mask, "mask", rewards);
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool, got ",
                     mask->scalar_type());
  }

  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const at::Tensor r = unit_stride_rows(rewards);
  const at::Tensor v = unit_stride_rows(values);
  const at::Tensor m = mask.has_value() ? unit_stride_rows(*mask) : at::Tensor();
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto fp32 = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({B, T}, fp32);
  at::Tensor returns = at::empty({B, T}, fp32);

  GaeArgs args{};
  args.rewards = r.const_data_ptr();
  args.values = v.const_data_ptr();
  args.mask = m.defined() ? reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>()) : nullptr;
  args.rewards_row_stride = r.stride(0);
  args.values_row_stride = v.stride(0);
  args.mask_row_stride = m.defined() ? m.stride(0) : 0;
  args.T = T;
  args.gamma = static_cast<float>(gamma);
  args.lam = static_cast<float>(lam);
  args.advantages = advantages.data_ptr<float>();
  args.returns = returns.data_ptr<float>();
  C10_CUDA_CHECK(launch_gae(args, B, dtype, c10::cuda::getCurrentCUDAStream()));
  return {advantages, returns};
}

// ---- quant_matmul_int8 / quant_matmul_int4 (schemas: csrc/cpu/registration.cpp)
//
// Both run the GEMV of csrc/cuda/quant_gemv.cu, built for M = 1 (decoding). Larger M is correct
// but re-reads the weight once per row of x (mostly from L2): prefill-sized batches belong to
// the Triton GEMM (kernels/quant_matmul.py), and a Python "cuda" backend for quant_matmul should
// send M > 1 there.

void check_weight(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef sizes, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on ", x.device(),
                    " (the device of x), got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

DTypeIndex check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [M, in_features], got shape ", x.sizes());
  return float_dtype_index(x, "x");
}

at::Tensor bias_fp32(const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x) {
  if (!bias.has_value()) return at::Tensor();
  float_dtype_index(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N,
                    "] (out_features), got ", bias->sizes());
  TORCH_CHECK_VALUE(bias->device() == x.device(), "bias must be on ", x.device(),
                    " (the device of x), got ", bias->device());
  return bias->to(at::kFloat).contiguous();
}

// The packed int4 rows are read 16 bytes at a time: a view at an odd offset gets a fresh copy.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

at::Tensor run_gemv(QuantGemvArgs& args, bool int4, DTypeIndex dtype, const at::Tensor& x,
                    const at::Tensor& bias32) {
  const int64_t M = x.size(0), N = args.N;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (args.K == 0) return bias32.defined() ? y.copy_(bias32.expand({M, N})) : y.zero_();
  args.x = x.const_data_ptr();
  args.x_row_stride = x.stride(0);
  args.M = M;
  args.bias = bias32.defined() ? bias32.const_data_ptr<float>() : nullptr;
  args.y = y.data_ptr();
  args.y_row_stride = N;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(int4 ? launch_quant_gemv_int4(args, dtype, stream)
                      : launch_quant_gemv_int8(args, dtype, stream));
  return y;
}

at::Tensor quant_matmul_int8_cuda(const at::Tensor& x, const at::Tensor& qdata,
                                  const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  const DTypeIndex dtype = check_x(x);
  TORCH_CHECK_VALUE(qdata.dim() == 2, "qdata must be 2-D [out_features, in_features], got ",
                    qdata.sizes());
  const int64_t N = qdata.size(0), K = x.size(1);
  check_weight(qdata, "qdata", at::kChar, {N, K}, x);
  check_weight(scales, "scales", at::kFloat, {N}, x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xs = unit_stride_rows(x);
  const at::Tensor q = qdata.contiguous(), s = scales.contiguous();
  const at::Tensor bias32 = bias_fp32(bias, N, x);

  QuantGemvArgs args{};
  args.qdata = q.const_data_ptr();
  args.qdata_row_stride = K;
  args.scales = s.const_data_ptr<float>();
  args.N = N;
  args.K = K;
  return run_gemv(args, false, dtype, xs, bias32);
}

at::Tensor quant_matmul_int4_cuda(const at::Tensor& x, const at::Tensor& qdata,
                                  const at::Tensor& scales, const at::Tensor& offsets,
                                  int64_t group_size, int64_t in_features,
                                  const std::optional<at::Tensor>& bias) {
  const DTypeIndex dtype = check_x(x);
  const int64_t groups = check_int4_arguments(x, qdata, group_size, in_features);
  const int64_t N = qdata.size(0), K = in_features;
  check_weight(qdata, "qdata", at::kByte, {N, groups * group_size / 2}, x);
  check_weight(scales, "scales", at::kHalf, {N, groups}, x);
  check_weight(offsets, "offsets", at::kHalf, {N, groups}, x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xs = unit_stride_rows(x);
  const at::Tensor q = aligned_contiguous(qdata);
  const at::Tensor s = scales.contiguous(), o = offsets.contiguous();
  const at::Tensor bias32 = bias_fp32(bias, N, x);

  QuantGemvArgs args{};
  args.qdata = q.const_data_ptr();
  args.qdata_row_stride = groups * group_size / 2;
  args.scales = s.const_data_ptr();
  args.offsets = o.const_data_ptr();
  args.group_row_stride = groups;
  args.group_size = group_size;
  args.N = N;
  args.K = K;
  return run_gemv(args, true, dtype, xs, bias32);
}

}  // namespace
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) {
  m.impl("gae", &rlhf_fast::gae_cuda);
  m.impl("quant_matmul_int8", &rlhf_fast::quant_matmul_int8_cuda);
  m.impl("quant_matmul_int4", &rlhf_fast::quant_matmul_int4_cuda);
}

PYBIND11_MODULE(_cuda, module) {
  module.doc() = "rlhf-fast CUDA kernels; importing registers them as torch.ops.rlhf_fast.*";
}
