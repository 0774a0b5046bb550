// Float64 references for moe_swiglu written as plain loops over (token, slot) — the definition, with no
// sorting, batching or shared code with the library.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace btx::kernels::testing {

// A layer shape for the tests; the last `unused_experts` experts are never chosen.
struct Case {
  int64_t tokens, dim, hidden, experts, k;
  int64_t unused_experts = 0;  // experts no token may pick (empty slices)
};

inline std::string describe(const Case& c) {
  return "T=" + std::to_string(c.tokens) + " D=" + std::to_string(c.dim) + " F=" + std::to_string(c.hidden) +
         " E=" + std::to_string(c.experts) + " k=" + std::to_string(c.k);
}

// Inputs of one moe_swiglu call: which experts each token picks, their gates, and the weights.
struct MoeInputs {
  at::Tensor x, index, gates, w1, w3, w2;
  std::vector<at::Tensor> differentiable() const { return {x, gates, w1, w3, w2}; }
};

// Fresh random inputs drawn in float64 and stored in `dtype`: distinct experts per token, skewed
// popularity (ragged slices), the last `unused_experts` never chosen.
inline MoeInputs make_moe_inputs(const Case& c, at::ScalarType dtype) {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor popularity = at::randn({c.experts}, opt) * 1.5;
  if (c.unused_experts > 0) popularity.narrow(0, c.experts - c.unused_experts, c.unused_experts).fill_(-1e9);
  const at::Tensor scores = at::randn({c.tokens, c.experts}, opt) + popularity;
  MoeInputs in;
  in.index = std::get<1>(scores.topk(c.k, -1));
  in.gates = at::softmax(at::randn({c.tokens, c.k}, opt), -1).to(dtype);
  in.x = at::randn({c.tokens, c.dim}, opt).to(dtype);
  const double s_in = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const double s_out = 1.0 / std::sqrt(static_cast<double>(c.hidden));
  in.w1 = (at::randn({c.experts, c.hidden, c.dim}, opt) * s_in).to(dtype);
  in.w3 = (at::randn({c.experts, c.hidden, c.dim}, opt) * s_in).to(dtype);
  in.w2 = (at::randn({c.experts, c.dim, c.hidden}, opt) * s_out).to(dtype);
  return in;
}

// kept[t * k + s]: whether the assignment survives the capacity (first come, first served in token order).
inline std::vector<bool> reference_kept(const at::Tensor& expert_index, int64_t experts, double capacity_factor) {
  const int64_t tokens = expert_index.size(0), k = expert_index.size(1);
  std::vector<bool> kept(tokens * k, true);
  if (capacity_factor <= 0) return kept;
  const auto cap = static_cast<int64_t>(std::ceil(capacity_factor * tokens * k / static_cast<double>(experts)));
  std::vector<int64_t> used(experts, 0);
  auto idx = expert_index.accessor<int64_t, 2>();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) kept[t * k + s] = used[idx[t][s]]++ < cap;
  }
  return kept;
}

// y[t] = sum_s gate * W2[e] (silu(W1[e] x) * (W3[e] x)), every scalar in double.
inline at::Tensor reference_forward_loops(const at::Tensor& x_in, const at::Tensor& expert_index,
                                          const at::Tensor& gates_in, const at::Tensor& w1_in,
                                          const at::Tensor& w3_in, const at::Tensor& w2_in,
                                          double capacity_factor = 0) {
  const at::Tensor x = x_in.detach().to(at::kDouble), g = gates_in.detach().to(at::kDouble);
  const at::Tensor w1 = w1_in.detach().to(at::kDouble), w3 = w3_in.detach().to(at::kDouble),
                   w2 = w2_in.detach().to(at::kDouble);
  const int64_t tokens = x.size(0), dim = x.size(1), hidden = w1.size(1), k = expert_index.size(1);
  const std::vector<bool> kept = reference_kept(expert_index, w1.size(0), capacity_factor);
  at::Tensor y = at::zeros({tokens, dim}, at::kDouble);
  auto xa = x.accessor<double, 2>();
  auto ga = g.accessor<double, 2>();
  auto ia = expert_index.accessor<int64_t, 2>();
  auto a1 = w1.accessor<double, 3>();
  auto a3 = w3.accessor<double, 3>();
  auto a2 = w2.accessor<double, 3>();
  auto ya = y.accessor<double, 2>();
  std::vector<double> act(hidden);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      if (!kept[t * k + s]) continue;
      const int64_t e = ia[t][s];
      for (int64_t f = 0; f < hidden; ++f) {
        double h1 = 0, h3 = 0;
        for (int64_t d = 0; d < dim; ++d) {
          h1 += a1[e][f][d] * xa[t][d];
          h3 += a3[e][f][d] * xa[t][d];
        }
        act[f] = h1 / (1 + std::exp(-h1)) * h3;
      }
      for (int64_t d = 0; d < dim; ++d) {
        double out = 0;
        for (int64_t f = 0; f < hidden; ++f) out += a2[e][d][f] * act[f];
        ya[t][d] += ga[t][s] * out;
      }
    }
  }
  return y;
}

// The same definition built from per-(token, slot) ATen ops so autograd can differentiate it: the
// gradient reference for the hand-written backward.
inline at::Tensor reference_forward_autograd(const at::Tensor& x, const at::Tensor& expert_index,
                                             const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& w3,
                                             const at::Tensor& w2, double capacity_factor = 0) {
  const int64_t tokens = x.size(0), k = expert_index.size(1);
  const std::vector<bool> kept = reference_kept(expert_index, w1.size(0), capacity_factor);
  auto ia = expert_index.accessor<int64_t, 2>();
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < tokens; ++t) {
    at::Tensor row = at::zeros({x.size(1)}, x.options().requires_grad(false));
    for (int64_t s = 0; s < k; ++s) {
      if (!kept[t * k + s]) continue;
      const int64_t e = ia[t][s];
      const at::Tensor h1 = at::mv(w1[e], x[t]);
      const at::Tensor h3 = at::mv(w3[e], x[t]);
      row = row + gates[t][s] * at::mv(w2[e], at::silu(h1) * h3);
    }
    rows.push_back(row);
  }
  if (rows.empty()) return at::zeros({0, x.size(1)}, x.options()) + x.sum() * 0;
  return at::stack(rows);
}

}  // namespace btx::kernels::testing
