#include "btx/kernels/attention.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <vector>

#include "test_util.h"

namespace btx::kernels {
namespace {

using testing::all_close;

class Attention : public testing::SeededTest {};

struct Shape {
  int64_t B, H, Hkv, T, hd, window, block_q, block_k;
};

// Plain float64 loops: query i of head h reads kv head h / (H / Hkv), keys j <= i (and i - j < window).
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, double scale) {
  const at::Tensor qd = q.to(at::kDouble).contiguous(), kd = k.to(at::kDouble).contiguous(),
                   vd = v.to(at::kDouble).contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), g = H / k.size(1);
  at::Tensor out = at::zeros({B, H, T, hd}, at::kDouble);
  auto Q = qd.accessor<double, 4>(), K = kd.accessor<double, 4>(), V = vd.accessor<double, 4>();
  auto O = out.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s;
        std::vector<int64_t> keys;
        double m = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          if (window > 0 && i - j >= window) continue;
          double dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += Q[b][h][i][d] * K[b][h / g][j][d];
          s.push_back(dot * scale);
          keys.push_back(j);
          m = std::max(m, dot * scale);
        }
        double z = 0;
        for (double& x : s) z += (x = std::exp(x - m));
        for (size_t n = 0; n < keys.size(); ++n)
          for (int64_t d = 0; d < hd; ++d) O[b][h][i][d] += s[n] / z * V[b][h / g][keys[n]][d];
      }
  return out;
}

const std::vector<Shape> kShapes = {
    {2, 4, 2, 37, 8, 0, 16, 8},   // T not a multiple of either block, GQA 2
    {1, 3, 1, 50, 5, 0, 7, 13},   // odd head_dim, multi-query
    {1, 2, 2, 64, 16, 0, 64, 64}, // one block
    {2, 4, 4, 33, 4, 10, 8, 8},   // sliding window
    {1, 2, 1, 29, 8, 5, 4, 32},   // window smaller than a block
    {1, 6, 2, 1, 8, 0, 16, 16},   // a single token
    {1, 2, 1, 40, 6, 0, 1, 1},    // blocks of one row / one key
};

TEST_F(Attention, ForwardMatchesLoopsInFloat64) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B" << s.B << " H" << s.H << "/" << s.Hkv << " T" << s.T << " hd" << s.hd
                                      << " window " << s.window << " blocks " << s.block_q << "x" << s.block_k);
    const at::Tensor q = at::randn({s.B, s.H, s.T, s.hd}, at::kDouble);
    const at::Tensor k = at::randn({s.B, s.Hkv, s.T, s.hd}, at::kDouble);
    const at::Tensor v = at::randn({s.B, s.Hkv, s.T, s.hd}, at::kDouble);
    const at::Tensor want = reference(q, k, v, s.window, 1.0 / std::sqrt(static_cast<double>(s.hd)));
    EXPECT_TRUE(all_close(chunked_causal_attention(q, k, v, s.window, 0, s.block_q, s.block_k), want, 1e-12, 1e-12));
    EXPECT_TRUE(all_close(naive_causal_attention(q, k, v, s.window), want, 1e-12, 1e-12));
  }
}

TEST_F(Attention, ExplicitScaleAndNonContiguousInputs) {
  // As the model passes them: [B, T, H, hd] projections transposed to [B, H, T, hd].
  const at::Tensor q = at::randn({2, 21, 4, 6}, at::kDouble).transpose(1, 2);
  const at::Tensor k = at::randn({2, 21, 2, 6}, at::kDouble).transpose(1, 2);
  const at::Tensor v = at::randn({2, 21, 2, 6}, at::kDouble).transpose(1, 2);
  EXPECT_TRUE(all_close(chunked_causal_attention(q, k, v, 0, 0.37, 8, 5), reference(q, k, v, 0, 0.37), 1e-12, 1e-12));
}

