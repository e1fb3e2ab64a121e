// CUDA kernels of the rlhf_fast:: torch ops (schemas: csrc/cpu/registration.cpp), and the
// module rlhf_fast._cuda, whose import registers them. Checks, output allocation, device guard
// and stream live here; the kernels themselves see only pointers (csrc/cuda/gae.cuh).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/op_checks.h"
#include "cuda/gae.cuh"

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

}  // namespace
}  // namespace rlhf_fast

TORCH_LIBRARY_IMPL(rlhf_fast, CUDA, m) { m.impl("gae", &rlhf_fast::gae_cuda); }

PYBIND11_MODULE(_cuda, module) {
  module.doc() = "rlhf-fast CUDA kernels; importing registers them as torch.ops.rlhf_fast.*";
}
