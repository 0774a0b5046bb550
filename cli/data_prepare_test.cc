// `btxctl data prepare` as a user runs it: the real btxctl, which hands the work to the sibling
// btx-model-tool. No scheduler or PostgreSQL involved.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include <gtest/gtest.h>

#include "cli_test_util.h"
#include "commands.h"

namespace btx::cli {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::RunBtxctl;
using testing::WriteFile;

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class DataPrepare : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTestDir(); }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(DataPrepare, ByteTokenizerWritesShardsAndManifest) {
  std::string a, b;
  for (int i = 0; i < 300; ++i) a += "line " + std::to_string(i) + " of the first corpus\n";
  for (int i = 0; i < 120; ++i) b += "another " + std::to_string(i * 3) + " text\n";
  WriteFile(dir_ + "/corpus/a.txt", a);
  WriteFile(dir_ + "/b.txt", b);
  // Relative paths resolve against btxctl's working directory, as for every other command.
  auto r = RunBtxctl({"data", "prepare", "corpus", "b.txt", "--out", "prepared", "--valid-fraction", "0.1",
                      "--shard-tokens", "1000", "--seed", "5"},
                     {}, dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("2 files"), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;

  const std::string out = dir_ + "/prepared";
  auto m = json::parse(Slurp(out + "/manifest.json"));
  const int64_t bytes = static_cast<int64_t>(a.size() + b.size());
  const int64_t train = m["train"]["tokens"].get<int64_t>(), valid = m["valid"]["tokens"].get<int64_t>();
  EXPECT_EQ(train + valid, bytes + 2 * 2);  // byte tokenizer: one token per byte, plus bos/eos per file
  EXPECT_GT(valid, 0);
  EXPECT_EQ(m["bytes"].get<int64_t>(), bytes);
  int64_t per_input = 0;
  for (const auto& in : m["inputs"]) per_input += in["tokens"].get<int64_t>();
  EXPECT_EQ(per_input, train + valid);
  for (const char* split : {"train", "valid"}) {
    int64_t stored = 0;
    ASSERT_FALSE(m[split]["shards"].empty()) << split;
    for (const auto& s : m[split]["shards"]) {
      const std::string path = out + "/" + s.get<std::string>();
      ASSERT_TRUE(fs::is_regular_file(path)) << path;
      EXPECT_TRUE(path.ends_with(".btxtok"));
      stored += (static_cast<int64_t>(fs::file_size(path)) - 64) / 2;  // 64-byte header, u16 ids
    }
    EXPECT_EQ(stored, m[split]["tokens"].get<int64_t>()) << split;
  }
  EXPECT_EQ(m["train"]["shards"].size(), static_cast<size_t>((train + 999) / 1000));
  EXPECT_TRUE(fs::exists(out + "/manifest.sha256"));

  // The output is never overwritten.
  auto again = RunBtxctl({"data", "prepare", "b.txt", "--out", "prepared"}, {}, dir_);
  EXPECT_EQ(again.exit_code, 2);
  EXPECT_NE(again.err.find("already exists"), std::string::npos) << again.err;
}

TEST_F(DataPrepare, BadInputsExitTwoNamingThePath) {
  WriteFile(dir_ + "/a.txt", "hello\n");
  const std::string missing = dir_ + "/no-such-corpus";
  auto r = RunBtxctl({"data", "prepare", dir_ + "/a.txt", missing, "--out", dir_ + "/out"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find(missing), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(r.err.starts_with("btxctl: ")) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/out"));

  r = RunBtxctl({"data", "prepare", dir_ + "/a.txt", "--out", dir_ + "/out", "--valid-fraction", "2"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--valid-fraction 2"), std::string::npos) << r.err;

  r = RunBtxctl({"data", "prepare", dir_ + "/a.txt", "--out", dir_ + "/out", "--tokenizer", dir_ + "/x.model"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find(dir_ + "/x.model"), std::string::npos) << r.err;

  r = RunBtxctl({"data", "prepare", dir_ + "/a.txt"});  // no --out: btxctl's own flag parsing
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--out"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/out"));
}

TEST_F(DataPrepare, ChatAndJsonlBecomeShardsWithTheLossOnAnswers) {
  std::string chat;
  for (int i = 0; i < 20; ++i)
    chat += json{{"messages", {{{"role", "user"}, {"content", "question " + std::to_string(i)}},
                              {{"role", "assistant"}, {"content", "answer " + std::to_string(i)}}}}}
                .dump() +
            "\n";
  WriteFile(dir_ + "/chat.jsonl", chat);
  WriteFile(dir_ + "/docs.jsonl", "{\"body\": \"first\"}\n{\"body\": \"second\"}\n");
  auto r = RunBtxctl({"data", "prepare", "chat.jsonl", "--out", "chat-out", "--valid-fraction", "0"}, {}, dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto m = json::parse(Slurp(dir_ + "/chat-out/manifest.json"));
  const int64_t tokens = m["train"]["tokens"].get<int64_t>(), loss = m["train"]["loss_tokens"].get<int64_t>();
  // Per conversation, "answer N" and its <|im_end|> (byte tokenizer: one token per byte) carry the loss.
  int64_t want = 0;
  for (int i = 0; i < 20; ++i) want += static_cast<int64_t>(("answer " + std::to_string(i) + "<|im_end|>").size());
  EXPECT_EQ(loss, want);
  EXPECT_LT(loss, tokens);
  EXPECT_NE(r.out.find("loss on " + std::to_string(loss) + " tokens"), std::string::npos) << r.out;
  const std::string shard = dir_ + "/chat-out/" + m["train"]["shards"][0].get<std::string>();
  const std::string bytes = Slurp(shard);
  ASSERT_GT(bytes.size(), 12u);
  EXPECT_EQ(bytes[8], 2) << "a masked shard is version 2";

  r = RunBtxctl({"data", "prepare", "docs.jsonl", "--out", "docs-out", "--text-field", "body", "--valid-fraction", "0"},
                {}, dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  m = json::parse(Slurp(dir_ + "/docs-out/manifest.json"));
  EXPECT_EQ(m["train"]["tokens"].get<int64_t>(), 5 + 6 + 2 * 2);  // bos + text + eos per record
  EXPECT_EQ(m["train"]["loss_tokens"], m["train"]["tokens"]);
}

TEST_F(DataPrepare, BadRecordsExitTwoNamingFileAndLine) {
  const std::string good = R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})";
  const std::pair<std::string, std::string> cases[] = {
      {"{not json", "bad.jsonl:3: invalid JSON"},
      {R"({"prompt": "x"})", "bad.jsonl:3: missing field \"messages\""},
      {R"({"messages": [{"role": "robot", "content": "x"}]})", "bad.jsonl:3: messages[0].role: got \"robot\""},
      {R"({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]})",
       "bad.jsonl:3: messages[0].content: got array"},
      {R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})",
       "bad.jsonl:3: the conversation has no assistant message"},
  };
  for (const auto& [bad, want] : cases) {
    WriteFile(dir_ + "/bad.jsonl", good + "\n\n" + bad + "\n" + good + "\n");
    fs::remove_all(dir_ + "/out");
    auto r = RunBtxctl({"data", "prepare", dir_ + "/bad.jsonl", "--out", dir_ + "/out", "--format", "chat"});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_NE(r.err.find(dir_ + "/" + want), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(fs::exists(dir_ + "/out"));
  }
  WriteFile(dir_ + "/docs.jsonl", "{\"text\": \"ok\"}\n{\"text\": 42}\n");
  auto r = RunBtxctl({"data", "prepare", dir_ + "/docs.jsonl", "--out", dir_ + "/out"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find(dir_ + "/docs.jsonl:2: field \"text\" is number; expected a string"), std::string::npos) << r.err;
  r = RunBtxctl({"data", "prepare", dir_ + "/docs.jsonl", "--out", dir_ + "/out", "--format", "yaml"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--format yaml: expected text, jsonl or chat"), std::string::npos) << r.err;
}

TEST(DataPrepareBar, FitsTheWidthAndShowsTheShare) {
  EXPECT_EQ(DataPrepareBar(5'000'000, 10'000'000, 80),
            "tokenizing [####################....................]  50% 5.0/10.0 MB");
  EXPECT_LE(DataPrepareBar(1, 3, 30).size(), 29u);
  EXPECT_NE(DataPrepareBar(0, 0, 80).find("100%"), std::string::npos);
}

}  // namespace
}  // namespace btx::cli