TEST_F(Attention, GradientsMatchNaiveAutogradInFloat64) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(::testing::Message() << "T" << s.T << " H" << s.H << "/" << s.Hkv << " window " << s.window);
    std::vector<at::Tensor> a = {at::randn({s.B, s.H, s.T, s.hd}, at::kDouble).requires_grad_(),
                                 at::randn({s.B, s.Hkv, s.T, s.hd}, at::kDouble).requires_grad_(),
                                 at::randn({s.B, s.Hkv, s.T, s.hd}, at::kDouble).requires_grad_()};
    const at::Tensor upstream = at::randn({s.B, s.H, s.T, s.hd}, at::kDouble);
    const at::Tensor got = chunked_causal_attention(a[0], a[1], a[2], s.window, 0, s.block_q, s.block_k);
    const auto g1 = torch::autograd::grad({got}, a, {upstream});
    const at::Tensor want = naive_causal_attention(a[0], a[1], a[2], s.window);
    const auto g2 = torch::autograd::grad({want}, a, {upstream});
    for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(all_close(g1[i], g2[i], 1e-11, 1e-10)) << "input " << i;
  }
}

TEST_F(Attention, GradientsMatchFiniteDifferences) {
  for (int64_t window : {0, 3}) {
    const at::Tensor q = at::randn({1, 2, 7, 2}, at::kDouble), k = at::randn({1, 1, 7, 2}, at::kDouble),
                     v = at::randn({1, 1, 7, 2}, at::kDouble), w = at::randn({1, 2, 7, 2}, at::kDouble);
    testing::expect_gradients_match_fd(
        [&](const std::vector<at::Tensor>& x) { return (chunked_causal_attention(x[0], x[1], x[2], window, 0, 4, 3) * w).sum(); },
        {q, k, v}, 1e-6, 1e-7, 1e-6);
  }
}

TEST_F(Attention, Float32WithinTolerance) {
  const at::Tensor q = at::randn({2, 8, 200, 32}), k = at::randn({2, 2, 200, 32}), v = at::randn({2, 2, 200, 32});
  const at::Tensor want = reference(q, k, v, 0, 1.0 / std::sqrt(32.0));
  const at::Tensor got = chunked_causal_attention(q, k, v, 0, 0, 64, 48);
  EXPECT_EQ(got.scalar_type(), at::kFloat);
  EXPECT_TRUE(all_close(got, want, 2e-6, 1e-5));
  EXPECT_TRUE(all_close(causal_attention(q, k, v, {}), want, 2e-6, 1e-5));
}

TEST_F(Attention, DeterministicAtFixedThreads) {
  const at::Tensor q = at::randn({1, 4, 70, 16}).requires_grad_(), k = at::randn({1, 2, 70, 16}).requires_grad_(),
                   v = at::randn({1, 2, 70, 16}).requires_grad_();
  const at::Tensor up = at::randn({1, 4, 70, 16});
  std::vector<std::vector<at::Tensor>> runs;
  for (int r = 0; r < 2; ++r) {
    const at::Tensor o = chunked_causal_attention(q, k, v, 0, 0, 32, 16);
    auto g = torch::autograd::grad({o}, {q, k, v}, {up});
    g.push_back(o.detach());
    runs.push_back(g);
  }
  for (size_t i = 0; i < runs[0].size(); ++i) EXPECT_TRUE(testing::bitwise_equal(runs[0][i], runs[1][i]));
}

TEST_F(Attention, ResolvesAndRejects) {
  AttentionImpl impl;
  EXPECT_TRUE(parse_attention_impl("chunked", &impl));
  EXPECT_EQ(impl, AttentionImpl::kChunked);
  EXPECT_FALSE(parse_attention_impl("flash", &impl));
  if (sdpa_available()) {
    EXPECT_EQ(resolve_attention(AttentionImpl::kAuto, 16), AttentionImpl::kSdpa);
  } else {
    EXPECT_EQ(resolve_attention(AttentionImpl::kAuto, kChunkedMinSeq - 1), AttentionImpl::kNaive);
    EXPECT_EQ(resolve_attention(AttentionImpl::kAuto, kChunkedMinSeq), AttentionImpl::kChunked);
    AttentionOptions o;
    o.impl = AttentionImpl::kSdpa;
    const at::Tensor x = at::randn({1, 1, 4, 2});
    EXPECT_THROW(causal_attention(x, x, x, o), c10::Error);
  }
  const at::Tensor q = at::randn({1, 3, 4, 2}), k = at::randn({1, 2, 4, 2});
  EXPECT_THROW(chunked_causal_attention(q, k, k), c10::Error);  // 3 heads over 2 kv heads
}

}  // namespace
}  // namespace btx::kernels
