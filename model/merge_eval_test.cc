// Merge (btx / upcycle / btm) tensor placement and averaging, evaluation numbers, routing analysis (token
// specialization, charts) and the eval job's outputs.
#include <ATen/Parallel.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "btx/model/eval.h"
#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/job.h"
#include "btx/model/merge.h"
#include "btx/model/safetensors.h"
#include "btx/model/tokenizer.h"
#include "test_util.h"

namespace btx::model {
namespace {

EvalModelSpec EvalModel(std::string name, std::vector<std::string> dirs, std::vector<std::string> expert_names = {}) {
  EvalModelSpec m;
  m.name = std::move(name);
  m.dirs = std::move(dirs);
  m.expert_names = std::move(expert_names);
  return m;
}
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
  // The evaluation labels experts with these; HF loaders ignore the field.
  auto config = nlohmann::json::parse(*ReadFile(out + "/config.json"));
  EXPECT_EQ(config["btx_expert_names"], nlohmann::json({"a", "b", "seed"}));
}

// Each family's MoE layout: Qwen2 experts become a Qwen2-MoE (its names, biases averaged, a zero shared expert),
// Gemma experts a btx_gemma_moe whose upcycled form computes the dense Gemma; Llama with attention_bias is refused.
TEST(Merge, EachFamilyGetsItsMoeLayout) {
  TempDir dir;
  auto family = [](const std::string& type) {
    ModelConfig c = testing::TinyConfig();
    c.model_type = type;
    if (type == "qwen2") c.qkv_bias = true;
    if (type == "gemma") c.hidden_act = "gelu_pytorch_tanh", c.explicit_head_dim = 12, c.tie_word_embeddings = true;
    if (type == "llama") c.qkv_bias = c.o_bias = true;
    return c;
  };
  auto merge = [&](const MergeSpec& s, const std::string& name) {
    auto staged = StagedDir::Create(dir / name);
    Status st = MergeToDir(s, staged->path());
    if (st.ok()) {
      EXPECT_TRUE(staged->Publish().ok());
    }
    return st;
  };
  for (const std::string type : {"qwen2", "gemma", "llama"}) {
    const ModelConfig c = family(type);
    const std::string a = SaveModel(*LlamaModel::Init(c, 2), dir / (type + "-a"));
    const std::string b = SaveModel(*LlamaModel::Init(c, 3), dir / (type + "-b"));
    MergeSpec s;
    s.experts = {{"a", a}, {"b", b}};
    Status st = merge(s, type + "-moe");
    if (type == "llama") {
      EXPECT_NE(st.message().find("attention biases"), std::string::npos) << st.message();
      continue;
    }
    ASSERT_TRUE(st.ok()) << type << ": " << st.message();
    const std::string out = dir / (type + "-moe");
    auto j = nlohmann::json::parse(*ReadFile(out + "/config.json"));
    EXPECT_EQ(j["model_type"], type == "qwen2" ? "qwen2_moe" : "btx_gemma_moe");
    const std::string p = "model.layers.1.";
    const std::string expert = type == "qwen2" ? p + "mlp.experts.1.down_proj.weight" : p + "block_sparse_moe.experts.1.w2.weight";
    EXPECT_TRUE(at::equal(Get(out, expert), Get(b, p + "mlp.down_proj.weight"))) << type;
    const std::string q_bias = p + "self_attn.q_proj.bias";
    if (type == "qwen2") {
      EXPECT_TRUE(at::allclose(Get(out, q_bias), (Get(a, q_bias) + Get(b, q_bias)) / 2));
      EXPECT_EQ(Get(out, p + "mlp.shared_expert.up_proj.weight").abs().sum().item<double>(), 0.0);
      EXPECT_EQ(Get(out, p + "mlp.shared_expert_gate.weight").abs().sum().item<double>(), 0.0);
    }
    auto moe = LoadModelDir(out);
    ASSERT_TRUE(moe.ok()) << moe.status().message();
    EXPECT_EQ(moe->config().model_type, type);
    // Upcycled: every expert is the dense FFN and the gates sum to one, so the MoE computes the dense model.
    MergeSpec up;
    up.method = "upcycle";
    up.seed = a;
    up.num_experts = 3;
    ASSERT_TRUE(merge(up, type + "-up").ok());
    auto upcycled = LoadModelDir(dir / (type + "-up"));
    ASSERT_TRUE(upcycled.ok()) << upcycled.status().message();
    auto dense = LoadModelDir(a);
    at::Tensor tokens = at::arange(0, 24, at::kLong).reshape({2, 12}) * 9;
    for (auto backend : {MoeBackend::kKernels, MoeBackend::kReference}) {
      ForwardOptions fo;
      fo.backend = backend;
      EXPECT_TRUE(at::allclose(upcycled->Forward(tokens, fo).logits, dense->Forward(tokens).logits, 1e-4, 1e-5)) << type;
    }
  }
  // Experts of different families do not mix, even with the same shapes.
  ModelConfig llama_shaped = family("gemma");
  llama_shaped.model_type = "llama";
  llama_shaped.hidden_act = "silu";
  MergeSpec mixed;
  mixed.method = "btm";
  mixed.experts = {{"g", dir / "gemma-a"}, {"l", SaveModel(*LlamaModel::Init(llama_shaped, 4), dir / "plain")}};
  Status st = merge(mixed, "mixed");
  EXPECT_NE(st.message().find("is a llama (silu) model, the first a gemma"), std::string::npos) << st.message();
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
  // The job contract refuses a hidden-state router init without prompts for every expert.
  contract::FieldErrors errors;
  contract::Reader reader(errors);
  contract::ParseMerge(reader,
                       {{"seed", f.seed},
                        {"router_init", "hidden"},
                        {"experts", {{{"name", "a"}, {"model", f.a}}, {{"name", "b"}, {"model", f.b}}}},
                        {"data", {{{"name", "a"}, {"train", f.dir / "pa.txt"}}}}},
                       "spec");
  EXPECT_NE(contract::Describe(errors).find("spec.data: missing; expected prompts for expert 'b'"), std::string::npos)
      << contract::Describe(errors);
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
  auto r = Evaluate({EvalModel("a", {f.a}), EvalModel("ens", {f.a, f.b}), EvalModel("twice", {f.a, f.a})},
                    {{"v", {f.dir / "v.txt"}}}, o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  const auto& j = *r;
  EXPECT_NEAR(j["models"]["a"]["domains"]["v"]["loss"].get<double>(), total_a / n, 1e-6);
  EXPECT_NEAR(j["models"]["ens"]["domains"]["v"]["loss"].get<double>(), total_ens / n, 1e-6);
  EXPECT_NEAR(j["models"]["twice"]["domains"]["v"]["loss"].get<double>(), total_a / n, 1e-9);
  EXPECT_NEAR(j["models"]["a"]["domains"]["v"]["ppl"].get<double>(), std::exp(total_a / n), 1e-6 * std::exp(total_a / n));
  EXPECT_EQ(j["models"]["a"]["domains"]["v"]["tokens"].get<int64_t>(), n);
}


std::string SaveModelWith(const LlamaModel& m, const std::string& dir, const SaveOptions& opts) {
  auto staged = StagedDir::Create(dir);
  EXPECT_TRUE(staged.ok());
  EXPECT_TRUE(WriteModelFiles(m, staged->path(), opts).ok());
  EXPECT_TRUE(MakeByteTokenizer()->SaveTo(staged->path()).ok());
  EXPECT_TRUE(staged->Publish().ok());
  return dir;
}

TEST(Merge, ReadsHalfPrecisionAndShardedInputs) {
  // The merge writes float32 straight from float32 inputs; bf16 and sharded inputs take the converting path.
  Fixture f;
  SaveOptions o;
  o.dtype = st::DType::kBF16;
  o.max_shard_bytes = 6000;
  const std::string a16 = SaveModelWith(*LoadModelDir(f.a), f.dir / "a16", o);
  ASSERT_TRUE(std::filesystem::exists(a16 + "/model.safetensors.index.json"));
  MergeSpec s;
  s.seed = f.seed;
  s.experts = {{"a", a16}, {"b", f.b}};
  s.keep_seed_expert = true;
  const std::string out = f.Merge(s, "moe16");
  EXPECT_TRUE(at::equal(Get(out, "model.layers.1.block_sparse_moe.experts.0.w2.weight"), Get(a16, "model.layers.1.mlp.down_proj.weight")));
  EXPECT_TRUE(at::equal(Get(out, "model.layers.1.block_sparse_moe.experts.1.w2.weight"), Get(f.b, "model.layers.1.mlp.down_proj.weight")));
  for (const std::string name : {"model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight", "model.norm.weight"}) {
    at::Tensor mean = (Get(a16, name).to(at::kDouble) + Get(f.b, name).to(at::kDouble) + Get(f.seed, name).to(at::kDouble)) / 3;
    EXPECT_TRUE(at::allclose(Get(out, name).to(at::kDouble), mean, 0, 1e-7)) << name;
  }
}

// One flipped bit inside the tensor data: the header still parses, only the manifest can tell.
void FlipBitNearEnd(const std::string& file) {
  std::fstream io(file, std::ios::in | std::ios::out | std::ios::binary);
  io.seekg(-100, std::ios::end);
  char c = 0;
  io.read(&c, 1);
  c ^= 1;
  io.seekp(-100, std::ios::end);
  io.write(&c, 1);
}

TEST(Merge, CorruptInputFailsAlthoughCheckedBesideTheMerge) {
  Fixture f;
  FlipBitNearEnd(f.b + "/model.safetensors");
  MergeSpec s;
  s.seed = f.seed;
  s.experts = {{"a", f.a}, {"b", f.b}};
  s.keep_seed_expert = true;
  // One checking thread, and one per input dir.
  for (int threads : {2, 4}) {
    at::set_num_threads(threads);
    auto staged = StagedDir::Create(f.dir / ("bad" + std::to_string(threads)));
    Status st = MergeToDir(s, staged->path());
    EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st.message();
    EXPECT_NE(st.message().find("model.safetensors"), std::string::npos) << st.message();
  }
  at::set_num_threads(2);
}

TEST(Merge, ChecksOnlyTheInputsItReads) {
  Fixture f;
  FlipBitNearEnd(f.seed + "/model.safetensors");
  testing::WriteText(f.dir / "p.txt", testing::SampleText(5, 1));
  auto merge = [&](MergeSpec s, const std::string& name) {
    auto staged = StagedDir::Create(f.dir / name);
    return MergeToDir(s, staged->path());
  };
  MergeSpec s;
  s.seed = f.seed;
  s.experts = {{"a", f.a}, {"b", f.b}};
  // The seed's weights are not used: its config is all that is read.
  EXPECT_TRUE(merge(s, "random").ok());
  // They are when the seed initialises the routers, is kept as an expert, or is upcycled.
  s.router_init = "hidden";
  s.prompts = {{"a", {f.dir / "p.txt"}}, {"b", {f.dir / "p.txt"}}};
  EXPECT_EQ(merge(s, "hidden").code(), StatusCode::kDataLoss);
  s.router_init = "random";
  s.keep_seed_expert = true;
  EXPECT_EQ(merge(s, "kept").code(), StatusCode::kDataLoss);
  MergeSpec up;
  up.method = "upcycle";
  up.seed = f.seed;
  EXPECT_EQ(merge(up, "up").code(), StatusCode::kDataLoss);
}

TEST(Merge, ReportsTheSha256OfTheWeightFilesItWrote) {
  Fixture f;
  MergeSpec s;
  s.seed = f.seed;
  s.experts = {{"a", f.a}, {"b", f.b}};
  s.keep_seed_expert = true;
  s.max_shard_bytes = 20000;  // several shards
  auto staged = StagedDir::Create(f.dir / "moe");
  ASSERT_TRUE(staged.ok());
  FileDigests digests;
  Status st = MergeToDir(s, staged->path(), nullptr, &digests);
  ASSERT_TRUE(st.ok()) << st.message();
  size_t shards = 0;
  for (const auto& [file, hex] : digests) {
    EXPECT_TRUE(file.ends_with(".safetensors") || file == "model.safetensors.index.json") << file;
    shards += file.ends_with(".safetensors");
    EXPECT_EQ(hex, *Sha256File(staged->path() + "/" + file)) << file;
  }
  EXPECT_GE(shards, 3u);
  EXPECT_TRUE(digests.count("model.safetensors.index.json"));
  ASSERT_TRUE(staged->Publish(digests).ok());
  EXPECT_TRUE(VerifyManifest(f.dir / "moe").ok());
  EXPECT_TRUE(LoadModelDir(f.dir / "moe").ok());
}

TEST(Merge, JobPublishesTheManifestThatHashingTheFilesGives) {
  Fixture f;
  nlohmann::json job = {
      {"kind", "merge"}, {"output_dir", f.dir / "job-moe"}, {"threads", 2},
      {"spec",
       {{"method", "btx"}, {"seed", f.seed}, {"keep_seed_expert", true},
        {"experts", {{{"name", "a"}, {"model", f.a}}, {{"name", "b"}, {"model", f.b}}}}}}};
  testing::WriteText(f.dir / "merge-job.json", job.dump());
  ASSERT_EQ(RunJobFile(f.dir / "merge-job.json", -1, nullptr), kExitOk);
  const std::string out = f.dir / "job-moe";
  Status verified = VerifyManifest(out);
  EXPECT_TRUE(verified.ok()) << verified.message();
  // The weights' digests were taken as they were written; the manifest is still byte for byte what hashing every
  // published file gives.
  auto files = ListFilesRecursive(out);
  ASSERT_TRUE(files.ok());
  std::string expect;
  for (const auto& file : *files)
    if (file != kManifestName) expect += *Sha256File(out + "/" + file) + "  " + file + "\n";
  EXPECT_EQ(*ReadFile(out + "/" + kManifestName), expect);
  MergeSpec s;
  s.seed = f.seed;
  s.experts = {{"a", f.a}, {"b", f.b}};
  s.keep_seed_expert = true;
  EXPECT_EQ(*Sha256File(out + "/model.safetensors"), *Sha256File(f.Merge(s, "direct") + "/model.safetensors"));
}

// A fake tokenizer whose pieces are given strings, for TokenText's UTF-8 handling.
class PieceTokenizer : public Tokenizer {
 public:
  explicit PieceTokenizer(std::vector<std::string> pieces) : pieces_(std::move(pieces)) {}
  std::vector<int32_t> Encode(std::string_view) const override { return {}; }
  std::string Decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids) s += pieces_.at(id);
    return s;
  }
  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  int32_t bos_id() const override { return 0; }
  int32_t eos_id() const override { return 1; }
  std::string kind() const override { return "test"; }
  Status SaveTo(const std::string&) const override { return Status::Ok(); }

