// The LibTorch-facing CUDA path (moe_cuda_bridge.cpp + the raw kernels) against the float64 loop
// references on the CPU: forward and every gradient, float32 and bfloat16, capacity drops, determinism,
// autocast, routing. Built only when LibTorch has CUDA; skips itself when no GPU is visible.
#include <ATen/ATen.h>
#include "btx/kernels/autocast.h"
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>

#include "btx/kernels/moe.h"
#include "moe_reference.h"
#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::Case;
using testing::describe;

using Inputs = testing::MoeInputs;  // float64 on the CPU; each test moves and rounds what it needs
using testing::make_moe_inputs;

// ||a - b|| / ||b|| over the whole tensor (b == 0 everywhere: ||a||).
double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.detach().cpu().to(at::kDouble), bd = b.detach().cpu().to(at::kDouble);
  if (ad.numel() == 0) return 0;
  const double nb = bd.norm().item<double>();
  const double nd = (ad - bd).norm().item<double>();
  if (std::isnan(nd)) return INFINITY;
  return nb > 0 ? nd / nb : nd;
}

class MoeSwigluCuda : public testing::SeededTest {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    testing::SeededTest::SetUp();
  }
};

const at::Device kCuda(at::kCUDA, 0);

// Forward and all five gradients of moe_swiglu on the GPU in `dtype`, against `reference` evaluated in
// float64 on the CPU on the same (dtype-rounded) inputs.
struct Result {
  at::Tensor y, dx, dgates, dw1, dw3, dw2;
};

template <typename Fn>
Result run_with_grads(const Inputs& in, const at::Tensor& dy, at::ScalarType dtype, at::Device device, Fn&& fn) {
  auto leaf = [&](const at::Tensor& t) { return t.to(dtype).to(device).detach().set_requires_grad(true); };
  at::Tensor x = leaf(in.x), gates = leaf(in.gates), w1 = leaf(in.w1), w3 = leaf(in.w3), w2 = leaf(in.w2);
  Result r;
  r.y = fn(x, in.index.to(device), gates, w1, w3, w2);
  torch::autograd::backward({r.y}, {dy.to(dtype).to(device)});
  r.dx = x.grad();
  r.dgates = gates.grad();
  r.dw1 = w1.grad();
  r.dw3 = w3.grad();
  r.dw2 = w2.grad();
  return r;
}

Inputs rounded(const Inputs& in, at::ScalarType dtype) {
  auto r = [&](const at::Tensor& t) { return t.to(dtype).to(at::kDouble); };
  return {r(in.x), in.index, r(in.gates), r(in.w1), r(in.w3), r(in.w2)};
}

// dgates[t, s] = <dy_t, out_ts> with out_ts the ungated expert output: a dot product that can cancel, so in
// bf16 its error is bounded relative to ||dy_t|| ||out_ts||, not to the (possibly tiny) result.
at::Tensor dgate_scale(const Inputs& in, const at::Tensor& dy) {
  const int64_t k = in.index.size(1);
  std::vector<at::Tensor> cols;
  for (int64_t s = 0; s < k; ++s) {
    at::Tensor onehot = at::zeros_like(in.gates);
    onehot.select(1, s).fill_(1.0);
    const at::Tensor out = testing::reference_forward_loops(in.x, in.index, onehot, in.w1, in.w3, in.w2);
    cols.push_back(out.norm(2, {1}) * dy.to(at::kDouble).norm(2, {1}));
  }
  return at::stack(cols, 1);
}

void expect_close(const Result& got, const Result& ref, double tol, const at::Tensor& gate_scale = {}) {
  EXPECT_LE(rel_err(got.y, ref.y), tol) << "y";
  const bool empty = ref.y.numel() == 0;
  auto grad = [&](const at::Tensor& g, const at::Tensor& like) { return g.defined() ? g : at::zeros_like(like); };
  if (empty) return;
  EXPECT_LE(rel_err(grad(got.dx, ref.dx), ref.dx), tol) << "dx";
  if (gate_scale.defined()) {
    const at::Tensor err = (grad(got.dgates, ref.dgates).cpu().to(at::kDouble) - ref.dgates.to(at::kDouble)).abs();
    EXPECT_LE((err / gate_scale.clamp_min(1e-30)).max().item<double>(), tol) << "dgates (scaled)";
  } else {
    EXPECT_LE(rel_err(grad(got.dgates, ref.dgates), ref.dgates), tol) << "dgates";
  }
  EXPECT_LE(rel_err(grad(got.dw1, ref.dw1), ref.dw1), tol) << "dw1";
  EXPECT_LE(rel_err(grad(got.dw3, ref.dw3), ref.dw3), tol) << "dw3";
  EXPECT_LE(rel_err(grad(got.dw2, ref.dw2), ref.dw2), tol) << "dw2";
}

