#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <vector>

#include "btx/kernels/moe.h"
#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class SoftmaxTopK : public testing::SeededTest {};

RoutingOptions topk_options(int64_t k, bool training = true) {
  RoutingOptions o;
  o.top_k = k;
  o.kind = RouterKind::kSoftmaxTopK;
  o.training = training;
  return o;
}

TEST_F(SoftmaxTopK, MatchesLoopReference) {
  for (auto [tokens, experts, k] : std::vector<std::array<int64_t, 3>>{{1, 4, 1}, {33, 8, 2}, {17, 5, 5}, {64, 16, 4}, {0, 8, 2}}) {
    SCOPED_TRACE("T=" + std::to_string(tokens) + " E=" + std::to_string(experts) + " k=" + std::to_string(k));
    const at::Tensor logits = at::randn({tokens, experts}, at::kDouble) * 3;
    const Routing r = route(logits, topk_options(k));
    ASSERT_EQ(r.expert_index.sizes(), (std::vector<int64_t>{tokens, k}));
    ASSERT_EQ(r.gates.sizes(), (std::vector<int64_t>{tokens, k}));
    auto la = logits.accessor<double, 2>();
    for (int64_t t = 0; t < tokens; ++t) {
      double mx = -INFINITY, z = 0;
      for (int64_t e = 0; e < experts; ++e) mx = std::max(mx, la[t][e]);
      std::vector<double> p(experts);
      for (int64_t e = 0; e < experts; ++e) z += (p[e] = std::exp(la[t][e] - mx));
      for (double& v : p) v /= z;
      std::vector<int64_t> order(experts);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
      double kept = 0;
      for (int64_t s = 0; s < k; ++s) kept += p[order[s]];
      for (int64_t s = 0; s < k; ++s) {
        EXPECT_EQ(r.expert_index[t][s].item<int64_t>(), order[s]);
        EXPECT_NEAR(r.gates[t][s].item<double>(), p[order[s]] / kept, 1e-14);
      }
      for (int64_t e = 0; e < experts; ++e) EXPECT_NEAR(r.probs[t][e].item<double>(), p[e], 1e-14);
    }
  }
}

TEST_F(SoftmaxTopK, GatesAndProbsGradientsMatchFiniteDifferences) {
  for (auto [tokens, experts, k] : std::vector<std::array<int64_t, 3>>{{6, 5, 2}, {3, 4, 1}, {4, 3, 3}}) {
    const at::Tensor logits = at::randn({tokens, experts}, at::kDouble);
    const at::Tensor rg = at::randn({tokens, k}, at::kDouble), rp = at::randn({tokens, experts}, at::kDouble);
    // Expert choice is piecewise constant; fixed random logits are almost surely away from ties.
    testing::expect_gradients_match_fd(
        [&](const std::vector<at::Tensor>& v) {
          const Routing r = route(v[0], topk_options(k));
          return (r.gates * rg).sum() + (r.probs * rp).sum();
        },
        {logits});
  }
}

TEST_F(SoftmaxTopK, JitterOnlyInTraining) {
  const at::Tensor logits = at::randn({50, 6});
  RoutingOptions eval = topk_options(2, /*training=*/false);
  eval.jitter = 0.5;
  const Routing clean = route(logits, topk_options(2, false));
  const Routing ev = route(logits, eval);
  EXPECT_TRUE(at::equal(clean.gates, ev.gates));
  EXPECT_TRUE(at::equal(clean.probs, ev.probs));

  RoutingOptions train = topk_options(2, /*training=*/true);
  train.jitter = 0.5;
  at::manual_seed(seed_);
  const Routing a = route(logits, train);
  at::manual_seed(seed_);
  const Routing b = route(logits, train);
  EXPECT_TRUE(at::equal(a.gates, b.gates)) << "same seed, same jitter";
  EXPECT_FALSE(at::equal(a.probs, clean.probs)) << "jitter must perturb the logits";
  // Multiplicative noise in [1 - eps, 1 + eps]: log-probabilities move by at most 2 * eps * max|logit|.
  const double bound = 2 * 0.5 * logits.abs().max().item<double>() + 1e-5;
  EXPECT_LE((a.probs.log() - clean.probs.log()).abs().max().item<double>(), bound);
}

TEST_F(SoftmaxTopK, RejectsBadTopK) {
  const at::Tensor logits = at::randn({4, 3});
  EXPECT_THROW(route(logits, topk_options(4)), c10::Error);
  EXPECT_THROW(route(logits, topk_options(0)), c10::Error);
}

}  // namespace
}  // namespace btx::kernels