 private:
  std::vector<std::string> pieces_;
};

TEST(TokenSpecialization, TokenTextIsPrintableAndValidUtf8) {
  auto byte = MakeByteTokenizer();
  EXPECT_EQ(TokenText(*byte, 'a'), "a");
  EXPECT_EQ(TokenText(*byte, '\n'), "\\n");
  EXPECT_EQ(TokenText(*byte, 0x01), "<0x01>");
  EXPECT_EQ(TokenText(*byte, 0xC3), "<0xC3>");  // half a UTF-8 sequence
  EXPECT_EQ(TokenText(*byte, kByteBos), "<bos>");
  EXPECT_EQ(TokenText(*byte, kByteEos), "<eos>");
  EXPECT_EQ(TokenText(*byte, kBytePad), "<pad>");
  PieceTokenizer t({"", "", "\xC3\xA9", "\xF0\x9F\x98\x80", "\xED\xA0\x80", "\xC3", "", "\xC0\xAF"});
  EXPECT_EQ(TokenText(t, 2), "\xC3\xA9");
  EXPECT_EQ(TokenText(t, 3), "\xF0\x9F\x98\x80");
  EXPECT_EQ(TokenText(t, 4), "<0xED><0xA0><0x80>");  // a surrogate
  EXPECT_EQ(TokenText(t, 5), "<0xC3>");
  EXPECT_EQ(TokenText(t, 6), "<id 6>");
  EXPECT_EQ(TokenText(t, 7), "<0xC0><0xAF>");  // overlong
  nlohmann::json j = {{"t", TokenText(*byte, 0xFF)}};
  EXPECT_NO_THROW(j.dump());
}

