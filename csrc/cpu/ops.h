// CPU implementations of the rlhf_fast:: torch ops (registered in registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_fast {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const std::optional<at::Tensor>& mask, double gamma,
                                           double lam);

std::tuple<at::Tensor, at::Tensor> rank_loss_cpu(const at::Tensor& rewards,
                                                 const std::optional<at::Tensor>& mask);

}  // namespace rlhf_fast
