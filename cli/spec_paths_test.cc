#include "spec_paths.h"

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "btx/scheduler/spec.h"

namespace btx::cli {
namespace {
using json = nlohmann::json;

const PathContext kCtx{.cwd = "/work/proj", .home = "/home/u"};

TEST(SpecPathsTest, AbsolutizePath) {
  EXPECT_EQ(AbsolutizePath("data/a.txt", kCtx), "/work/proj/data/a.txt");
  EXPECT_EQ(AbsolutizePath("./data/../b.txt", kCtx), "/work/proj/b.txt");
  EXPECT_EQ(AbsolutizePath("../up/c", kCtx), "/work/up/c");
  EXPECT_EQ(AbsolutizePath("/abs/d", kCtx), "/abs/d");
  EXPECT_EQ(AbsolutizePath("~/corpus", kCtx), "/home/u/corpus");
  EXPECT_EQ(AbsolutizePath("file:///x/y", kCtx), "file:///x/y");
  EXPECT_EQ(AbsolutizePath("", kCtx), "");
  EXPECT_EQ(AbsolutizePath("dir/", kCtx), "/work/proj/dir/");
}

TEST(SpecPathsTest, RewritesEveryPathFieldAndNothingElse) {
  const std::string yaml = R"(
name: t
seed:
  init: {preset: tiny}
  pretrain:
    data: {train: [a.txt, /abs/b.txt], valid: v.txt}
    steps: 3
tokenizer: spm/tok.model
experts:
  - {name: code, data: {train: code/train.txt, valid: [code/valid.txt]}, steps: 2}
  - {name: "007", data: {train: [~/math.txt]}, steps: 2}
train: {lr: 3e-3, seq_len: 16}
)";
  RewrittenSpec r = AbsolutizeSpecPaths(yaml, kCtx);
  ASSERT_TRUE(r.parsed);
  json s = json::parse(r.text);
  EXPECT_EQ(s["seed"]["pretrain"]["data"]["train"], json({"/work/proj/a.txt", "/abs/b.txt"}));
  EXPECT_EQ(s["seed"]["pretrain"]["data"]["valid"], "/work/proj/v.txt");
  EXPECT_EQ(s["tokenizer"], "/work/proj/spm/tok.model");
  EXPECT_EQ(s["experts"][0]["data"]["train"], "/work/proj/code/train.txt");
  EXPECT_EQ(s["experts"][0]["data"]["valid"], json({"/work/proj/code/valid.txt"}));
  EXPECT_EQ(s["experts"][1]["data"]["train"], json({"/home/u/math.txt"}));
  // Typing follows the scheduler's: quoted stays a string, plain numbers are numbers.
  EXPECT_EQ(s["experts"][1]["name"], "007");
  EXPECT_EQ(s["seed"]["pretrain"]["steps"], 3);
  EXPECT_DOUBLE_EQ(s["train"]["lr"].get<double>(), 3e-3);
  EXPECT_EQ(s["name"], "t");
  EXPECT_EQ(r.rewritten, (std::vector<std::string>{"seed.pretrain.data.train[0]", "seed.pretrain.data.valid", "tokenizer",
                                                   "experts[0].data.train", "experts[0].data.valid[0]",
                                                   "experts[1].data.train[0]"}));
  ASSERT_EQ(r.paths.size(), 7u);  // the absolute one too
  EXPECT_EQ(r.paths[1], std::make_pair(std::string("seed.pretrain.data.train[1]"), std::string("/abs/b.txt")));
}

TEST(SpecPathsTest, SeedModelAndByteTokenizer) {
  RewrittenSpec r = AbsolutizeSpecPaths("seed: {model: models/seed}\ntokenizer: byte\nexperts: []\n", kCtx);
  ASSERT_TRUE(r.parsed);
  json s = json::parse(r.text);
  EXPECT_EQ(s["seed"]["model"], "/work/proj/models/seed");
  EXPECT_EQ(s["tokenizer"], "byte");
}

// Exactly the tokenizer forms of the contract that name a file are rewritten, and the scheduler
// accepts every rewritten form as it stands.
TEST(SpecPathsTest, TokenizerFilesInEveryFormTheSchedulerAccepts) {
  const std::string base = "name: t\nseed: {init: {preset: tiny}, pretrain: {data: {train: p.txt}}}\n"
                           "experts: [{name: a, data: {train: a.txt}}]\n";
  const std::vector<std::pair<std::string, json>> cases = {
      {"tokenizer: {sentencepiece: spm/tok.model}", {{"sentencepiece", "/work/proj/spm/tok.model"}}},
      {"tokenizer: spm/tok.model", "/work/proj/spm/tok.model"},
      {"tokenizer: ~/tok.model", "/home/u/tok.model"},
      {"tokenizer: byte", "byte"},
      {"tokenizer: {type: byte}", {{"type", "byte"}}},
      {"tokenizer: {type: sentencepiece, vocab_size: 300}", {{"type", "sentencepiece"}, {"vocab_size", 300}}},
  };
  for (const auto& [line, rewritten] : cases) {
    SCOPED_TRACE(line);
    RewrittenSpec r = AbsolutizeSpecPaths(base + line, kCtx);
    ASSERT_TRUE(r.parsed);
    EXPECT_EQ(r.spec["tokenizer"], rewritten);
    const bool names_a_file = rewritten.is_object() ? rewritten.contains("sentencepiece") : rewritten != "byte";
    bool listed = false;
    for (const auto& [field, path] : r.paths) listed = listed || field.rfind("tokenizer", 0) == 0;
    EXPECT_EQ(listed, names_a_file);
    auto spec = scheduler::ParseSpec(r.text);
    ASSERT_TRUE(spec.ok()) << spec.status();
    if (names_a_file) {
      const std::string path = rewritten.is_object() ? rewritten["sentencepiece"] : rewritten;
      EXPECT_EQ((*spec)["tokenizer"], json({{"sentencepiece", path}}));
    }
  }
}

TEST(SpecPathsTest, WrongTypesAreLeftForTheScheduler) {
  RewrittenSpec r = AbsolutizeSpecPaths("seed: {model: 5}\nexperts: [{name: a, data: {train: {x: 1}}}]\n", kCtx);
  ASSERT_TRUE(r.parsed);
  json s = json::parse(r.text);
  EXPECT_EQ(s["seed"]["model"], 5);
  EXPECT_EQ(s["experts"][0]["data"]["train"], json({{"x", 1}}));
  EXPECT_TRUE(r.rewritten.empty());
}

TEST(SpecPathsTest, UnparsableTextIsSentAsIsSoTheSchedulerNamesTheLine) {
  const std::string bad = "name: [unclosed\nseed: x\n";
  RewrittenSpec r = AbsolutizeSpecPaths(bad, kCtx);
  EXPECT_FALSE(r.parsed);
  EXPECT_EQ(r.text, bad);
  EXPECT_FALSE(AbsolutizeSpecPaths("a: 1\na: 2\n", kCtx).parsed);  // duplicate key
  EXPECT_FALSE(AbsolutizeSpecPaths("- just\n- a list\n", kCtx).parsed);
}

// The scheduler's parser, with its limits: hostile specs are passed through untouched for the
// scheduler to reject, instead of blowing up btxctl first.
TEST(SpecPathsTest, HostileYamlIsSentAsIs) {
  std::string bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n";
  for (char c = 'b'; c <= 'j'; ++c) {
    const char prev = static_cast<char>(c - 1);
    bomb += Cat(std::string(1, c), ": &", std::string(1, c), " [*", std::string(1, prev), ", *", std::string(1, prev),
                ", *", std::string(1, prev), ", *", std::string(1, prev), ", *", std::string(1, prev), ", *",
                std::string(1, prev), ", *", std::string(1, prev), ", *", std::string(1, prev), ", *",
                std::string(1, prev), ", *", std::string(1, prev), "]\n");
  }
  RewrittenSpec r = AbsolutizeSpecPaths(bomb, kCtx);
  EXPECT_FALSE(r.parsed);
  EXPECT_EQ(r.text, bomb);
  EXPECT_FALSE(AbsolutizeSpecPaths("name: \"\\N\"\nseed: {model: m}\n", kCtx).parsed) << "\\N decodes to a lone byte";
  EXPECT_FALSE(AbsolutizeSpecPaths("name: \xff\xfe\n", kCtx).parsed);
}

TEST(SpecPathsTest, JsonInputWorksToo) {
  RewrittenSpec r = AbsolutizeSpecPaths(R"({"seed": {"model": "m"}, "experts": []})", kCtx);
  ASSERT_TRUE(r.parsed);
  EXPECT_EQ(json::parse(r.text)["seed"]["model"], "/work/proj/m");
}

}  // namespace
}  // namespace btx::cli