TEST(TokenSpecialization, ConstructedCounts) {
  // Six token ids over three experts (top-1 routing): 'a' always to 0, '\n' 8 of 10 times to 1, 0xC3 4 of 5 to 2,
  // 'z' too rare to score, ' ' split 5/5/10 (top 2), <bos> a 3/3 tie (the lower expert wins).
  at::Tensor te = at::zeros({kByteVocab, 3}, at::kLong), tc = at::zeros({kByteVocab}, at::kLong);
  auto set = [&](int id, int64_t n, std::vector<int64_t> c) {
    tc[id] = n;
    for (int e = 0; e < 3; ++e) te[id][e] = c[e];
  };
  set('a', 10, {10, 0, 0});
  set('\n', 10, {2, 8, 0});
  set(0xC3, 5, {0, 1, 4});
  set('z', 3, {3, 0, 0});
  set(' ', 20, {5, 5, 10});
  set(kByteBos, 6, {3, 3, 0});
  auto tok = MakeByteTokenizer();
  const auto j = TokenSpecialization(te, tc, /*min_count=*/4, /*top_tokens=*/8, tok.get(), {"code", "math", "prose"});
  EXPECT_NEAR(j["score"].get<double>(), (10 + 8 + 4 + 10 + 3) / 51.0, 1e-12);
  EXPECT_NEAR(j["baseline"].get<double>(), 20 / 51.0, 1e-12);  // expert 0 is chosen by 10+2+5+3 of 51
  EXPECT_EQ(j["tokens"], 51);
  EXPECT_EQ(j["token_ids"], 5);
  ASSERT_EQ(j["experts"].size(), 3u);
  const auto& e0 = j["experts"][0];
  EXPECT_EQ(e0["name"], "code");
  EXPECT_EQ(e0["token_ids"], 2);
  ASSERT_EQ(e0["top"].size(), 2u);
  EXPECT_EQ(e0["top"][0], nlohmann::json({{"id", 'a'}, {"text", "a"}, {"count", 10}, {"share", 1.0}}));
  EXPECT_EQ(e0["top"][1]["text"], "<bos>");
  EXPECT_DOUBLE_EQ(e0["top"][1]["share"].get<double>(), 0.5);
  EXPECT_EQ(j["experts"][1]["top"][0]["text"], "\\n");
  const auto& e2 = j["experts"][2];
  ASSERT_EQ(e2["top"].size(), 2u);
  EXPECT_EQ(e2["top"][0]["text"], " ");  // by count: 10 before 4
  EXPECT_DOUBLE_EQ(e2["top"][0]["share"].get<double>(), 0.5);
  EXPECT_EQ(e2["top"][1]["text"], "<0xC3>");
  EXPECT_DOUBLE_EQ(e2["top"][1]["share"].get<double>(), 0.8);
  // top_tokens caps the lists; min_count 1 lets 'z' in.
  const auto k = TokenSpecialization(te, tc, 1, 1, nullptr);
  EXPECT_EQ(k["token_ids"], 6);
  EXPECT_EQ(k["experts"][0]["top"].size(), 1u);
  EXPECT_FALSE(k["experts"][0]["top"][0].contains("text"));
  EXPECT_FALSE(k["experts"][0].contains("name"));
}

