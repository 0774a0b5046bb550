// Router front end and auxiliary losses. Softmax-top-k is composed from ATen ops: each is a fused kernel
// on both devices and autograd's derivative of softmax -> topk -> renormalise is exact, so a custom
// backward would add code without removing work.
#include "btx/kernels/moe.h"
#include "sparsemixer.h"

namespace btx::kernels {

Routing route(const at::Tensor& logits, const RoutingOptions& opts) {
  TORCH_CHECK(logits.dim() == 2, "route: logits must be [T, E], got ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "route: logits must be floating point");
  const int64_t experts = logits.size(1);
  TORCH_CHECK(opts.top_k >= 1 && opts.top_k <= experts, "route: top_k ", opts.top_k, " not in [1, ", experts, "]");
  TORCH_CHECK(opts.jitter >= 0.0 && opts.jitter < 1.0, "route: jitter must be in [0, 1)");

  at::Tensor z = logits;
  if (opts.training && opts.jitter > 0.0) {
    // Switch-style multiplicative jitter; the noise is a constant for autograd.
    const at::Tensor noise = at::empty_like(logits, logits.options().requires_grad(false))
                                 .uniform_(1.0 - opts.jitter, 1.0 + opts.jitter);
    z = logits * noise;
  }

  Routing r;
  r.probs = at::softmax(z, -1);
  switch (opts.kind) {
    case RouterKind::kSoftmaxTopK: {
      auto [top, index] = at::topk(r.probs, opts.top_k, /*dim=*/-1, /*largest=*/true, /*sorted=*/true);
      r.gates = top / top.sum(-1, /*keepdim=*/true);
      r.expert_index = index;
      break;
    }
    case RouterKind::kSparseMixer: {
      auto [gates, index] = detail::sparsemixer(z, opts.top_k, opts.sparsemixer_tau, opts.training);
      r.gates = gates;
      r.expert_index = index;
      break;
    }
  }
  return r;
}

at::Tensor load_balancing_loss(const at::Tensor& probs, const at::Tensor& expert_index, int64_t num_experts) {
  TORCH_CHECK(probs.dim() == 2 && probs.size(1) == num_experts, "load_balancing_loss: probs must be [T, E]");
  TORCH_CHECK(expert_index.dim() == 2 && expert_index.size(0) == probs.size(0) &&
                  expert_index.scalar_type() == at::kLong,
              "load_balancing_loss: expert_index must be int64 [T, k]");
  const int64_t tokens = probs.size(0), k = expert_index.size(1);
  if (tokens == 0 || k == 0) return probs.sum() * 0;  // keeps the graph connected; mean of nothing is NaN
  const at::Tensor flat = expert_index.reshape({-1});
  TORCH_CHECK(flat.min().item<int64_t>() >= 0 && flat.max().item<int64_t>() < num_experts,
              "load_balancing_loss: expert index out of range");
  // f is a count, not differentiable: the gradient reaches the router only through P (Switch).
  const at::Tensor f = at::bincount(flat, {}, num_experts).to(probs.scalar_type()) / static_cast<double>(tokens * k);
  const at::Tensor p = probs.mean(0);
  return (f * p).sum() * static_cast<double>(num_experts);
}

at::Tensor router_z_loss(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "router_z_loss: logits must be [T, E]");
  if (logits.size(0) == 0) return logits.sum() * 0;
  return at::logsumexp(logits, {-1}).square().mean();
}

}  // namespace btx::kernels