// Tolerances on ||got - ref|| / ||ref||: float32 with fp32 accumulation lands near 1e-7; bfloat16 stores
// h1, h3, the activation and the expert outputs in bf16 (8 mantissa bits, 2^-9 relative rounding each).
constexpr double kTolFloat32 = 1e-5;
constexpr double kTolBFloat16 = 2e-2;

TEST_F(MoeSwigluCuda, ForwardAndGradientsMatchFloat64Loops) {
  const std::vector<Case> cases = {
      {1, 8, 16, 4, 1},       {1, 8, 16, 4, 2},     {37, 12, 20, 8, 2, 3}, {64, 16, 24, 5, 3},
      {50, 8, 8, 1, 1},       {20, 6, 10, 16, 4, 2}, {0, 8, 16, 4, 2},     {129, 7, 9, 3, 3},
  };
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(describe(c) + (dtype == at::kFloat ? " float32" : " bfloat16"));
      const Inputs in = make_moe_inputs(c, at::kDouble);
      const at::Tensor dy = at::randn({c.tokens, c.dim}, at::kDouble);
      const Inputs r = rounded(in, dtype);
      const Result ref = run_with_grads(r, dy.to(dtype).to(at::kDouble), at::kDouble, at::kCPU,
                                        [](const auto&... a) { return testing::reference_forward_autograd(a...); });
      const Result got = run_with_grads(in, dy, dtype, kCuda, [](const auto&... a) { return moe_swiglu(a...); });
      ASSERT_TRUE(got.y.is_cuda());
      EXPECT_EQ(got.y.scalar_type(), dtype);
      if (dtype == at::kFloat) {
        expect_close(got, ref, kTolFloat32);
      } else {
        expect_close(got, ref, kTolBFloat16, dgate_scale(r, dy.to(dtype).to(at::kDouble)));
      }
    }
  }
}

// A shape that fills many thread blocks per kernel; the CPU float64 path (itself checked against the
// loops in moe_swiglu_test) is the reference.
TEST_F(MoeSwigluCuda, LargeShapeMatchesCpuFloat64) {
  const Case c{2048, 256, 512, 8, 2, 1};
  const Inputs in = make_moe_inputs(c, at::kDouble);
  const at::Tensor dy = at::randn({c.tokens, c.dim}, at::kDouble);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(dtype == at::kFloat ? "float32" : "bfloat16");
    const Result ref = run_with_grads(rounded(in, dtype), dy.to(dtype).to(at::kDouble), at::kDouble, at::kCPU,
                                      [](const auto&... a) { return moe_swiglu(a...); });
    const Result got = run_with_grads(in, dy, dtype, kCuda, [](const auto&... a) { return moe_swiglu(a...); });
    expect_close(got, ref, dtype == at::kFloat ? kTolFloat32 : kTolBFloat16);
  }
}

TEST_F(MoeSwigluCuda, CapacityDropsMatchCpuAndReference) {
  const Case c{300, 16, 32, 6, 2};
  const Inputs in = make_moe_inputs(c, at::kDouble);
  for (const double cf : {0.5, 1.0, 1.25}) {
    SCOPED_TRACE("capacity_factor=" + std::to_string(cf));
    MoeOptions opts;
    opts.capacity_factor = cf;
    MoeStats cpu_stats, gpu_stats;
    at::NoGradGuard no_grad;
    moe_swiglu(in.x, in.index, in.gates, in.w1, in.w3, in.w2, opts, &cpu_stats);
    const at::Tensor y = moe_swiglu(in.x.to(at::kFloat).to(kCuda), in.index.to(kCuda),
                                    in.gates.to(at::kFloat).to(kCuda), in.w1.to(at::kFloat).to(kCuda),
                                    in.w3.to(at::kFloat).to(kCuda), in.w2.to(at::kFloat).to(kCuda), opts, &gpu_stats);
    EXPECT_EQ(gpu_stats.dropped, cpu_stats.dropped);
    EXPECT_TRUE(at::equal(gpu_stats.tokens_per_expert.cpu(), cpu_stats.tokens_per_expert));
    const at::Tensor ref = testing::reference_forward_loops(rounded(in, at::kFloat).x, in.index,
                                                            rounded(in, at::kFloat).gates, rounded(in, at::kFloat).w1,
                                                            rounded(in, at::kFloat).w3, rounded(in, at::kFloat).w2, cf);
    EXPECT_LE(rel_err(y, ref), kTolFloat32);
  }
}

