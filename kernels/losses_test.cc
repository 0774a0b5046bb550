#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <array>
#include <vector>

#include "btx/kernels/moe.h"
#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class AuxLosses : public testing::SeededTest {};

// E * sum_i f_i P_i with f_i = count_i / (T k), P_i = mean_t probs[t, i]; plain loops.
double reference_load_balance(const at::Tensor& probs, const at::Tensor& index, int64_t experts) {
  const int64_t tokens = probs.size(0), k = index.size(1);
  std::vector<double> f(experts, 0), p(experts, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) f[index[t][s].item<int64_t>()] += 1.0 / (tokens * k);
    for (int64_t e = 0; e < experts; ++e) p[e] += probs[t][e].item<double>() / tokens;
  }
  double sum = 0;
  for (int64_t e = 0; e < experts; ++e) sum += f[e] * p[e];
  return experts * sum;
}

TEST_F(AuxLosses, LoadBalancingMatchesLoopsAndHandExample) {
  for (auto [tokens, experts, k] : std::vector<std::array<int64_t, 3>>{{1, 4, 1}, {40, 8, 2}, {25, 3, 3}}) {
    const at::Tensor logits = at::randn({tokens, experts}, at::kDouble);
    RoutingOptions o;
    o.top_k = k;
    const Routing r = route(logits, o);
    EXPECT_NEAR(load_balancing_loss(r.probs, r.expert_index, experts).item<double>(),
                reference_load_balance(r.probs, r.expert_index, experts), 1e-13);
  }
  // Perfect balance with uniform probabilities gives exactly 1 (the Switch minimum).
  const at::Tensor uniform = at::full({4, 2}, 0.5, at::kDouble);
  const at::Tensor balanced = at::tensor({0, 1, 1, 0, 0, 1, 1, 0}, at::kLong).view({4, 2});
  EXPECT_NEAR(load_balancing_loss(uniform, balanced, 2).item<double>(), 1.0, 1e-15);
  // All assignments to expert 0 with P = (0.75, 0.25): 2 * (1 * 0.75) = 1.5.
  const at::Tensor skewed = at::tensor({0.75, 0.25}, at::kDouble).repeat({3, 1});
  EXPECT_NEAR(load_balancing_loss(skewed, at::zeros({3, 1}, at::kLong), 2).item<double>(), 1.5, 1e-15);
}

TEST_F(AuxLosses, LoadBalancingGradientFlowsOnlyThroughProbs) {
  const int64_t tokens = 7, experts = 5, k = 2;
  const at::Tensor index = std::get<1>(at::randn({tokens, experts}).topk(k, -1));
  const at::Tensor probs = at::softmax(at::randn({tokens, experts}, at::kDouble), -1);
  testing::expect_gradients_match_fd(
      [&](const std::vector<at::Tensor>& v) { return load_balancing_loss(v[0], index, experts); }, {probs});
  // d/dP[t,i] = E * f_i / T exactly.
  const at::Tensor p = probs.clone().set_requires_grad(true);
  const at::Tensor grad = torch::autograd::grad({load_balancing_loss(p, index, experts)}, {p})[0];
  const at::Tensor f = at::bincount(index.reshape({-1}), {}, experts).to(at::kDouble) / (tokens * k);
  EXPECT_TRUE(all_close(grad, (f * experts / tokens).expand({tokens, experts}), 1e-15, 1e-13));
}

TEST_F(AuxLosses, LoadBalancingThroughRouterMatchesFiniteDifferences) {
  const at::Tensor logits = at::randn({9, 4}, at::kDouble);
  testing::expect_gradients_match_fd(
      [&](const std::vector<at::Tensor>& v) {
        RoutingOptions o;
        o.top_k = 2;
        const Routing r = route(v[0], o);
        return load_balancing_loss(r.probs, r.expert_index, 4);
      },
      {logits});
}

TEST_F(AuxLosses, ZLossMatchesLoopsAndFiniteDifferences) {
  const at::Tensor logits = at::randn({11, 6}, at::kDouble) * 4;
  double expected = 0;
  for (int64_t t = 0; t < 11; ++t) {
    double sum = 0;
    for (int64_t e = 0; e < 6; ++e) sum += std::exp(logits[t][e].item<double>());
    expected += std::log(sum) * std::log(sum) / 11;
  }
  EXPECT_NEAR(router_z_loss(logits).item<double>(), expected, 1e-12 * std::abs(expected));
  testing::expect_gradients_match_fd([](const std::vector<at::Tensor>& v) { return router_z_loss(v[0]); },
                                     {at::randn({5, 4}, at::kDouble)});
}

TEST_F(AuxLosses, EmptyBatchGivesZero) {
  const at::Tensor logits = at::randn({0, 4}, at::kDouble).set_requires_grad(true);
  RoutingOptions o;
  const Routing r = route(logits, o);
  EXPECT_EQ(load_balancing_loss(r.probs, r.expert_index, 4).item<double>(), 0.0);
  EXPECT_EQ(router_z_loss(logits).item<double>(), 0.0);
}

}  // namespace
}  // namespace btx::kernels
