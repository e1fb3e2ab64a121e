// rlhf_fast::gae on the CPU: checks, output allocation, and parallelism over row blocks.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const std::optional<at::Tensor>& mask, double gamma,
                                           double lam) {
  check_2d_cpu(rewards, "rewards");
  check_2d_cpu(values, "values");
  TORCH_CHECK_VALUE(values.sizes() == rewards.sizes(), "values must have the shape of rewards ",
                    rewards.sizes(), ", got ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == rewards.scalar_type(),
                   "values must have the dtype of rewards (", rewards.scalar_type(), "), got ",
                   values.scalar_type());
  const DTypeIndex dtype = float_dtype_index(rewards, "rewards");

  const at::Tensor r = unit_stride_rows(rewards);
  const at::Tensor v = unit_stride_rows(values);
  at::Tensor mask_holder;
  const uint8_t* mask_data = mask_bytes(mask, rewards, mask_holder);

  const int64_t B = rewards.size(0), T = rewards.size(1);
  at::Tensor advantages = new_output({B, T});
  at::Tensor returns = new_output({B, T});
  if (B == 0 || T == 0) return {advantages, returns};

  GaeArgs args{};
  args.rewards = r.const_data_ptr();
  args.values = v.const_data_ptr();
  args.mask = mask_data;
  args.rewards_row_stride = r.stride(0);
  args.values_row_stride = v.stride(0);
  args.mask_row_stride = mask_data ? mask_holder.stride(0) : 0;
  args.T = T;
  args.gamma = static_cast<float>(gamma);
  args.lam = static_cast<float>(lam);
  args.advantages = advantages.data_ptr<float>();
  args.returns = returns.data_ptr<float>();

  const KernelTable& kernels = active_kernels();
  const GaeFn kernel = kernels.gae[dtype];
  const int64_t width = kernels.width;
  const int64_t blocks = (B + width - 1) / width;
  // Enough work per task (~32K elements) that thread start-up does not dominate small inputs.
  const int64_t grain = std::max<int64_t>(1, 32768 / (width * T));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    kernel(args, first * width, std::min(last * width, B));
  });
  return {advantages, returns};
}

}  // namespace rlhf_fast