TEST_F(MoeSwigluCuda, ForwardAndBackwardAreBitwiseDeterministic) {
  const Case c{1000, 64, 128, 8, 2, 1};
  const Inputs in = make_moe_inputs(c, at::kDouble);
  const at::Tensor dy = at::randn({c.tokens, c.dim}, at::kDouble);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const Result a = run_with_grads(in, dy, dtype, kCuda, [](const auto&... t) { return moe_swiglu(t...); });
    const Result b = run_with_grads(in, dy, dtype, kCuda, [](const auto&... t) { return moe_swiglu(t...); });
    EXPECT_TRUE(bitwise_equal(a.y, b.y));
    EXPECT_TRUE(bitwise_equal(a.dx, b.dx));
    EXPECT_TRUE(bitwise_equal(a.dgates, b.dgates));
    EXPECT_TRUE(bitwise_equal(a.dw1, b.dw1));
    EXPECT_TRUE(bitwise_equal(a.dw3, b.dw3));
    EXPECT_TRUE(bitwise_equal(a.dw2, b.dw2));
    at::NoGradGuard no_grad;  // the inference path runs the same kernels
    const at::Tensor y = moe_swiglu(in.x.to(dtype).to(kCuda), in.index.to(kCuda), in.gates.to(dtype).to(kCuda),
                                    in.w1.to(dtype).to(kCuda), in.w3.to(dtype).to(kCuda), in.w2.to(dtype).to(kCuda));
    EXPECT_TRUE(bitwise_equal(y, a.y.detach()));
  }
}

// Under CUDA autocast the layer runs in bf16 like at::linear and hands float32 gradients to float32 leaves.
TEST_F(MoeSwigluCuda, AutocastRunsInBFloat16) {
  const Case c{128, 32, 64, 4, 2};
  const Inputs in = make_moe_inputs(c, at::kDouble);
  const at::Tensor dy = at::randn({c.tokens, c.dim}, at::kDouble);
  Result got;
  {
    CudaAutocastScope amp(true);
    got = run_with_grads(in, dy, at::kFloat, kCuda, [](const auto&... a) { return moe_swiglu(a...); });
  }
  EXPECT_EQ(got.y.scalar_type(), at::kBFloat16);
  EXPECT_EQ(got.dw1.scalar_type(), at::kFloat);
  const Inputs r = rounded(in, at::kBFloat16);
  const at::Tensor dyr = dy.to(at::kBFloat16).to(at::kDouble);
  const Result ref = run_with_grads(r, dyr, at::kDouble, at::kCPU,
                                    [](const auto&... a) { return testing::reference_forward_autograd(a...); });
  expect_close(got, ref, kTolBFloat16, dgate_scale(r, dyr));
}

TEST_F(MoeSwigluCuda, RoutingMatchesCpu) {
  const at::Tensor logits = at::randn({513, 8}, at::kFloat);
  for (const RouterKind kind : {RouterKind::kSoftmaxTopK, RouterKind::kSparseMixer}) {
    RoutingOptions ro;
    ro.top_k = 2;
    ro.kind = kind;
    ro.training = false;  // deterministic for both routers
    const Routing cpu = route(logits, ro);
    const Routing gpu = route(logits.to(kCuda), ro);
    EXPECT_TRUE(at::equal(gpu.expert_index.cpu(), cpu.expert_index));
    EXPECT_TRUE(all_close(gpu.gates, cpu.gates, 1e-6, 1e-5));
    EXPECT_TRUE(all_close(gpu.probs, cpu.probs, 1e-6, 1e-5));
    EXPECT_NEAR(load_balancing_loss(gpu.probs, gpu.expert_index, 8).item<double>(),
                load_balancing_loss(cpu.probs, cpu.expert_index, 8).item<double>(), 1e-5);
  }
  EXPECT_NEAR(router_z_loss(logits.to(kCuda)).item<double>(), router_z_loss(logits).item<double>(), 1e-4);
}

}  // namespace
}  // namespace btx::kernels
