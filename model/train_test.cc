// Trainer: schedule, learning, data order, exact resume.
#include <ATen/Parallel.h>

#include <atomic>
#include <set>
#include <nlohmann/json.hpp>

#include "btx/model/data.h"
#include "btx/model/hf_io.h"
#include "btx/model/token_shard.h"
#include "btx/model/tokenizer.h"
#include "btx/model/trainer.h"
#include "test_util.h"

namespace btx::model {
namespace {
using testing::TempDir;

TEST(Schedule, WarmupCosineToFloor) {
  TrainConfig c;
  c.lr = 1.0;
  c.warmup = 10;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(LearningRate(c, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(LearningRate(c, 9, 110), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(c, 10, 110), 1.0);
  EXPECT_NEAR(LearningRate(c, 60, 110), 0.55, 1e-12);  // half way: floor + (1 - floor) / 2
  EXPECT_NEAR(LearningRate(c, 110, 110), 0.1, 1e-12);
  EXPECT_NEAR(LearningRate(c, 500, 110), 0.1, 1e-12);
  c.schedule = "constant";
  EXPECT_DOUBLE_EQ(LearningRate(c, 50, 110), 1.0);
}

TEST(Data, SamplerIsAPureFunctionOfSeedAndIndex) {
  auto tokens = std::make_shared<std::vector<int32_t>>(1000);
  for (int i = 0; i < 1000; ++i) (*tokens)[i] = i % 251;
  auto a = WindowSampler::Create(tokens, 16, 9), b = WindowSampler::Create(tokens, 16, 9);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->num_windows(), (1000 - 1) / 16);
  std::vector<int64_t> x(17), y(17);
  std::set<int64_t> starts;
  for (uint64_t i = 0; i < static_cast<uint64_t>(a->num_windows()); ++i) {
    a->Fill(i, x.data());
    starts.insert(x[0] + 1000 * x[1]);
  }
  EXPECT_EQ(starts.size(), static_cast<size_t>(a->num_windows()));  // an epoch visits every window once
  b->Fill(200, y.data());  // random access, different epoch first
  a->Fill(200, x.data());
  EXPECT_EQ(x, y);
  EXPECT_FALSE(WindowSampler::Create(std::make_shared<std::vector<int32_t>>(5), 16, 1).ok());
}

TEST(Data, TextDirsAndShardsFormOneStream) {
  TempDir dir;
  testing::WriteText(dir / "d/b.txt", "yz");
  testing::WriteText(dir / "d/a.txt", "x");
  ASSERT_TRUE(WriteTokenShard(dir / "s.btxtok", {7, 8, 9}, 259).ok());
  auto tok = MakeByteTokenizer();
  auto t = LoadTokens({dir / "d", dir / "s.btxtok"}, *tok);
  ASSERT_TRUE(t.ok()) << t.status().message();
  // Directory files in sorted order, each wrapped in bos/eos; shards appended as stored.
  std::vector<int32_t> want = {kByteBos, 'x', kByteEos, kByteBos, 'y', 'z', kByteEos, 7, 8, 9};
  EXPECT_EQ(**t, want);
  auto capped = LoadTokens({dir / "d"}, *tok, 4);
  EXPECT_EQ((*capped)->size(), 4u);
  EXPECT_NE(LoadTokens({dir / "s.btxtok"}, *tok, 0, 8).status().message().find("outside the model vocabulary"),
            std::string::npos);
  EXPECT_EQ(LoadTokens({dir / "missing"}, *tok).status().code(), StatusCode::kNotFound);
}

struct TrainSetup {
  TrainConfig cfg;
  std::vector<DomainData> data;
};

TrainSetup TinySetup(int domains) {
  TrainSetup s;
  s.cfg.batch_tokens = 64;
  s.cfg.seq_len = 16;
  s.cfg.lr = 3e-3;
  s.cfg.warmup = 2;
  s.cfg.checkpoint_every = 3;
  s.cfg.grad_accum = 2;
  s.cfg.log_every = 1;
  s.cfg.valid_tokens = 256;
  auto tok = MakeByteTokenizer();
  for (int d = 0; d < domains; ++d) {
    std::string text = testing::SampleText(60, d * 5);
    auto ids = std::make_shared<std::vector<int32_t>>(tok->Encode(text));
    s.data.push_back({std::string("d").append(std::to_string(d)), 1.0 + d, ids, ids});  // not "d" + …: GCC 12 warns falsely (-Wrestrict)
  }
  return s;
}

TEST(Trainer, LossDecreases) {
  at::set_num_threads(2);
  auto m = LlamaModel::Init(testing::TinyConfig(), 11);
  ASSERT_TRUE(m.ok());
  TrainSetup s = TinySetup(1);
  s.cfg.lr = 1e-2;
  s.cfg.batch_tokens = 128;
  TrainOptions o;
  o.steps = 30;
  std::vector<double> losses;
  TrainHooks h;
  h.emit = [&](const nlohmann::json& ev) {
    if (ev["event"] == "progress") losses.push_back(ev["loss"].get<double>());
  };
  Trainer before_t(&*m, s.cfg, o, s.data, {});
  ASSERT_TRUE(before_t.Init().ok());
  const double before = before_t.Validate().at("d0");
  Trainer t(&*m, s.cfg, o, s.data, h);
  ASSERT_TRUE(t.Init().ok());
  auto r = t.Run();
  ASSERT_TRUE(r.ok()) << r.status().message();
  ASSERT_EQ(losses.size(), 30u);
  const double after = t.Validate().at("d0");
  EXPECT_LT(after, before - 1.0) << "valid loss " << before << " -> " << after;
  EXPECT_LT(losses.back(), losses.front());
}

// 2K steps straight vs K steps, stop, fresh model + trainer resumed from the checkpoint, K more steps.
void ExpectExactResume(int64_t experts, std::vector<std::string> freeze, const std::string& router = "softmax_topk") {
  at::set_num_threads(2);
  const int64_t K = 3;
  TrainSetup s = TinySetup(experts ? 2 : 1);
  TrainOptions o;
  o.steps = 2 * K;
  o.freeze = freeze;
  o.backend = KernelsAvailable() ? MoeBackend::kKernels : MoeBackend::kReference;
  TempDir dir;

  ModelConfig cfg = testing::TinyConfig(experts);
  cfg.router = router;
  cfg.router_z_loss_coef = 1e-3;
  auto straight = LlamaModel::Init(cfg, 21);
  ASSERT_TRUE(straight.ok());
  o.checkpoint_dir = dir / "a";
  Trainer ta(&*straight, s.cfg, o, s.data, {});
  ASSERT_TRUE(ta.Init().ok());
  ASSERT_TRUE(ta.Run().ok());

  o.checkpoint_dir = dir / "b";
  std::atomic<bool> stop{false};
  TrainHooks h;
  h.stop = &stop;
  h.emit = [&](const nlohmann::json& ev) {
    if (ev["event"] == "progress" && ev["step"] == K) stop = true;
  };
  {
    auto first = LlamaModel::Init(cfg, 21);
    Trainer tb(&*first, s.cfg, o, s.data, h);
    ASSERT_TRUE(tb.Init().ok());
    auto r = tb.Run();
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(*r, TrainOutcome::kInterrupted);
    EXPECT_EQ(tb.step(), K);
  }
  // A different initialisation proves that every weight comes from the checkpoint.
  auto resumed = LlamaModel::Init(cfg, 999);
  Trainer tc(&*resumed, s.cfg, o, s.data, {});
  ASSERT_TRUE(tc.Init().ok());
  ASSERT_TRUE(tc.ResumeFromLatest().ok());
  ASSERT_EQ(tc.step(), K);
  ASSERT_TRUE(tc.Run().ok());
  ASSERT_EQ(tc.step(), 2 * K);
  for (size_t i = 0; i < straight->params().size(); ++i)
    EXPECT_TRUE(at::equal(straight->params()[i].second, resumed->params()[i].second))
        << straight->params()[i].first << " differs";
}

TEST(Trainer, ExactResumeDense) { ExpectExactResume(0, {}); }
TEST(Trainer, ExactResumeMoeWithFrozenAttention) { ExpectExactResume(3, {"attention"}); }
// SparseMixer samples during training: exact resume also needs the generator state from the checkpoint.
TEST(Trainer, ExactResumeSparseMixer) {
  if (!KernelsAvailable()) GTEST_SKIP() << "sparsemixer needs btx_kernels";
  ExpectExactResume(4, {}, "sparsemixer");
}

TEST(Trainer, SkipsCorruptNewestCheckpoint) {
  at::set_num_threads(2);
  TrainSetup s = TinySetup(1);
  TempDir dir;
  TrainOptions o;
  o.steps = 6;
  o.checkpoint_dir = dir / "ck";
  auto m = LlamaModel::Init(testing::TinyConfig(), 5);
  Trainer t(&*m, s.cfg, o, s.data, {});
  ASSERT_TRUE(t.Init().ok());
  ASSERT_TRUE(t.Run().ok());
  testing::WriteText(dir / "ck/step-00000006/trainer_state.json", "{}");  // tamper the newest
  auto m2 = LlamaModel::Init(testing::TinyConfig(), 5);
  Trainer t2(&*m2, s.cfg, o, s.data, {});
  ASSERT_TRUE(t2.Init().ok());
  ASSERT_TRUE(t2.ResumeFromLatest().ok());
  EXPECT_EQ(t2.step(), 3);
}

TEST(Trainer, FreezeAllButRouter) {
  EXPECT_TRUE(IsFrozen("model.layers.0.self_attn.q_proj.weight", {"all_but_router"}));
  EXPECT_TRUE(IsFrozen("model.layers.0.block_sparse_moe.experts.w1", {"all_but_router"}));
  EXPECT_FALSE(IsFrozen("model.layers.0.block_sparse_moe.gate.weight", {"all_but_router"}));
  EXPECT_TRUE(IsFrozen("lm_head.weight", {"embeddings"}));
  auto m = LlamaModel::Init(testing::TinyConfig(2), 5);
  const at::Tensor attn = m->param("model.layers.0.self_attn.q_proj.weight").clone();
  const at::Tensor gate = m->param("model.layers.0.block_sparse_moe.gate.weight").clone();
  TrainSetup s = TinySetup(1);
  TrainOptions o;
  o.steps = 2;
  o.freeze = {"all_but_router"};
  o.backend = MoeBackend::kReference;
  Trainer t(&*m, s.cfg, o, s.data, {});
  ASSERT_TRUE(t.Init().ok());
  ASSERT_TRUE(t.Run().ok());
  EXPECT_TRUE(at::equal(attn, m->param("model.layers.0.self_attn.q_proj.weight")));
  EXPECT_FALSE(at::equal(gate, m->param("model.layers.0.block_sparse_moe.gate.weight")));
}

}  // namespace
}  // namespace btx::model
