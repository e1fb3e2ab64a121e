// rlhf_fast::rank_loss on the CPU: the fused kernel per row block, then a deterministic
// reduction (row blocks summed in order, whatever the thread count).
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/ops.h"

namespace rlhf_fast {

std::tuple<at::Tensor, at::Tensor> rank_loss_cpu(const at::Tensor& rewards,
                                                 const std::optional<at::Tensor>& mask) {
  check_2d_cpu(rewards, "rewards");
  const DTypeIndex dtype = float_dtype_index(rewards, "rewards");
  const at::Tensor r = unit_stride_rows(rewards);
  at::Tensor mask_holder;
  const uint8_t* mask_data = mask_bytes(mask, rewards, mask_holder);

  const int64_t B = rewards.size(0), K = rewards.size(1);
  const auto fp32 = rewards.options().dtype(at::kFloat);
  at::Tensor grad = new_output({B, K});

  RankLossArgs args{};
  args.rewards = r.const_data_ptr();
  args.mask = mask_data;
  args.rewards_row_stride = r.stride(0);
  args.mask_row_stride = mask_data ? mask_holder.stride(0) : 0;
  args.K = K;
  args.grad = grad.data_ptr<float>();

  const KernelTable& kernels = active_kernels();
  const RankLossFn kernel = kernels.rank_loss[dtype];
  const int64_t width = kernels.width;
  const int64_t blocks = K > 0 ? (B + width - 1) / width : 0;
  std::vector<RankLossPartial> partials(blocks, RankLossPartial{0.0, 0});
  const int64_t grain = std::max<int64_t>(1, 4096 / (width * std::max<int64_t>(1, K * K)));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(rank_loss_scratch_floats(K, static_cast<int>(width)));
    for (int64_t block = first; block < last; ++block)
      partials[block] = kernel(args, block * width, std::min((block + 1) * width, B),
                               scratch.data());
  });

  double loss_sum = 0.0;
  int64_t pairs = 0;
  for (const RankLossPartial& p : partials) {
    loss_sum += p.loss_sum;
    pairs += p.pairs;
  }
  if (pairs == 0) {
    grad.zero_();
    return {at::scalar_tensor(0.0, fp32), grad};
  }
  grad.mul_(1.0 / static_cast<double>(pairs));
  return {at::scalar_tensor(loss_sum / static_cast<double>(pairs), fp32), grad};
}

}  // namespace rlhf_fast
