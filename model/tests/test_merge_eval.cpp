// Merge (btx / upcycle / btm) tensor placement and averaging, and evaluation numbers.
#include <cmath>

#include "btx/model/eval.h"
#include "btx/model/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/merge.h"
#include "btx/model/safetensors.h"
#include "btx/model/tokenizer.h"
#include "test_util.h"

namespace btx {
namespace {
using testing::TempDir;

std::string SaveModel(const LlamaModel& m, const std::string& dir) {
  auto staged = StagedDir::Create(dir);
  EXPECT_TRUE(staged.ok());
  EXPECT_TRUE(WriteModelFiles(m, staged->path()).ok());
  EXPECT_TRUE(MakeByteTokenizer()->SaveTo(staged->path()).ok());
  EXPECT_TRUE(staged->Publish().ok());
  return dir;
}

at::Tensor Get(const std::string& dir, const std::string& name) {
  auto src = HfTensorSource::Open(dir);
  EXPECT_TRUE(src.ok()) << src.status().message();
  auto t = src->Load(name);
  EXPECT_TRUE(t.ok()) << t.status().message();
  return *t;
}

struct Fixture {
  TempDir dir;
  std::string seed, a, b;
  Fixture() {
    seed = SaveModel(*LlamaModel::Init(testing::TinyConfig(), 1), dir / "seed");
    a = SaveModel(*LlamaModel::Init(testing::TinyConfig(), 2), dir / "a");
    b = SaveModel(*LlamaModel::Init(testing::TinyConfig(), 3), dir / "b");
  }
  std::string Merge(MergeSpec s, const std::string& name) {
    auto staged = StagedDir::Create(dir / name);
    Status st = MergeToDir(s, staged->path());
    EXPECT_TRUE(st.ok()) << st.message();
    EXPECT_TRUE(staged->Publish().ok());
    return dir / name;
  }
};

TEST(Merge, BtxPlacesExpertsAndAveragesTheRest) {
  Fixture f;
  MergeSpec s;
  s.method = "btx";
  s.seed = f.seed;
  s.experts = {{"a", f.a}, {"b", f.b}};
  s.keep_seed_expert = true;
  const std::string out = f.Merge(s, "moe");
  auto cfg = LoadConfig(out);
  ASSERT_TRUE(cfg.ok());
  EXPECT_EQ(cfg->num_local_experts, 3);
  const std::vector<std::string> srcs = {f.a, f.b, f.seed};
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (int e = 0; e < 3; ++e) {
      const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      EXPECT_TRUE(at::equal(Get(out, x + "w1.weight"), Get(srcs[e], p + "mlp.gate_proj.weight")));
      EXPECT_TRUE(at::equal(Get(out, x + "w3.weight"), Get(srcs[e], p + "mlp.up_proj.weight")));
      EXPECT_TRUE(at::equal(Get(out, x + "w2.weight"), Get(srcs[e], p + "mlp.down_proj.weight")));
    }
    EXPECT_EQ(Get(out, p + "block_sparse_moe.gate.weight").sizes(), (std::vector<int64_t>{3, 32}));
  }
  for (const std::string name : {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                                 "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight"}) {
    at::Tensor mean = (Get(f.a, name).to(at::kDouble) + Get(f.b, name).to(at::kDouble) + Get(f.seed, name).to(at::kDouble)) / 3;
    EXPECT_TRUE(at::allclose(Get(out, name).to(at::kDouble), mean, 0, 1e-7)) << name;
  }
  EXPECT_TRUE(LoadModelDir(out).ok());
  EXPECT_TRUE(HasTokenizer(out));
}

TEST(Merge, UpcycleCopiesSeedAndReproducesDenseLogits) {
  Fixture f;
  MergeSpec s;
  s.method = "upcycle";
  s.seed = f.seed;
  s.num_experts = 4;
  const std::string out = f.Merge(s, "up");
  for (int e = 0; e < 4; ++e)
    EXPECT_TRUE(at::equal(Get(out, "model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".w2.weight"),
                          Get(f.seed, "model.layers.1.mlp.down_proj.weight")));
  EXPECT_TRUE(at::equal(Get(out, "model.layers.0.self_attn.q_proj.weight"), Get(f.seed, "model.layers.0.self_attn.q_proj.weight")));
  auto moe = LoadModelDir(out);
  auto dense = LoadModelDir(f.seed);
  ASSERT_TRUE(moe.ok() && dense.ok());
  at::Tensor tokens = at::randint(0, 259, {2, 10}, at::kLong);
  at::NoGradGuard ng;
  EXPECT_TRUE(at::allclose(moe->Forward(tokens).logits, dense->Forward(tokens).logits, 1e-4, 1e-5));
}

TEST(Merge, BtmAveragesEverythingIntoDense) {
  Fixture f;
  MergeSpec s;
  s.method = "btm";
  s.experts = {{"a", f.a}, {"b", f.b}};
  const std::string out = f.Merge(s, "btm");
  auto cfg = LoadConfig(out);
  EXPECT_FALSE(cfg->is_moe());
  for (const std::string name : {"model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"}) {
    at::Tensor mean = (Get(f.a, name).to(at::kDouble) + Get(f.b, name).to(at::kDouble)) / 2;
    EXPECT_TRUE(at::allclose(Get(out, name).to(at::kDouble), mean, 0, 1e-7)) << name;
  }
}

TEST(Merge, HiddenRouterInitUsesDomainMeans) {
  Fixture f;
  testing::WriteText(f.dir / "pa.txt", testing::SampleText(20, 1));
  testing::WriteText(f.dir / "pb.txt", "1 + 2 = 3\n4 * 5 = 20\n7 - 9 = -2\n");
  MergeSpec s;
  s.seed = f.seed;
  s.experts = {{"a", f.a}, {"b", f.b}};
  s.router_init = "hidden";
  s.prompts = {{"a", {f.dir / "pa.txt"}}, {"b", {f.dir / "pb.txt"}}};
  const std::string out = f.Merge(s, "hidden");
  at::Tensor g = Get(out, "model.layers.1.block_sparse_moe.gate.weight");
  EXPECT_NEAR(g[0].norm().item<double>(), 1.0, 1e-5);  // unit rows, as mergekit's hidden mode
  EXPECT_FALSE(at::allclose(g[0], g[1]));
  s.prompts.erase("b");
  EXPECT_NE(ValidateMergeSpec(s).message().find("'b'"), std::string::npos);
}

TEST(Merge, RejectsMismatchedArchitectures) {
  Fixture f;
  ModelConfig other = testing::TinyConfig();
  other.intermediate_size = 64;
  const std::string c = SaveModel(*LlamaModel::Init(other, 4), f.dir / "c");
  MergeSpec s;
  s.experts = {{"a", f.a}, {"c", c}};
  auto staged = StagedDir::Create(f.dir / "bad");
  Status st = MergeToDir(s, staged->path());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("expert 'c'"), std::string::npos);
}

TEST(Eval, LossesMatchDirectComputation) {
  Fixture f;
  const std::string text = testing::SampleText(8, 3);
  testing::WriteText(f.dir / "v.txt", text);
  std::vector<int32_t> tokens = {kByteBos};
  for (unsigned char ch : text) tokens.push_back(ch);
  tokens.push_back(kByteEos);
  auto A = LoadModelDir(f.a), B = LoadModelDir(f.b);
  EvalOptions o;
  o.seq_len = 64;
  o.max_tokens = 100000;
  // Direct float64 reference: -log(mean_m p_m(next token)) averaged over all predicted positions.
  at::NoGradGuard ng;
  double total_a = 0, total_ens = 0;
  int64_t n = 0;
  for (size_t s = 0; s + 1 < tokens.size(); s += 64) {
    const int64_t len = std::min<int64_t>(64, tokens.size() - 1 - s);
    at::Tensor in = at::empty({1, len}, at::kLong);
    for (int64_t i = 0; i < len; ++i) in[0][i] = tokens[s + i];
    at::Tensor pa = at::softmax(A->Forward(in).logits[0].to(at::kDouble), -1);
    at::Tensor pb = at::softmax(B->Forward(in).logits[0].to(at::kDouble), -1);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t y = tokens[s + i + 1];
      total_a -= std::log(pa[i][y].item<double>());
      total_ens -= std::log(0.5 * pa[i][y].item<double>() + 0.5 * pb[i][y].item<double>());
      ++n;
    }
  }
  auto r = Evaluate({{"a", {f.a}}, {"ens", {f.a, f.b}}, {"twice", {f.a, f.a}}}, {{"v", {f.dir / "v.txt"}}}, o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  const auto& j = *r;
  EXPECT_NEAR(j["models"]["a"]["domains"]["v"]["loss"].get<double>(), total_a / n, 1e-6);
  EXPECT_NEAR(j["models"]["ens"]["domains"]["v"]["loss"].get<double>(), total_ens / n, 1e-6);
  EXPECT_NEAR(j["models"]["twice"]["domains"]["v"]["loss"].get<double>(), total_a / n, 1e-9);
  EXPECT_NEAR(j["models"]["a"]["domains"]["v"]["ppl"].get<double>(), std::exp(total_a / n), 1e-6 * std::exp(total_a / n));
  EXPECT_EQ(j["models"]["a"]["domains"]["v"]["tokens"].get<int64_t>(), n);
}

}  // namespace
}  // namespace btx
