#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "btx/kernels/moe.h"
#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class SparseMixer : public testing::SeededTest {};

RoutingOptions sm_options(int64_t k, double tau, bool training) {
  RoutingOptions o;
  o.top_k = k;
  o.kind = RouterKind::kSparseMixer;
  o.sparsemixer_tau = tau;
  o.training = training;
  return o;
}

// pi_s for one token given the experts chosen in earlier slots: softmax over the experts that are neither
// chosen nor below the sparsity threshold (m - z_j) / max(|z_j|, m) > 2 tau, m = max remaining score.
std::vector<double> slot_distribution(const std::vector<double>& z, const std::vector<int64_t>& chosen, double tau) {
  const size_t experts = z.size();
  std::vector<bool> alive(experts, true);
  for (int64_t c : chosen) alive[c] = false;
  double m = -INFINITY;
  for (size_t j = 0; j < experts; ++j) if (alive[j]) m = std::max(m, z[j]);
  for (size_t j = 0; j < experts; ++j) {
    if ((m - z[j]) / std::max(std::abs(z[j]), m) > 2 * tau) alive[j] = false;
  }
  std::vector<double> pi(experts, 0.0);
  double sum = 0;
  for (size_t j = 0; j < experts; ++j) if (alive[j]) sum += (pi[j] = std::exp(z[j] - m));
  for (double& v : pi) v /= sum;
  return pi;
}

std::vector<double> row(const at::Tensor& t, int64_t i) {
  std::vector<double> out(t.size(1));
  for (int64_t j = 0; j < t.size(1); ++j) out[j] = t[i][j].item<double>();
  return out;
}

TEST_F(SparseMixer, HandComputedExample) {
  // z = (2, 1, 0), tau = 1 (threshold 2): nothing is masked in slot 1; slot 2 sees (1, 0).
  const at::Tensor logits = at::tensor({2.0, 1.0, 0.0}, at::kDouble).view({1, 3}).set_requires_grad(true);
  const Routing r = route(logits, sm_options(2, 1.0, /*training=*/false));
  const double z1 = std::exp(2.0) + std::exp(1.0) + 1.0;
  const double p0 = std::exp(2.0) / z1, p1 = std::exp(1.0) / z1, p2 = 1.0 / z1;
  const double q1 = std::exp(1.0) / (std::exp(1.0) + 1.0), q2 = 1.0 - q1;
  EXPECT_EQ(r.expert_index[0][0].item<int64_t>(), 0);
  EXPECT_EQ(r.expert_index[0][1].item<int64_t>(), 1);
  EXPECT_NEAR(r.gates[0][0].item<double>(), p0, 1e-15);
  EXPECT_NEAR(r.gates[0][1].item<double>(), q1, 1e-15);
  // d(gate_1 + 2 gate_2)/dz = p0 (e_0 - p) + 2 q1 (e_1 - q), q = (0, q1, q2).
  const at::Tensor grad = torch::autograd::grad({r.gates[0][0] + 2 * r.gates[0][1]}, {logits})[0];
  const at::Tensor expected = at::tensor({p0 * (1 - p0), -p0 * p1 + 2 * q1 * (1 - q1), -p0 * p2 - 2 * q1 * q2},
                                         at::kDouble).view({1, 3});
  EXPECT_TRUE(all_close(grad, expected, 1e-15, 1e-13));

  // tau = 0.1 (threshold 0.2): (2 - 1) / 2 = 0.5 masks expert 1 and 2 in slot 1, so gate_1 = 1 and no
  // gradient flows; slot 2 sees m = 1 and (1 - 0) / 1 = 1 > 0.2 masks expert 2, so gate_2 = 1 too.
  const Routing sparse = route(logits, sm_options(2, 0.1, false));
  EXPECT_EQ(sparse.gates[0][0].item<double>(), 1.0);
  EXPECT_EQ(sparse.gates[0][1].item<double>(), 1.0);
  const at::Tensor g0 = torch::autograd::grad({sparse.gates.sum()}, {logits})[0];
  EXPECT_EQ(g0.abs().max().item<double>(), 0.0);
}

TEST_F(SparseMixer, EvaluationMatchesLoopReference) {
  for (auto [tokens, experts, k, tau] : std::vector<std::tuple<int64_t, int64_t, int64_t, double>>{
           {40, 8, 2, 0.1}, {30, 4, 1, 0.05}, {25, 6, 3, 0.5}, {1, 2, 2, 0.01}}) {
    const at::Tensor logits = at::randn({tokens, experts}, at::kDouble) * 2;
    const Routing r = route(logits, sm_options(k, tau, false));
    for (int64_t t = 0; t < tokens; ++t) {
      const std::vector<double> z = row(logits, t);
      std::vector<int64_t> chosen;
      for (int64_t s = 0; s < k; ++s) {
        const std::vector<double> pi = slot_distribution(z, chosen, tau);
        const int64_t best = std::max_element(pi.begin(), pi.end()) - pi.begin();
        EXPECT_EQ(r.expert_index[t][s].item<int64_t>(), best);
        EXPECT_NEAR(r.gates[t][s].item<double>(), pi[best], 1e-14);
        chosen.push_back(best);
      }
    }
  }
}

