#include "btx/kernels/checkpoint.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <torch/csrc/autograd/autograd.h>

#include <fstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class Checkpoint : public testing::SeededTest {};

// A residual MLP block with dropout (random: the re-run must draw the same mask) and two outputs.
std::vector<at::Tensor> block(const std::vector<at::Tensor>& in) {
  const at::Tensor &x = in[0], &w1 = in[1], &b1 = in[2], &w2 = in[3];
  at::Tensor h = at::tanh(at::linear(x, w1, b1));
  h = at::dropout(h, 0.3, /*train=*/true);
  const at::Tensor y = x + at::linear(h, w2);
  return {y, h.pow(2).mean()};
}

std::vector<at::Tensor> params(int64_t d, int64_t f, at::ScalarType dt) {
  return {at::randn({f, d}, dt).mul_(0.3).requires_grad_(), at::randn({f}, dt).requires_grad_(),
          at::randn({d, f}, dt).mul_(0.3).requires_grad_()};
}

// Three stacked blocks, each optionally checkpointed; returns the gradients of every leaf.
std::vector<at::Tensor> run(bool ckpt, const at::Tensor& x0, const std::vector<std::vector<at::Tensor>>& ps,
                            const at::Tensor& up, uint64_t seed) {
  at::manual_seed(seed);
  at::Tensor x = x0, aux = at::zeros({}, x0.options());
  for (const auto& p : ps) {
    std::vector<at::Tensor> in = {x, p[0], p[1], p[2]};
    const auto out = ckpt ? checkpoint(block, in) : block(in);
    x = out[0];
    aux = aux + out[1];
  }
  std::vector<at::Tensor> leaves = {x0};
  for (const auto& p : ps) leaves.insert(leaves.end(), p.begin(), p.end());
  auto g = torch::autograd::grad({(x * up).sum() + aux}, leaves);
  g.push_back(at::rand({1}));  // where the default generator stands afterwards
  return g;
}

TEST_F(Checkpoint, GradientsEqualWithoutCheckpointing) {
  for (at::ScalarType dt : {at::kDouble, at::kFloat}) {
    const at::Tensor x = at::randn({5, 7, 8}, dt).requires_grad_();
    std::vector<std::vector<at::Tensor>> ps = {params(8, 12, dt), params(8, 12, dt), params(8, 12, dt)};
    const at::Tensor up = at::randn({5, 7, 8}, dt);
    const auto plain = run(false, x, ps, up, seed_);
    const auto ckpt = run(true, x, ps, up, seed_);
    ASSERT_EQ(plain.size(), ckpt.size());
    // Same ops on the same values: equal up to the order autograd sums the three blocks' contributions.
    for (size_t i = 0; i < plain.size(); ++i) EXPECT_TRUE(all_close(ckpt[i], plain[i], 1e-14, 1e-6)) << "leaf " << i;
  }
}

TEST_F(Checkpoint, FrozenInputsAndNoGradMode) {
  const at::Tensor x = at::randn({3, 8}, at::kDouble);  // no gradient wanted for the input
  auto p = params(8, 4, at::kDouble);
  p[1] = p[1].detach();  // a frozen bias
  const at::Tensor up = at::randn({3, 8}, at::kDouble);
  at::manual_seed(7);
  auto out = checkpoint(block, {x, p[0], p[1], p[2]});
  const auto g = torch::autograd::grad({(out[0] * up).sum()}, {p[0], p[2]});
  at::manual_seed(7);
  out = block({x, p[0], p[1], p[2]});
  const auto want = torch::autograd::grad({(out[0] * up).sum()}, {p[0], p[2]});
  EXPECT_TRUE(all_close(g[0], want[0], 1e-15, 1e-12));
  EXPECT_TRUE(all_close(g[1], want[1], 1e-15, 1e-12));
  at::NoGradGuard ng;
  EXPECT_FALSE(checkpoint(block, {x, p[0], p[1], p[2]})[0].requires_grad());
}

int64_t current_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}

// Between forward and backward, checkpointed blocks hold only their inputs: 8 blocks with a 4x-wide hidden layer
// keep ~10 activations of the input's size each without checkpointing (tanh, dropout mask and output, ...).
TEST_F(Checkpoint, HoldsLessActivationMemory) {
  if (current_rss_bytes() < 0) GTEST_SKIP() << "no /proc/self/status";
  // Large blocks straight from and back to the kernel, so that the resident size follows the live tensors
  // (glibc would otherwise keep freed blocks of the warm-up run and reuse them).
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  const int64_t rows = 1024, d = 128;  // 512 KiB per [rows, d] float tensor, 2 MiB per hidden
  std::vector<std::vector<at::Tensor>> ps;
  for (int i = 0; i < 8; ++i) ps.push_back(params(d, 4 * d, at::kFloat));
  auto held = [&](bool ckpt) {
    const at::Tensor x0 = at::randn({rows, d}).requires_grad_();
    const int64_t before = current_rss_bytes();
    at::Tensor x = x0;
    for (const auto& p : ps) x = (ckpt ? checkpoint(block, {x, p[0], p[1], p[2]}) : block({x, p[0], p[1], p[2]}))[0];
    const int64_t grown = current_rss_bytes() - before;
    x.sum().backward();
    return grown;
  };
  held(false);  // warm the allocator and the thread pool
  const int64_t plain = held(false), ckpt = held(true);
  std::cout << "activation memory between forward and backward: " << plain / (1 << 20) << " MiB plain, "
            << ckpt / (1 << 20) << " MiB checkpointed\n";
  EXPECT_GT(plain, 8 * 3 * rows * 4 * d * 4 / 2);  // at least half of the 3 hidden-sized tensors per block
  EXPECT_LT(ckpt, plain / 4);
}

TEST_F(Checkpoint, PeakHostMemoryProbe) {
  EXPECT_GT(host_peak_bytes(), 0);
}

}  // namespace
}  // namespace btx::kernels