LlamaModel TinyMoe(uint64_t seed, bool token_only_routing) {
  ModelConfig c = testing::TinyConfig(4);
  c.num_hidden_layers = 3;
  auto m = LlamaModel::Init(c, seed);
  EXPECT_TRUE(m.ok());
  at::NoGradGuard ng;
  for (auto& [name, p] : m->params()) {
    // Sharper routers than at init, so that experts differ clearly.
    if (name.ends_with("gate.weight")) p.mul_(40);
    // Without attention output every layer's FFN input is a function of the token alone.
    if (token_only_routing && name.ends_with("o_proj.weight")) p.zero_();
  }
  return std::move(*m);
}

TEST(Eval, RoutingStatsAgreeWithTheForward) {
  LlamaModel m = TinyMoe(5, false);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 300; ++i) tokens.push_back(static_cast<int32_t>((i * 37 + i / 7) % 259));
  std::vector<MoeBackend> backends = {MoeBackend::kReference};
  if (KernelsAvailable()) backends.push_back(MoeBackend::kKernels);
  for (MoeBackend b : backends) {
    EvalOptions o;
    o.seq_len = 64;
    o.backend = b;
    RoutingStats r;
    EnsembleLoss({&m}, tokens, o.seq_len, o, &r);
    ASSERT_EQ(r.expert_counts.size(), 3u);
    EXPECT_EQ(r.token_count.sum().item<int64_t>(), 299);
    for (size_t l = 0; l < 3; ++l) {
      // Recomputed per-token choices add up to the forward's own per-expert counts.
      EXPECT_TRUE(at::equal(r.token_expert[l].sum(0), r.expert_counts[l])) << l;
      EXPECT_TRUE(at::equal(r.token_expert[l].sum(1), r.token_count * 2)) << l;
    }
  }
}