TEST_F(SparseMixer, EvaluationGradientMatchesFiniteDifferences) {
  for (double tau : {0.1, 1.0}) {
    const at::Tensor logits = at::randn({6, 5}, at::kDouble);
    const at::Tensor rg = at::randn({6, 2}, at::kDouble);
    testing::expect_gradients_match_fd(
        [&](const std::vector<at::Tensor>& v) { return (route(v[0], sm_options(2, tau, false)).gates * rg).sum(); },
        {logits});
  }
}

TEST_F(SparseMixer, TrainingBackwardIsTheMidpointEstimator) {
  const int64_t tokens = 64, experts = 6, k = 2;
  const double tau = 0.3;
  const at::Tensor logits = (at::randn({tokens, experts}, at::kDouble)).set_requires_grad(true);
  const Routing r = route(logits, sm_options(k, tau, true));
  const at::Tensor upstream = at::randn({tokens, k}, at::kDouble);
  const at::Tensor grad = torch::autograd::grad({(r.gates * upstream).sum()}, {logits})[0];
  at::Tensor expected = at::zeros({tokens, experts}, at::kDouble);
  for (int64_t t = 0; t < tokens; ++t) {
    const std::vector<double> z = row(logits.detach(), t);
    std::vector<int64_t> chosen;
    for (int64_t s = 0; s < k; ++s) {
      const std::vector<double> pi = slot_distribution(z, chosen, tau);
      const int64_t e = r.expert_index[t][s].item<int64_t>();
      ASSERT_GT(pi[e], 0.0) << "sampled a masked or already chosen expert";
      const double omega = r.gates[t][s].item<double>() / pi[e];
      const bool is_argmax = pi[e] == *std::max_element(pi.begin(), pi.end());
      if (is_argmax) {
        EXPECT_NEAR(omega, 1.0, 1e-12);
      } else {
        EXPECT_TRUE(std::abs(omega - 1.0) < 1e-12 || std::abs(omega - 1.0 / 3.0) < 1e-12) << omega;
      }
      const double w = upstream[t][s].item<double>() * pi[e];
      for (int64_t j = 0; j < experts; ++j) expected[t][j] += w * ((j == e ? 1.0 : 0.0) - pi[j]);
      chosen.push_back(e);
    }
  }
  EXPECT_TRUE(all_close(grad, expected, 1e-14, 1e-12));
}

TEST_F(SparseMixer, TrainingSamplesFromTheSlotDistribution) {
  const int64_t tokens = 20000;
  const at::Tensor z = at::tensor({1.0, 0.5, 0.0, -0.5}, at::kDouble);
  const at::Tensor logits = z.repeat({tokens, 1});
  const Routing r = route(logits, sm_options(1, 10.0, true));  // tau large: no expert masked
  const at::Tensor p = at::softmax(z, 0);
  const at::Tensor freq = at::bincount(r.expert_index.reshape({-1}), {}, 4).to(at::kDouble) / tokens;
  for (int64_t e = 0; e < 4; ++e) {
    const double pe = p[e].item<double>();
    EXPECT_NEAR(freq[e].item<double>(), pe, 5 * std::sqrt(pe * (1 - pe) / tokens) + 1e-4) << "expert " << e;
  }
  // Non-argmax picks keep the full gate with probability 1/4, else a third of it.
  const at::Tensor picked_other = r.expert_index.reshape({-1}) != 0;
  const at::Tensor omega = r.gates.reshape({-1}) / p.index_select(0, r.expert_index.reshape({-1}));
  const at::Tensor full = (omega.masked_select(picked_other) - 1.0).abs() < 1e-9;
  const double n = static_cast<double>(full.numel());
  EXPECT_NEAR(full.to(at::kDouble).mean().item<double>(), 0.25, 5 * std::sqrt(0.25 * 0.75 / n) + 1e-4);
}

TEST_F(SparseMixer, SameSeedSameRouting) {
  const at::Tensor logits = at::randn({100, 8});
  at::manual_seed(seed_);
  const Routing a = route(logits, sm_options(2, 0.1, true));
  at::manual_seed(seed_);
  const Routing b = route(logits, sm_options(2, 0.1, true));
  EXPECT_TRUE(at::equal(a.expert_index, b.expert_index));
  EXPECT_TRUE(at::equal(a.gates, b.gates));
}

}  // namespace
}  // namespace btx::kernels
