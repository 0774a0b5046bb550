#include "btx/kernels/chunked_loss.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class ChunkedCrossEntropy : public testing::SeededTest {};

// Plain float64 loops: mean over rows whose target is not -100 of logsumexp(logits) - logits[target].
std::pair<double, int64_t> reference(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t) {
  const at::Tensor hd = h.to(at::kDouble).contiguous(), wd = w.to(at::kDouble).contiguous();
  auto H = hd.accessor<double, 2>(), W = wd.accessor<double, 2>();
  auto Tt = t.accessor<int64_t, 1>();
  double sum = 0;
  int64_t count = 0;
  for (int64_t r = 0; r < h.size(0); ++r) {
    if (Tt[r] == kIgnoreIndex) continue;
    std::vector<double> logits(w.size(0), 0);
    double m = -INFINITY;
    for (int64_t v = 0; v < w.size(0); ++v) {
      for (int64_t d = 0; d < h.size(1); ++d) logits[v] += H[r][d] * W[v][d];
      m = std::max(m, logits[v]);
    }
    double z = 0;
    for (double x : logits) z += std::exp(x - m);
    sum += m + std::log(z) - logits[Tt[r]];
    ++count;
  }
  return {count > 0 ? sum / count : 0.0, count};
}

at::Tensor targets_with_ignored(int64_t n, int64_t vocab, double ignored_share) {
  at::Tensor t = at::randint(vocab, {n}, at::kLong);
  return t.masked_fill(at::rand({n}).lt(ignored_share), kIgnoreIndex);
}

TEST_F(ChunkedCrossEntropy, MatchesLoopsInFloat64) {
  for (auto [n, d, vocab, chunk] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {1, 4, 5, 1}, {7, 8, 17, 3}, {50, 8, 300, 16}, {33, 4, 40, 64}, {64, 6, 11, 64}}) {
    SCOPED_TRACE(::testing::Message() << "N" << n << " D" << d << " V" << vocab << " chunk " << chunk);
    const at::Tensor h = at::randn({n, d}, at::kDouble), w = at::randn({vocab, d}, at::kDouble);
    const at::Tensor t = targets_with_ignored(n, vocab, 0.3);
    const auto [want, count] = reference(h, w, t);
    const CrossEntropyResult got = chunked_cross_entropy(h, w, t, chunk);
    EXPECT_NEAR(got.loss.item<double>(), want, 1e-12 * std::max(1.0, std::abs(want)));
    EXPECT_EQ(got.count.item<int64_t>(), count);
    EXPECT_NEAR(naive_cross_entropy(h, w, t).loss.item<double>(), want, 1e-12 * std::max(1.0, std::abs(want)));
  }
}

TEST_F(ChunkedCrossEntropy, GradientsMatchNaiveAutogradAndFiniteDifferences) {
  for (int64_t chunk : {1, 5, 13, 100}) {
    const at::Tensor h = at::randn({23, 6}, at::kDouble).requires_grad_(), w = at::randn({19, 6}, at::kDouble).requires_grad_();
    const at::Tensor t = targets_with_ignored(23, 19, 0.25);
    const auto g1 = torch::autograd::grad({chunked_cross_entropy(h, w, t, chunk).loss * 1.7}, {h, w});
    const auto g2 = torch::autograd::grad({naive_cross_entropy(h, w, t).loss * 1.7}, {h, w});
    EXPECT_TRUE(all_close(g1[0], g2[0], 1e-13, 1e-11)) << "chunk " << chunk;
    EXPECT_TRUE(all_close(g1[1], g2[1], 1e-13, 1e-11)) << "chunk " << chunk;
  }
  const at::Tensor t = targets_with_ignored(9, 7, 0.3);
  testing::expect_gradients_match_fd(
      [&](const std::vector<at::Tensor>& x) { return chunked_cross_entropy(x[0], x[1], t, 4).loss; },
      {at::randn({9, 5}, at::kDouble), at::randn({7, 5}, at::kDouble)});
}

TEST_F(ChunkedCrossEntropy, FrozenHeadTakesNoGradient) {
  const at::Tensor h = at::randn({10, 4}, at::kDouble).requires_grad_(), w = at::randn({9, 4}, at::kDouble);
  const at::Tensor t = at::randint(9, {10}, at::kLong);
  const at::Tensor g = torch::autograd::grad({chunked_cross_entropy(h, w, t, 3).loss}, {h})[0];
  const at::Tensor want = torch::autograd::grad({naive_cross_entropy(h, w, t).loss}, {h})[0];
  EXPECT_TRUE(all_close(g, want, 1e-13, 1e-11));
}

TEST_F(ChunkedCrossEntropy, AllIgnoredGivesZeroLossCountAndGradients) {
  const at::Tensor h = at::randn({6, 4}, at::kDouble).requires_grad_(), w = at::randn({5, 4}, at::kDouble).requires_grad_();
  const at::Tensor t = at::full({6}, kIgnoreIndex, at::kLong);
  const CrossEntropyResult r = chunked_cross_entropy(h, w, t, 4);
  EXPECT_EQ(r.loss.item<double>(), 0.0);
  EXPECT_EQ(r.count.item<int64_t>(), 0);
  const auto g = torch::autograd::grad({r.loss}, {h, w});
  EXPECT_EQ(g[0].abs().max().item<double>(), 0.0);
  EXPECT_EQ(g[1].abs().max().item<double>(), 0.0);
}

TEST_F(ChunkedCrossEntropy, Float32WithinToleranceAndDeterministic) {
  const at::Tensor h = at::randn({200, 32}).requires_grad_(), w = (at::randn({1000, 32}) * 0.3).requires_grad_();
  const at::Tensor t = targets_with_ignored(200, 1000, 0.1);
  const double want = reference(h.detach(), w.detach(), t).first;
  const CrossEntropyResult r = chunked_cross_entropy(h, w, t, 48);
  EXPECT_EQ(r.loss.scalar_type(), at::kFloat);
  EXPECT_NEAR(r.loss.item<double>(), want, 1e-5 * want);
  const auto g1 = torch::autograd::grad({r.loss}, {h, w});
  const auto g2 = torch::autograd::grad({chunked_cross_entropy(h, w, t, 48).loss}, {h, w});
  const auto g3 = torch::autograd::grad({naive_cross_entropy(h, w, t).loss}, {h, w});
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(testing::bitwise_equal(g1[i], g2[i]));
    EXPECT_TRUE(all_close(g1[i], g3[i], 1e-7, 1e-4));
  }
}

TEST_F(ChunkedCrossEntropy, RejectsBadTargets) {
  const at::Tensor h = at::randn({3, 2}), w = at::randn({4, 2});
  EXPECT_THROW(chunked_cross_entropy(h, w, at::tensor({0, 4, 1}, at::kLong), 2), c10::Error);
  EXPECT_THROW(chunked_cross_entropy(h, w, at::tensor({0, -1, 1}, at::kLong), 2), c10::Error);
  EXPECT_THROW(chunked_cross_entropy(h, w, at::tensor({0, 1, 1}, at::kLong), 0), c10::Error);
}

}  // namespace
}  // namespace btx::kernels
