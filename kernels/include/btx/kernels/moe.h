// Public MoE operators. All functions are differentiable (autograd functions underneath) and work on
// CPU tensors; CUDA tensors take the CUDA path when the library was built with CUDA and LibTorch has it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace btx::kernels {

enum class RouterKind {
  kSoftmaxTopK,   // softmax over experts, top-k, gates renormalised over the k (Mixtral semantics)
  kSparseMixer,   // SparseMixer-v2 (GRIN): sampled top-k with the midpoint-method gradient estimator
};

struct RoutingOptions {
  int64_t top_k = 2;
  RouterKind kind = RouterKind::kSoftmaxTopK;
  bool training = true;
  double jitter = 0.0;        // multiplicative input jitter epsilon (Switch); 0 disables
  double sparsemixer_tau = 0.1;  // SparseMixer-v2 sampling/threshold temperature-like parameter
};

struct Routing {
  at::Tensor expert_index;  // [T, k] int64, expert chosen for each (token, slot)
  at::Tensor gates;         // [T, k] same dtype as logits, differentiable w.r.t. logits
  at::Tensor probs;         // [T, E] softmax(logits), differentiable
};

// logits: [T, E] router logits.
Routing route(const at::Tensor& logits, const RoutingOptions& opts);

// Switch-style auxiliary loss alpha * E * sum_i f_i * P_i, where f_i is the fraction of (token, slot)
// assignments to expert i and P_i the mean router probability of expert i. Returns an unscaled value
// (alpha = 1); callers multiply by their coefficient.
at::Tensor load_balancing_loss(const at::Tensor& probs, const at::Tensor& expert_index, int64_t num_experts);

// ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.
at::Tensor router_z_loss(const at::Tensor& logits);

struct MoeStats {
  at::Tensor tokens_per_expert;  // [E] int64, assignments per expert after capacity (if any)
  int64_t dropped = 0;           // (token, slot) assignments dropped by the capacity factor
};

struct MoeOptions {
  // <= 0: dropless (default). > 0: each expert takes at most ceil(capacity_factor * T * k / E)
  // assignments, in token order; the rest are dropped (contribute zero) and counted in MoeStats.
  double capacity_factor = 0.0;
};

// SwiGLU experts applied to routed tokens, combined with the gates:
//   y[t] = sum_s gates[t,s] * W2[e] (silu(W1[e] x[t]) * (W3[e] x[t])),  e = expert_index[t,s]
// x: [T, D]; w1, w3: [E, F, D] (gate and up projections, HF Mixtral w1/w3 layout per expert);
// w2: [E, D, F] (down projection). Returns [T, D]. Gradients flow to x, gates, w1, w2, w3.
at::Tensor moe_swiglu(const at::Tensor& x, const at::Tensor& expert_index, const at::Tensor& gates,
                      const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                      const MoeOptions& opts = {}, MoeStats* stats = nullptr);

// Whether this build has the CUDA path compiled in (does not say whether a GPU is present).
bool cuda_compiled();

// --- Additions beyond the original contract (used by moe_swiglu; exposed for tests and analysis) ---

// Assignments of (token, slot) pairs to experts, sorted by expert (stable: token order within an expert).
// An assignment is identified by its flat index a = t * k + s into expert_index.
struct DispatchPlan {
  at::Tensor offsets;        // [E + 1] int64: expert e owns rows [offsets[e], offsets[e+1]) of the sorted order
  at::Tensor sorted_assign;  // [N] int64: flat assignment index of each sorted row (N = kept assignments)
  at::Tensor row_of_assign;  // [T * k] int64: sorted row of each assignment, -1 when dropped
  int64_t dropped = 0;       // assignments over capacity
};

// expert_index: [T, k] int64 (CPU or CUDA). capacity_factor as in MoeOptions. Deterministic.
DispatchPlan make_dispatch_plan(const at::Tensor& expert_index, int64_t num_experts, double capacity_factor = 0.0);

// Per-expert capacity ceil(capacity_factor * assignments / E); -1 when dropless (capacity_factor <= 0).
int64_t expert_capacity(int64_t assignments, int64_t num_experts, double capacity_factor);

}  // namespace btx::kernels
