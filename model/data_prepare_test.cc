// PrepareData: text corpora -> train/valid token shards + manifest.json, published atomically.
#include <filesystem>
#include <nlohmann/json.hpp>

#include "btx/model/data_prepare.h"
#include "btx/contract/files.h"
#include "btx/model/token_shard.h"
#include "btx/model/tokenizer.h"
#include "test_util.h"

namespace btx::model {
namespace {
namespace fs = std::filesystem;
using testing::TempDir;

std::vector<int32_t> ReadSplit(const std::string& dir, const nlohmann::json& split) {
  std::vector<int32_t> all;
  for (const auto& s : split.at("shards")) {
    auto t = ReadTokenShard(dir + "/" + s.get<std::string>());
    EXPECT_TRUE(t.ok()) << t.status().message();
    if (t.ok()) all.insert(all.end(), t->begin(), t->end());
  }
  return all;
}

std::vector<int32_t> Doc(const std::string& text) {
  std::vector<int32_t> d = {kByteBos};
  for (unsigned char c : text) d.push_back(c);
  d.push_back(kByteEos);
  return d;
}

TEST(DataPrepare, ByteTokenizerSplitsAllTokensIntoShards) {
  TempDir dir;
  const std::string a = testing::SampleText(40, 1), b = testing::SampleText(25, 2);
  testing::WriteText(dir / "in/a.txt", a);
  testing::WriteText(dir / "in/sub/b.txt", b);
  DataPrepareOptions o;
  o.inputs = {dir / "in"};
  o.out = dir / "out";
  o.valid_fraction = 0.2;
  o.shard_tokens = 500;
  o.seed = 7;
  auto r = PrepareData(o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->files, 2);
  EXPECT_EQ(r->bytes, static_cast<int64_t>(a.size() + b.size()));
  EXPECT_EQ(r->train_tokens + r->valid_tokens, r->bytes + 4);  // bos + eos per document
  EXPECT_GT(r->valid_tokens, 0);
  EXPECT_NEAR(static_cast<double>(r->valid_tokens), 0.2 * static_cast<double>(r->bytes), 3.0);
  EXPECT_TRUE(VerifyManifest(o.out).ok());

  auto m = nlohmann::json::parse(*ReadFile(o.out + "/manifest.json"));
  EXPECT_EQ(m["tokenizer"]["type"], "byte");
  EXPECT_EQ(m["train"]["tokens"].get<int64_t>(), r->train_tokens);
  EXPECT_EQ(m["inputs"].size(), 2u);
  EXPECT_EQ(static_cast<int64_t>(m["train"]["shards"].size()), r->train_shards);
  EXPECT_EQ(r->train_shards, (r->train_tokens + 499) / 500);

  // valid ++ train is the documents, whole, in the seeded order.
  std::vector<int32_t> got = ReadSplit(o.out, m["valid"]), train = ReadSplit(o.out, m["train"]);
  got.insert(got.end(), train.begin(), train.end());
  std::vector<int32_t> ab = Doc(a), ba = Doc(b);
  const auto db = Doc(b), da = Doc(a);
  ab.insert(ab.end(), db.begin(), db.end());
  ba.insert(ba.end(), da.begin(), da.end());
  EXPECT_TRUE(got == ab || got == ba);

  // Deterministic: the same inputs and seed give the same shards.
  o.out = dir / "out2";
  ASSERT_TRUE(PrepareData(o).ok());
  EXPECT_EQ(*ReadFile(dir / "out/train/shard-00000.btxtok"), *ReadFile(dir / "out2/train/shard-00000.btxtok"));
}

TEST(DataPrepare, ZeroValidFractionLeavesValidEmpty) {
  TempDir dir;
  testing::WriteText(dir / "a.txt", "hello");
  DataPrepareOptions o;
  o.inputs = {dir / "a.txt"};
  o.out = dir / "out";
  o.valid_fraction = 0;
  auto r = PrepareData(o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->train_tokens, 7);
  EXPECT_EQ(r->valid_tokens, 0);
  EXPECT_EQ(r->valid_shards, 0);
  EXPECT_TRUE(fs::is_directory(dir / "out/valid"));
}

TEST(DataPrepare, ErrorsNameTheArgumentAndLeaveNothingBehind) {
  TempDir dir;
  testing::WriteText(dir / "a.txt", "hello");
  DataPrepareOptions o;
  o.inputs = {dir / "a.txt", dir / "missing.txt"};
  o.out = dir / "out";
  auto r = PrepareData(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find(dir / "missing.txt"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir / "out"));

  o.inputs = {dir / "a.txt"};
  o.tokenizer = dir / "nope.model";
  r = PrepareData(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--tokenizer"), std::string::npos);
  o.tokenizer = "spm:abc";
  EXPECT_NE(PrepareData(o).status().message().find("--tokenizer spm:abc"), std::string::npos);

  o.tokenizer = "byte";
  fs::create_directories(dir / "out");
  r = PrepareData(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_FALSE(e.path().filename().string().starts_with(".out.tmp-")) << e.path();
}

TEST(DataPrepare, ParsesArguments) {
  auto o = ParseDataPrepareArgs({"a.txt", "--out", "d", "dir", "--valid-fraction=0.1", "--shard-tokens", "9",
                                 "--seed", "3", "--tokenizer", "spm:64"});
  ASSERT_TRUE(o.ok()) << o.status().message();
  EXPECT_EQ(o->inputs, (std::vector<std::string>{"a.txt", "dir"}));
  EXPECT_EQ(o->out, "d");
  EXPECT_DOUBLE_EQ(o->valid_fraction, 0.1);
  EXPECT_EQ(o->shard_tokens, 9);
  EXPECT_EQ(o->seed, 3u);
  EXPECT_EQ(o->tokenizer, "spm:64");

  auto msg = [](std::vector<std::string> a) { return ParseDataPrepareArgs(a).status().message(); };
  EXPECT_EQ(msg({"a", "--out", "d", "--valid-fraction", "0.9"}), "--valid-fraction 0.9: expected a number in [0, 0.5]");
  EXPECT_NE(msg({"a", "--out", "d", "--shard-tokens", "0"}).find("--shard-tokens 0"), std::string::npos);
  EXPECT_EQ(msg({"a", "--out", "d", "--bogus"}), "unknown argument --bogus");
  EXPECT_EQ(msg({"a"}), "--out DIR is required");
  EXPECT_EQ(msg({"--out", "d"}), "no INPUT given (text or JSONL files, or directories)");
  EXPECT_EQ(msg({"a", "--out"}), "--out needs a value");
  EXPECT_EQ(msg({"a", "--out", "d", "--format", "csv"}), "--format csv: expected text, jsonl or chat");
  EXPECT_EQ(msg({"a", "--out", "d", "--format", "chat", "--text-field", "body"}),
            "--text-field body: only --format jsonl has a text field, not chat");
  auto chat = ParseDataPrepareArgs({"a", "--out", "d", "--format=jsonl", "--text-field", "body"});
  ASSERT_TRUE(chat.ok()) << chat.status().message();
  EXPECT_EQ(chat->format.format, DataFormat::kJsonl);
  EXPECT_EQ(chat->format.text_field, "body");
}

TEST(DataPrepare, TrainsSentencePieceIntoTheOutputDir) {
  if (!SentencePieceAvailable()) GTEST_SKIP() << "built without sentencepiece";
  TempDir dir;
  testing::WriteText(dir / "a.txt", testing::SampleText(400, 3));
  DataPrepareOptions o;
  o.inputs = {dir / "a.txt"};
  o.out = dir / "out";
  o.tokenizer = "spm:320";
  auto r = PrepareData(o);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_TRUE(fs::exists(dir / "out/tokenizer.model"));
  auto tok = LoadSentencePiece(dir / "out/tokenizer.model");
  ASSERT_TRUE(tok.ok()) << tok.status().message();
  auto m = nlohmann::json::parse(*ReadFile(dir / "out/manifest.json"));
  EXPECT_EQ(m["tokenizer"]["type"], "sentencepiece");
  EXPECT_EQ(m["tokenizer"]["vocab_size"].get<int64_t>(), (*tok)->vocab_size());
  EXPECT_LT(r->train_tokens + r->valid_tokens, r->bytes);  // subwords, not bytes
}

}  // namespace
}  // namespace btx::model
