// SparseMixer-v2, as in GRIN (Liu et al. 2024) and its released Phi-3.5-MoE router, generalised from
// top-2 to top-k by repeating the per-slot step with earlier choices masked out. Per slot s:
//   m      = max of the scores not yet chosen
//   mask j when (m - z_j) / max(|z_j|, m) > 2 * tau       (sparsity threshold)
//   pi_s   = softmax of the unmasked, not-yet-chosen scores
//   e_s    ~ pi_s (Gumbel-max) when training, argmax otherwise
//   gate_s = pi_s[e_s] * omega_s, omega_s = 1 if e_s is the argmax of pi_s or with probability 1/4,
//            else 1/3 (the midpoint / Heun third-order weighting); omega_s = 1 in evaluation.
// Backward (the estimator, not the derivative of the sampled forward):
//   dL/dz_j = sum_s dL/dgate_s * pi_s[e_s] * (1[j == e_s] - pi_s[j]).
// In evaluation this is the exact derivative of gate_s = pi_s[e_s] away from threshold boundaries.
// Computed with ATen ops so the same code runs on every device.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <limits>

#include "sparsemixer.h"

namespace btx::kernels::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SparseMixerFunction : public torch::autograd::Function<SparseMixerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t top_k, double tau,
                               bool training) {
    const double neg_inf = -std::numeric_limits<double>::infinity();
    const at::Tensor scores = logits.contiguous();
    at::Tensor remaining = scores.clone();  // scores with the experts chosen so far set to -inf
    std::vector<at::Tensor> pis, chosen, multipliers, gates;
    for (int64_t s = 0; s < top_k; ++s) {
      auto [m, argmax] = remaining.max(-1, /*keepdim=*/true);
      const at::Tensor factor = scores.abs().clamp_min(m);
      const at::Tensor below = ((m - scores) / factor) > (2.0 * tau);
      const at::Tensor masked = remaining.masked_fill(below, neg_inf);
      at::Tensor pick = argmax;
      if (training) {
        // Gumbel-max: argmax(z - log(Exp(1))) is a draw from softmax(z).
        pick = (masked - at::empty_like(masked).exponential_().log()).argmax(-1, /*keepdim=*/true);
      }
      const at::Tensor pi = at::softmax(masked, -1);
      const at::Tensor mult = pi.gather(-1, pick);
      at::Tensor gate = mult;
      if (training) {
        const at::Tensor is_top = pick == pi.argmax(-1, /*keepdim=*/true);
        const at::Tensor keep_full = at::logical_or(is_top, at::rand_like(mult) > 0.75);
        gate = mult * at::where(keep_full, at::ones_like(mult), at::full_like(mult, 1.0 / 3.0));
      }
      remaining.scatter_(-1, pick, neg_inf);
      pis.push_back(pi);
      chosen.push_back(pick);
      multipliers.push_back(mult);
      gates.push_back(gate);
    }
    const at::Tensor index = at::cat(chosen, -1);
    ctx->save_for_backward({at::stack(pis, 0), index, at::cat(multipliers, -1)});
    ctx->mark_non_differentiable({index});
    return {at::cat(gates, -1), index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& pis = saved[0];    // [k, T, E]
    const at::Tensor& index = saved[1];  // [T, k]
    const at::Tensor& mult = saved[2];   // [T, k]
    const at::Tensor w = grad_outputs[0] * mult;  // [T, k]
    // -sum_s w_s * pi_s  plus  w_s at each chosen expert.
    at::Tensor grad = -(pis * w.t().unsqueeze(-1)).sum(0);
    grad.scatter_add_(-1, index, w);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparsemixer(const at::Tensor& logits, int64_t top_k, double tau, bool training) {
  TORCH_CHECK(tau >= 0.0, "sparsemixer: tau must be non-negative");
  variable_list out = SparseMixerFunction::apply(logits, top_k, tau, training);
  return {out[0], out[1]};
}

}  // namespace btx::kernels::detail