TEST(Eval, TokenOnlyRoutingScoresOne) {
  TempDir dir;
  const std::string moe = SaveModel(TinyMoe(6, true), dir / "moe");
  const std::string moe2 = SaveModel(TinyMoe(7, false), dir / "moe2");
  testing::WriteText(dir / "v.txt", testing::SampleText(30, 1));
  EvalOptions o;
  o.seq_len = 64;
  auto r = Evaluate({EvalModel("tok", {moe}, {"w", "x", "y", "z"}), EvalModel("ctx", {moe2})}, {{"v", {dir / "v.txt"}}}, o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  const auto& ts = (*r)["models"]["tok"]["token_specialization"];
  EXPECT_EQ(ts["top_k"], 2);
  ASSERT_EQ(ts["layers"].size(), 3u);
  for (const auto& layer : ts["layers"]) {
    EXPECT_DOUBLE_EQ(layer["score"].get<double>(), 1.0);
    EXPECT_LT(layer["baseline"].get<double>(), 1.0);
    EXPECT_EQ(layer["experts"][3]["name"], "z");
  }
  EXPECT_EQ((*r)["models"]["tok"]["expert_names"], nlohmann::json({"w", "x", "y", "z"}));
  EXPECT_FALSE((*r)["models"]["ctx"].contains("expert_names"));
  // Attention mixes context in: the same token id no longer always reaches the same expert.
  EXPECT_LT((*r)["models"]["ctx"]["token_specialization"]["layers"][1]["score"].get<double>(), 1.0);
  auto bad = Evaluate({EvalModel("tok", {moe}, {"only", "two"})}, {{"v", {dir / "v.txt"}}}, o);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
}

// XML 1.0 well-formedness for the documents we write: prolog, one root, matched tags, unique quoted
// attributes without '<', known entity references, no markup characters in text.
bool WellFormedXml(const std::string& s, std::string* why) {
  size_t i = 0;
  auto fail = [&](const std::string& m) {
    *why = m + " at byte " + std::to_string(i);
    return false;
  };
  auto name_char = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == ':' || c == '.'; };
  auto entity = [&](size_t& j) {
    const size_t e = s.find(';', j);
    if (e == std::string::npos) return false;
    const std::string ent = s.substr(j + 1, e - j - 1);
    if (ent != "amp" && ent != "lt" && ent != "gt" && ent != "quot" && ent != "apos" &&
        !std::regex_match(ent, std::regex("#[0-9]+|#x[0-9a-fA-F]+")))
      return false;
    j = e + 1;
    return true;
  };
  if (s.rfind("<?xml", 0) == 0) {
    i = s.find("?>");
    if (i == std::string::npos) return fail("unterminated prolog");
    i += 2;
  }
  std::vector<std::string> open;
  bool root_done = false;
  while (i < s.size()) {
    if (s[i] == '&') {
      if (open.empty()) return fail("reference outside the root");
      if (!entity(i)) return fail("bad entity reference");
      continue;
    }
    if (s[i] == '>') return fail("'>' in text");
    if (s[i] != '<') {
      if (open.empty() && !std::isspace(static_cast<unsigned char>(s[i]))) return fail("text outside the root");
      ++i;
      continue;
    }
    if (s.compare(i, 2, "</") == 0) {
      const size_t e = s.find('>', i);
      if (e == std::string::npos) return fail("unterminated end tag");
      const std::string n = s.substr(i + 2, e - i - 2);
      if (open.empty() || open.back() != n) return fail("mismatched </" + n + ">");
      open.pop_back();
      if (open.empty()) root_done = true;
      i = e + 1;
      continue;
    }
    if (root_done) return fail("content after the root element");
    size_t j = i + 1;
    while (j < s.size() && name_char(s[j])) ++j;
    const std::string n = s.substr(i + 1, j - i - 1);
    if (n.empty()) return fail("'<' without a tag name");
    std::vector<std::string> attrs;
    for (;;) {
      const bool spaced = j < s.size() && std::isspace(static_cast<unsigned char>(s[j]));
      while (j < s.size() && std::isspace(static_cast<unsigned char>(s[j]))) ++j;
      if (j >= s.size()) return fail("unterminated tag");
      if (s[j] == '>') {
        open.push_back(n);
        i = j + 1;
        break;
      }
      if (s.compare(j, 2, "/>") == 0) {
        if (open.empty()) root_done = true;
        i = j + 2;
        break;
      }
      if (!spaced) return fail("attributes not separated by space");
      size_t k = j;
      while (k < s.size() && name_char(s[k])) ++k;
      const std::string a = s.substr(j, k - j);
      if (a.empty() || k + 1 >= s.size() || s[k] != '=' || (s[k + 1] != '"' && s[k + 1] != '\'')) return fail("bad attribute");
      if (std::find(attrs.begin(), attrs.end(), a) != attrs.end()) return fail("duplicate attribute " + a);
      attrs.push_back(a);
      const char q = s[k + 1];
      size_t v = k + 2;
      while (v < s.size() && s[v] != q) {
        if (s[v] == '<') return fail("'<' in an attribute value");
        if (s[v] == '&') {
          if (!entity(v)) return fail("bad entity reference in an attribute");
        } else {
          ++v;
        }
      }
      if (v >= s.size()) return fail("unterminated attribute value");
      j = v + 1;
    }
  }
  if (!open.empty()) return fail("unclosed <" + open.back() + ">");
  if (!root_done) return fail("no root element");
  return true;
}

