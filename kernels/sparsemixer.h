#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace btx::kernels::detail {

// SparseMixer-v2 router (GRIN). Returns (gates [T, k] differentiable w.r.t. logits, expert_index [T, k]).
std::tuple<at::Tensor, at::Tensor> sparsemixer(const at::Tensor& logits, int64_t top_k, double tau, bool training);

}  // namespace btx::kernels::detail
