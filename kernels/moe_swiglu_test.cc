#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "btx/kernels/moe.h"
#include "moe_reference.h"
#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::Case;
using testing::describe;

using Inputs = testing::MoeInputs;
using testing::make_moe_inputs;

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {1, 8, 16, 4, 1},         // a single token
      {1, 8, 16, 4, 2},         //
      {37, 12, 20, 8, 2, 3},    // ragged, three empty experts
      {64, 16, 24, 5, 3},       // k = 3
      {50, 8, 8, 1, 1},         // a single expert
      {20, 6, 10, 16, 4, 2},    // more experts than tokens can fill
      {0, 8, 16, 4, 2},         // no tokens
      {129, 7, 9, 3, 3},        // k = E: every expert every token
  };
  return all;
}

class MoeSwiglu : public testing::SeededTest {};

TEST_F(MoeSwiglu, ForwardMatchesLoopReferenceFloat64) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_moe_inputs(c, at::kDouble);
    const at::Tensor y = moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2);
    const at::Tensor ref = testing::reference_forward_loops(in.x, in.index, in.gates, in.w1, in.w3, in.w2);
    EXPECT_TRUE(all_close(y, ref, 1e-12, 1e-10));
  }
}

TEST_F(MoeSwiglu, ForwardMatchesLoopReferenceFloat32) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_moe_inputs(c, at::kFloat);
    const at::Tensor y = moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2);
    EXPECT_EQ(y.scalar_type(), at::kFloat);
    const at::Tensor ref = testing::reference_forward_loops(in.x, in.index, in.gates, in.w1, in.w3, in.w2);
    EXPECT_TRUE(all_close(y, ref, 2e-5, 1e-4));
  }
}

TEST_F(MoeSwiglu, ForwardBFloat16WithinRounding) {
  const Case c{33, 16, 32, 4, 2, 1};
  const Inputs in = make_moe_inputs(c, at::kBFloat16);
  const at::Tensor y = moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2);
  const at::Tensor ref = testing::reference_forward_loops(in.x, in.index, in.gates, in.w1, in.w3, in.w2);
  // bf16 keeps 8 significant bits; the GEMM outputs are rounded twice before the float combine.
  EXPECT_TRUE(all_close(y, ref, 4e-2, 4e-2));
}

// Gradients of <moe_swiglu(...), R> against autograd through the per-(token, slot) reference.
void expect_gradients_match_reference(const Inputs& in, double capacity_factor, double atol) {
  std::vector<at::Tensor> mine = in.differentiable(), theirs = in.differentiable();
  for (auto& t : mine) t = t.detach().clone().set_requires_grad(true);
  for (auto& t : theirs) t = t.detach().clone().to(at::kDouble).set_requires_grad(true);
  MoeOptions opts;
  opts.capacity_factor = capacity_factor;
  const at::Tensor y = moe_swiglu(mine[0], in.index, mine[1], mine[2], mine[3], mine[4], opts);
  const at::Tensor r = at::randn(y.sizes(), y.options().dtype(at::kDouble));
  const at::Tensor ref =
      testing::reference_forward_autograd(theirs[0], in.index, theirs[1], theirs[2], theirs[3], theirs[4],
                                          capacity_factor);
  ASSERT_TRUE(all_close(y, ref, atol, 1e-6));
  const auto g_mine = torch::autograd::grad({(y.to(at::kDouble) * r).sum()}, mine);
  const auto g_ref = torch::autograd::grad({(ref * r).sum()}, theirs, {}, false, false, /*allow_unused=*/true);
  const char* names[] = {"dx", "dgates", "dw1", "dw3", "dw2"};
  for (size_t i = 0; i < mine.size(); ++i) {
    const at::Tensor expected = g_ref[i].defined() ? g_ref[i] : at::zeros_like(theirs[i]);
    EXPECT_TRUE(all_close(g_mine[i], expected, atol, 1e-6)) << names[i];
  }
}

TEST_F(MoeSwiglu, GradientsMatchAutogradReferenceFloat64) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    expect_gradients_match_reference(make_moe_inputs(c, at::kDouble), 0.0, 1e-10);
  }
}

TEST_F(MoeSwiglu, GradientsMatchAutogradReferenceFloat32) {
  const Case c{45, 16, 24, 6, 2, 1};
  expect_gradients_match_reference(make_moe_inputs(c, at::kFloat), 0.0, 1e-4);
}

TEST_F(MoeSwiglu, GradientsMatchFiniteDifferences) {
  for (const Case& c : {Case{5, 3, 4, 3, 2}, Case{4, 2, 3, 4, 1, 1}, Case{1, 3, 2, 2, 2}}) {
    SCOPED_TRACE(describe(c));
    const Inputs in = make_moe_inputs(c, at::kDouble);
    const at::Tensor r = at::randn({c.tokens, c.dim}, at::kDouble);
    testing::expect_gradients_match_fd(
        [&](const std::vector<at::Tensor>& v) { return (moe_swiglu(v[0], in.index, v[1], v[2], v[3], v[4]) * r).sum(); },
        in.differentiable());
  }
}