struct SvgBar {
  std::string model, domain, fill;
  int layer = -1, expert = -1;
  double share = -1, x = 0, y = 0, w = 0, h = 0;
};
std::vector<SvgBar> SvgBars(const std::string& svg) {
  std::vector<SvgBar> out;
  const std::regex rect("<rect ([^>]*data-share[^>]*)>");
  const std::regex attr("([a-z-]+)=\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), rect); it != std::sregex_iterator(); ++it) {
    SvgBar b;
    const std::string body = (*it)[1];
    for (auto a = std::sregex_iterator(body.begin(), body.end(), attr); a != std::sregex_iterator(); ++a) {
      const std::string k = (*a)[1];
      std::string v = (*a)[2];
      for (const auto& [ent, ch] : std::vector<std::pair<std::string, std::string>>{
               {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""}, {"&apos;", "'"}, {"&amp;", "&"}})
        for (size_t p = v.find(ent); p != std::string::npos; p = v.find(ent, p + 1)) v.replace(p, ent.size(), ch);
      if (k == "data-model") b.model = v;
      else if (k == "data-domain") b.domain = v;
      else if (k == "data-layer") b.layer = std::stoi(v);
      else if (k == "data-expert") b.expert = std::stoi(v);
      else if (k == "data-share") b.share = std::stod(v);
      else if (k == "fill") b.fill = v;
      else if (k == "x") b.x = std::stod(v);
      else if (k == "y") b.y = std::stod(v);
      else if (k == "width") b.w = std::stod(v);
      else if (k == "height") b.h = std::stod(v);
    }
    out.push_back(b);
  }
  return out;
}

