// Decoder numerics against float64 loops, shapes, causality, and MoE semantics.
#include <cmath>

#include "btx/model/llama.h"
#include "test_util.h"

namespace btx::model {
namespace {

TEST(Llama, ForwardShapesDenseAndMoe) {
  for (int64_t experts : {0, 4}) {
    auto m = LlamaModel::Init(testing::TinyConfig(experts), 1);
    ASSERT_TRUE(m.ok());
    at::Tensor tokens = at::randint(0, 259, {3, 11}, at::kLong);
    ForwardOptions fo;
    fo.backend = MoeBackend::kReference;
    auto out = m->Forward(tokens, fo);
    EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{3, 11, 259}));
    EXPECT_EQ(out.aux_loss.dim(), 0);
    if (experts) {
      ASSERT_EQ(out.expert_counts.size(), 2u);
      EXPECT_EQ(out.expert_counts[0].sum().item<int64_t>(), 3 * 11 * 2);  // every token routed to top-2
      EXPECT_GT(out.load_balance_loss.item<double>(), 0.0);
      EXPECT_GT(out.z_loss.item<double>(), 0.0);
    }
  }
}

TEST(Llama, Causality) {
  auto m = LlamaModel::Init(testing::TinyConfig(), 2);
  ASSERT_TRUE(m.ok());
  at::Tensor a = at::randint(0, 259, {1, 16}, at::kLong);
  at::Tensor b = a.clone();
  b[0][9] = (a[0][9].item<int64_t>() + 1) % 259;
  at::NoGradGuard ng;
  at::Tensor la = m->Forward(a).logits, lb = m->Forward(b).logits;
  EXPECT_TRUE(at::allclose(la.narrow(1, 0, 9), lb.narrow(1, 0, 9), 0, 0));  // exactly unaffected
  EXPECT_FALSE(at::allclose(la.narrow(1, 9, 7), lb.narrow(1, 9, 7)));
}

TEST(Numerics, RmsNormMatchesFloat64Loop) {
  at::Tensor x = at::randn({3, 5, 32}), w = at::randn({32});
  const double eps = 1e-5;
  at::Tensor y = RmsNorm(x, w, eps).to(at::kDouble);
  at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble);
  double max_err = 0;
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t t = 0; t < 5; ++t) {
      double ss = 0;
      for (int64_t d = 0; d < 32; ++d) ss += std::pow(xd[i][t][d].item<double>(), 2);
      const double inv = 1.0 / std::sqrt(ss / 32 + eps);
      for (int64_t d = 0; d < 32; ++d)
        max_err = std::max(max_err, std::abs(y[i][t][d].item<double>() - wd[d].item<double>() * xd[i][t][d].item<double>() * inv));
    }
  EXPECT_LT(max_err, 1e-5);
}

TEST(Numerics, RopeMatchesFloat64Loop) {
  const int64_t T = 9, hd = 8;
  const double theta = 500.0;
  at::Tensor x = at::randn({2, 3, T, hd});
  auto [cos, sin] = RopeTables(T, hd, theta, at::kCPU);
  at::Tensor y = ApplyRope(x, cos, sin).to(at::kDouble);
  double max_err = 0;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t h = 0; h < 3; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const double ang = t * std::pow(theta, -2.0 * i / hd);
          const double x0 = x[b][h][t][i].item<double>(), x1 = x[b][h][t][i + hd / 2].item<double>();
          max_err = std::max(max_err, std::abs(y[b][h][t][i].item<double>() - (x0 * std::cos(ang) - x1 * std::sin(ang))));
          max_err = std::max(max_err, std::abs(y[b][h][t][i + hd / 2].item<double>() - (x1 * std::cos(ang) + x0 * std::sin(ang))));
        }
  EXPECT_LT(max_err, 1e-5);
}

TEST(Numerics, GroupedCausalAttentionMatchesFloat64Loop) {
  const int64_t B = 2, H = 4, Hkv = 2, T = 7, hd = 8;
  at::Tensor q = at::randn({B, H, T, hd}), k = at::randn({B, Hkv, T, hd}), v = at::randn({B, Hkv, T, hd});
  at::Tensor y = CausalAttention(q, k, v).to(at::kDouble);
  at::Tensor qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  auto qa = qd.accessor<double, 4>();
  auto ka = kd.accessor<double, 4>();
  auto va = vd.accessor<double, 4>();
  double max_err = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / Hkv);  // HF repeat_kv: query head h reads kv head h / n_rep
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> s(t + 1);
        double mx = -1e300, z = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += qa[b][h][t][d] * ka[b][g][j][d];
          s[j] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        for (auto& e : s) z += (e = std::exp(e - mx));
        for (int64_t d = 0; d < hd; ++d) {
          double o = 0;
          for (int64_t j = 0; j <= t; ++j) o += s[j] / z * va[b][g][j][d];
          max_err = std::max(max_err, std::abs(o - y[b][h][t][d].item<double>()));
        }
      }
    }
  EXPECT_LT(max_err, 1e-5);
}