TEST_F(MoeSwiglu, CapacityFactorDropsInTokenOrder) {
  const Case c{40, 8, 12, 4, 2};
  Inputs in = make_moe_inputs(c, at::kDouble);
  // Every token prefers expert 0 then 1: both overflow, experts 2 and 3 stay under capacity.
  in.index = at::zeros({c.tokens, c.k}, at::kLong);
  in.index.select(1, 1).fill_(1);
  in.index.narrow(0, 30, 10).select(1, 0).fill_(2);
  in.index.narrow(0, 35, 5).select(1, 1).fill_(3);
  for (double cf : {0.5, 1.0, 1.25, 4.0}) {
    SCOPED_TRACE("capacity_factor=" + std::to_string(cf));
    MoeOptions opts;
    opts.capacity_factor = cf;
    MoeStats stats;
    const at::Tensor y = moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2, opts, &stats);
    const std::vector<bool> kept = testing::reference_kept(in.index, c.experts, cf);
    std::vector<int64_t> per_expert(c.experts, 0);
    int64_t dropped = 0;
    for (int64_t a = 0; a < c.tokens * c.k; ++a) {
      if (kept[a]) ++per_expert[in.index.view({-1})[a].item<int64_t>()];
      else ++dropped;
    }
    EXPECT_EQ(stats.dropped, dropped);
    ASSERT_EQ(stats.tokens_per_expert.numel(), c.experts);
    for (int64_t e = 0; e < c.experts; ++e) EXPECT_EQ(stats.tokens_per_expert[e].item<int64_t>(), per_expert[e]);
    const at::Tensor ref = testing::reference_forward_loops(in.x, in.index, in.gates, in.w1, in.w3, in.w2, cf);
    EXPECT_TRUE(all_close(y, ref, 1e-12, 1e-10));
    expect_gradients_match_reference(in, cf, 1e-10);
  }
  // Hand-computed: cf = 1 gives capacity ceil(80 / 4) = 20; expert 0 gets 30 requests, expert 1 gets 35.
  MoeOptions opts;
  opts.capacity_factor = 1.0;
  MoeStats stats;
  moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2, opts, &stats);
  EXPECT_EQ(stats.dropped, 10 + 15);
  EXPECT_EQ(expert_capacity(80, 4, 1.0), 20);
  EXPECT_EQ(expert_capacity(80, 4, 0.0), -1);
}

TEST_F(MoeSwiglu, DroplessStatsCountAssignments) {
  const Case c{77, 8, 8, 6, 2, 1};
  const Inputs in = make_moe_inputs(c, at::kFloat);
  MoeStats stats;
  moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2, {}, &stats);
  EXPECT_EQ(stats.dropped, 0);
  EXPECT_TRUE(at::equal(stats.tokens_per_expert, at::bincount(in.index.reshape({-1}), {}, c.experts)));
  EXPECT_EQ(stats.tokens_per_expert[c.experts - 1].item<int64_t>(), 0);
}

TEST_F(MoeSwiglu, DeterministicAtFixedThreads) {
  const Case c{301, 32, 48, 6, 2, 1};
  const Inputs in = make_moe_inputs(c, at::kFloat);
  const at::Tensor r = at::randn({c.tokens, c.dim});
  auto run = [&] {
    std::vector<at::Tensor> v = in.differentiable();
    for (auto& t : v) t = t.detach().clone().set_requires_grad(true);
    const at::Tensor y = moe_swiglu(v[0], in.index, v[1], v[2], v[3], v[4]);
    auto g = torch::autograd::grad({(y * r).sum()}, v);
    g.insert(g.begin(), y.detach());
    return g;
  };
  const auto first = run(), second = run();
  for (size_t i = 0; i < first.size(); ++i) EXPECT_TRUE(bitwise_equal(first[i], second[i])) << "output " << i;
}

TEST_F(MoeSwiglu, OnlyRequestedGradientsAreComputed) {
  const Case c{30, 8, 12, 4, 2};
  const Inputs in = make_moe_inputs(c, at::kDouble);
  const at::Tensor w2 = in.w2.clone().set_requires_grad(true);
  const at::Tensor y = moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, w2);
  const at::Tensor r = at::randn(y.sizes(), y.options());
  const at::Tensor dw2 = torch::autograd::grad({(y * r).sum()}, {w2})[0];
  const at::Tensor w2_ref = in.w2.clone().set_requires_grad(true);
  const at::Tensor ref = testing::reference_forward_autograd(in.x, in.index, in.gates, in.w1, in.w3, w2_ref);
  const at::Tensor dw2_ref = torch::autograd::grad({(ref * r).sum()}, {w2_ref})[0];
  EXPECT_TRUE(all_close(dw2, dw2_ref, 1e-10, 1e-8));
}

TEST_F(MoeSwiglu, InferenceMatchesTrainingForward) {
  const Case c{50, 16, 24, 4, 2};
  const Inputs in = make_moe_inputs(c, at::kFloat);
  const at::Tensor x = in.x.clone().set_requires_grad(true);
  const at::Tensor with_grad = moe_swiglu(x, in.index, in.gates, in.w1, in.w3, in.w2);
  EXPECT_TRUE(with_grad.requires_grad());
  at::Tensor without;
  {
    at::NoGradGuard no_grad;
    without = moe_swiglu(x, in.index, in.gates, in.w1, in.w3, in.w2);
  }
  EXPECT_FALSE(without.requires_grad());
  EXPECT_TRUE(bitwise_equal(with_grad.detach(), without));
}

TEST_F(MoeSwiglu, RejectsBadArguments) {
  const Case c{10, 8, 12, 4, 2};
  const Inputs in = make_moe_inputs(c, at::kFloat);
  at::Tensor bad = in.index.clone();
  bad[3][1] = 4;  // out of range
  EXPECT_THROW(moe_swiglu(in.x, bad, in.gates, in.w1, in.w3, in.w2), c10::Error);
  EXPECT_THROW(moe_swiglu(in.x, in.index, in.gates.to(at::kDouble), in.w1, in.w3, in.w2), c10::Error);
  EXPECT_THROW(moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w1), c10::Error);
}

}  // namespace
}  // namespace btx::kernels