uint32_t Crc32(const std::string& s) {
  uint32_t c = 0xffffffffu;
  for (unsigned char ch : s) {
    c ^= ch;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
  }
  return ~c;
}
uint32_t Be32(const std::string& s, size_t at) {
  return (uint32_t(uint8_t(s[at])) << 24) | (uint32_t(uint8_t(s[at + 1])) << 16) | (uint32_t(uint8_t(s[at + 2])) << 8) |
         uint32_t(uint8_t(s[at + 3]));
}

TEST(Eval, JobWritesTablesAndRoutingCharts) {
  TempDir dir;
  const std::string seed = SaveModel(*LlamaModel::Init(testing::TinyConfig(), 1), dir / "seed");
  const std::string moe = SaveModel(TinyMoe(8, false), dir / "moe");
  testing::WriteText(dir / "code.txt", "int main() { return 0; }\n" + testing::SampleText(10, 2));
  testing::WriteText(dir / "prose.txt", testing::SampleText(12, 5));
  // A domain name that needs escaping in XML.
  nlohmann::json job = {
      {"kind", "eval"}, {"output_dir", dir / "eval"}, {"threads", 2},
      {"spec",
       {{"models", {{{"name", "seed"}, {"model", seed}}, {{"name", "btx"}, {"model", moe}, {"expert_names", {"code", "math", "prose", "seed & <co>"}}}}},
        {"domains", {{{"name", "code"}, {"valid", dir / "code.txt"}}, {{"name", "a&b<\"c\">"}, {"valid", dir / "prose.txt"}}}},
        {"seq_len", 64}, {"top_tokens", 3}}}};
  testing::WriteText(dir / "job.json", job.dump());
  ASSERT_EQ(RunJobFile(dir / "job.json", -1, nullptr), kExitOk);
  for (const char* f : {"eval.json", "eval.txt", "routing.svg"}) EXPECT_TRUE(std::filesystem::exists(dir / ("eval/" + std::string(f)))) << f;
  EXPECT_TRUE(VerifyManifest(dir / "eval").ok());
  const auto ev = nlohmann::json::parse(*ReadFile(dir / "eval/eval.json"));
  const auto& layers = ev["models"]["btx"]["token_specialization"]["layers"];
  ASSERT_EQ(layers.size(), 3u);
  EXPECT_LE(layers[0]["experts"][0]["top"].size(), 3u);
  EXPECT_EQ(layers[0]["tokens"].get<int64_t>() > 0, true);

  const std::string text = *ReadFile(dir / "eval/eval.txt");
  for (const char* want : {"Validation loss", "Routing of btx", "Token-ID specialization of btx", "seed & <co>"})
    EXPECT_NE(text.find(want), std::string::npos) << want;

  const std::string svg = *ReadFile(dir / "eval/routing.svg");
  std::string why;
  EXPECT_TRUE(WellFormedXml(svg, &why)) << why;
  const auto bars = SvgBars(svg);
  ASSERT_EQ(bars.size(), 3u * 2u * 4u);  // layers x domains x experts
  for (const auto& b : bars) {
    const double want = ev["models"][b.model]["domains"][b.domain]["routing"][b.layer][b.expert].get<double>();
    EXPECT_NEAR(b.share, want, 1e-6) << b.domain << " " << b.layer << " " << b.expert;
  }
  EXPECT_NE(svg.find("a&amp;b&lt;&quot;c&quot;&gt;"), std::string::npos);
  for (const char* label : {">layer 0<", ">layer 2<", "3: seed &amp; &lt;co&gt;<"}) EXPECT_NE(svg.find(label), std::string::npos) << label;

  if (PngAvailable()) {
    const std::string png = *ReadFile(dir / "eval/routing.png");
    ASSERT_GT(png.size(), 8u + 25u);
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    std::vector<std::string> chunks;
    for (size_t at = 8; at + 12 <= png.size();) {
      const uint32_t n = Be32(png, at);
      ASSERT_LE(at + 12 + n, png.size());
      chunks.push_back(png.substr(at + 4, 4));
      EXPECT_EQ(Be32(png, at + 8 + n), Crc32(png.substr(at + 4, 4 + n))) << chunks.back();
      if (chunks.back() == "IHDR") {
        // Twice the SVG's size.
        const std::smatch m = [&] {
          std::smatch x;
          std::regex_search(svg, x, std::regex("width=\"([0-9.]+)\" height=\"([0-9.]+)\""));
          return x;
        }();
        EXPECT_EQ(Be32(png, at + 8), static_cast<uint32_t>(2 * std::stod(m[1])));
        EXPECT_EQ(Be32(png, at + 12), static_cast<uint32_t>(2 * std::stod(m[2])));
      }
      at += 12 + n;
    }
    EXPECT_EQ(chunks.front(), "IHDR");
    EXPECT_EQ(chunks.back(), "IEND");
  }

  // python3's XML parser and zlib, when python3 is there: an independent parse, and the bars' colours in the PNG.
  if (::access("/usr/bin/python3", X_OK) == 0) {
    testing::WriteText(dir / "check.py", R"PY(
import json, struct, sys, zlib
import xml.etree.ElementTree as ET
svg, png, ev = sys.argv[1:4]
root = ET.parse(svg).getroot()
ns = '{http://www.w3.org/2000/svg}'
e = json.load(open(ev))
bars = [r for r in root.iter(ns + 'rect') if 'data-share' in r.attrib]
assert len(bars) == 24, len(bars)
for b in bars:
    want = e['models'][b.get('data-model')]['domains'][b.get('data-domain')]['routing'][int(b.get('data-layer'))][int(b.get('data-expert'))]
    assert abs(float(b.get('data-share')) - want) < 1e-6
    assert b.find(ns + 'title') is not None
if png != '-':
    data = open(png, 'rb').read()
    pos, idat = 8, b''
    while pos < len(data):
        n, t = struct.unpack('>I4s', data[pos:pos + 8])
        if t == b'IHDR':
            w, h = struct.unpack('>II', data[pos + 8:pos + 16])
        if t == b'IDAT':
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = 1 + 3 * w
    assert len(raw) == h * stride
    s = w / float(root.get('width'))
    dashes = [float(l.get('y1')) for l in root.iter(ns + 'line') if l.get('stroke-dasharray')]
    checked = 0
    for b in bars:
        x, y, bw, bh = (float(b.get(k)) for k in ('x', 'y', 'width', 'height'))
        cy = y + bh / 2
        if bh < 3 or any(abs(cy - d) < 3 for d in dashes):
            continue
        px, py = int((x + bw / 2) * s), int(cy * s)
        got = '#%02x%02x%02x' % tuple(raw[py * stride + 1 + 3 * px:py * stride + 4 + 3 * px])
        assert got == b.get('fill'), (b.attrib, got)
        checked += 1
    assert checked > 12, checked
print('ok')
)PY");
    const std::string cmd = "/usr/bin/python3 '" + (dir / "check.py") + "' '" + (dir / "eval/routing.svg") + "' '" +
                            (PngAvailable() ? dir / "eval/routing.png" : std::string("-")) + "' '" + (dir / "eval/eval.json") + "' 2>&1";
    FILE* p = ::popen(cmd.c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[512];
    while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    EXPECT_EQ(::pclose(p), 0) << out;
    EXPECT_EQ(out, "ok\n");
  }

  // Dense models only: no routing, no charts.
  job["output_dir"] = dir / "eval-dense";
  job["spec"]["models"] = {{{"name", "seed"}, {"model", seed}}};
  testing::WriteText(dir / "job2.json", job.dump());
  ASSERT_EQ(RunJobFile(dir / "job2.json", -1, nullptr), kExitOk);
  EXPECT_TRUE(std::filesystem::exists(dir / "eval-dense/eval.txt"));
  EXPECT_FALSE(std::filesystem::exists(dir / "eval-dense/routing.svg"));
  EXPECT_FALSE(std::filesystem::exists(dir / "eval-dense/routing.png"));

  // Bad expert_names: an invalid job (65) naming the field.
  job["output_dir"] = dir / "eval-bad";
  job["spec"]["models"] = {{{"name", "btx"}, {"model", moe}, {"expert_names", "code"}}};
  testing::WriteText(dir / "job3.json", job.dump());
  EXPECT_EQ(RunJobFile(dir / "job3.json", -1, nullptr), kExitInvalidJob);
  job["spec"]["models"] = {{{"name", "btx"}, {"model", moe}, {"expert_names", {"a", "b"}}}};
  testing::WriteText(dir / "job4.json", job.dump());
  EXPECT_EQ(RunJobFile(dir / "job4.json", -1, nullptr), kExitInvalidJob);
}

}  // namespace
}  // namespace btx::model