TEST(Numerics, ReferenceMoeMatchesFloat64Loop) {
  const int64_t T = 6, D = 8, F = 12, E = 4, K = 2;
  at::Tensor x = at::randn({T, D}), logits = at::randn({T, E});
  at::Tensor w1 = at::randn({E, F, D}), w3 = at::randn({E, F, D}), w2 = at::randn({E, D, F});
  auto r = ReferenceMoe(x, logits, K, w1, w3, w2);
  at::Tensor xd = x.to(at::kDouble), w1d = w1.to(at::kDouble), w3d = w3.to(at::kDouble), w2d = w2.to(at::kDouble);
  double max_err = 0;
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor p = at::softmax(logits[t].to(at::kDouble), 0);
    auto [vals, idx] = p.topk(K);
    at::Tensor y = at::zeros({D}, at::kDouble);
    for (int64_t s = 0; s < K; ++s) {
      const int64_t e = idx[s].item<int64_t>();
      at::Tensor h = at::silu(w1d[e].matmul(xd[t])) * w3d[e].matmul(xd[t]);
      y += (vals[s] / vals.sum()) * w2d[e].matmul(h);
    }
    max_err = std::max(max_err, (y - r.y[t].to(at::kDouble)).abs().max().item<double>());
  }
  EXPECT_LT(max_err, 1e-4);
}

TEST(Moe, KernelsMatchReference) {
  if (!KernelsAvailable()) GTEST_SKIP() << "btx_kernels not linked into this build";
  auto m = LlamaModel::Init(testing::TinyConfig(4), 3);
  ASSERT_TRUE(m.ok());
  at::Tensor tokens = at::randint(0, 259, {2, 10}, at::kLong);
  ForwardOptions ref, ker;
  ref.backend = MoeBackend::kReference;
  ker.backend = MoeBackend::kKernels;
  at::NoGradGuard ng;
  auto a = m->Forward(tokens, ref), b = m->Forward(tokens, ker);
  EXPECT_TRUE(at::allclose(a.logits, b.logits, 1e-4, 1e-5));
  EXPECT_NEAR(a.load_balance_loss.item<double>(), b.load_balance_loss.item<double>(), 1e-5);
  EXPECT_NEAR(a.z_loss.item<double>(), b.z_loss.item<double>(), 1e-4);
}

TEST(Moe, IdenticalExpertsReproduceDenseLogits) {
  auto dense = LlamaModel::Init(testing::TinyConfig(), 4);
  ASSERT_TRUE(dense.ok());
  const int64_t E = 4;
  std::vector<std::pair<std::string, at::Tensor>> t;
  for (const auto& [name, x] : dense->params()) {
    auto pos = name.find("mlp.");
    if (pos == std::string::npos) {
      t.emplace_back(name, x);
      continue;
    }
    const std::string pre = name.substr(0, pos) + "block_sparse_moe.";
    if (name.ends_with("gate_proj.weight")) {
      t.emplace_back(pre + "experts.w1", x.unsqueeze(0).repeat({E, 1, 1}));
      t.emplace_back(pre + "gate.weight", at::randn({E, x.size(1)}));  // any router: gates renormalise to 1
    } else if (name.ends_with("up_proj.weight")) {
      t.emplace_back(pre + "experts.w3", x.unsqueeze(0).repeat({E, 1, 1}));
    } else {
      t.emplace_back(pre + "experts.w2", x.unsqueeze(0).repeat({E, 1, 1}));
    }
  }
  auto moe = LlamaModel::FromTensors(testing::TinyConfig(E), t);
  ASSERT_TRUE(moe.ok()) << moe.status().message();
  at::Tensor tokens = at::randint(0, 259, {2, 12}, at::kLong);
  at::NoGradGuard ng;
  at::Tensor ld = dense->Forward(tokens).logits;
  for (auto backend : {MoeBackend::kReference, MoeBackend::kKernels}) {
    if (backend == MoeBackend::kKernels && !KernelsAvailable()) continue;
    ForwardOptions fo;
    fo.backend = backend;
    EXPECT_TRUE(at::allclose(moe->Forward(tokens, fo).logits, ld, 1e-4, 1e-5));
  }
}

TEST(Moe, GradientsReachRouterAndExperts) {
  auto m = LlamaModel::Init(testing::TinyConfig(4), 5);
  ASSERT_TRUE(m.ok());
  for (auto& [n, p] : m->params()) p.requires_grad_(true);
  ForwardOptions fo;
  fo.training = true;
  fo.backend = KernelsAvailable() ? MoeBackend::kKernels : MoeBackend::kReference;
  auto out = m->Forward(at::randint(0, 259, {2, 8}, at::kLong), fo);
  (out.logits.pow(2).mean() + out.aux_loss).backward();
  EXPECT_GT(m->param("model.layers.0.block_sparse_moe.gate.weight").grad().abs().sum().item<double>(), 0.0);
  EXPECT_GT(m->param("model.layers.1.block_sparse_moe.experts.w2").grad().abs().sum().item<double>(), 0.0);
}

TEST(Llama, FromTensorsRejectsWrongShapes) {
  auto m = LlamaModel::Init(testing::TinyConfig(), 6);
  ASSERT_TRUE(m.ok());
  auto t = m->params();
  t[1].second = at::zeros({5});
  auto bad = LlamaModel::FromTensors(m->config(), t);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(t[1].first), std::string::npos);
  t[1].second = m->params()[1].second;
  t.pop_back();
  EXPECT_EQ(LlamaModel::FromTensors(m->config(), t).status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace btx::model
