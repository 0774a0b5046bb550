// Counting sort of (token, slot) assignments by expert. A single serial pass is used on purpose: it is
// O(T * k) integer work (microseconds next to the GEMMs) and keeps the order, hence the results, stable
// and independent of the thread count.
#include "btx/kernels/moe.h"
#include "internal.h"

#include <cmath>
#include <limits>
#include <vector>

namespace btx::kernels {

int64_t expert_capacity(int64_t assignments, int64_t num_experts, double capacity_factor) {
  TORCH_CHECK(num_experts > 0, "num_experts must be positive");
  if (capacity_factor <= 0.0) return -1;
  return static_cast<int64_t>(
      std::ceil(capacity_factor * static_cast<double>(assignments) / static_cast<double>(num_experts)));
}

DispatchPlan make_dispatch_plan(const at::Tensor& expert_index, int64_t num_experts, double capacity_factor) {
  TORCH_CHECK(expert_index.dim() == 2, "expert_index must be [T, k], got ", expert_index.sizes());
  TORCH_CHECK(expert_index.scalar_type() == at::kLong, "expert_index must be int64");
  TORCH_CHECK(num_experts > 0, "num_experts must be positive");
#ifdef BTX_TORCH_HAS_CUDA
  if (expert_index.is_cuda()) return detail::make_dispatch_plan_cuda(expert_index, num_experts, capacity_factor);
#endif
  TORCH_CHECK(expert_index.device().is_cpu(), "make_dispatch_plan: unsupported device ", expert_index.device());

  const at::Tensor idx = expert_index.contiguous();
  const int64_t assignments = idx.numel();
  const int64_t* ex = idx.data_ptr<int64_t>();
  const int64_t cap = expert_capacity(assignments, num_experts, capacity_factor);
  const int64_t limit = cap < 0 ? std::numeric_limits<int64_t>::max() : cap;

  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t a = 0; a < assignments; ++a) {
    const int64_t e = ex[a];
    TORCH_CHECK(e >= 0 && e < num_experts, "expert index ", e, " out of range [0, ", num_experts, ")");
    ++counts[e];
  }

  DispatchPlan plan;
  plan.offsets = at::empty({num_experts + 1}, at::kLong);
  int64_t* off = plan.offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) off[e + 1] = off[e] + std::min(counts[e], limit);
  const int64_t kept = off[num_experts];

  plan.sorted_assign = at::empty({kept}, at::kLong);
  plan.row_of_assign = at::empty({assignments}, at::kLong);
  int64_t* sorted = plan.sorted_assign.data_ptr<int64_t>();
  int64_t* row_of = plan.row_of_assign.data_ptr<int64_t>();
  std::vector<int64_t> cursor(off, off + num_experts);
  for (int64_t a = 0; a < assignments; ++a) {
    const int64_t e = ex[a];
    if (cursor[e] < off[e + 1]) {
      row_of[a] = cursor[e];
      sorted[cursor[e]++] = a;
    } else {
      row_of[a] = -1;
    }
  }
  plan.dropped = assignments - kept;
  return plan;
}

}  // namespace btx::kernels
