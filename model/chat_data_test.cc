// Chat and JSONL data: documents and their loss masks, token shards with masks (and old shards), the sampler's
// ignored targets, and a router finetune whose loss counts assistant tokens only.
#include <sys/wait.h>

#include <cstring>
#include <set>
#include <fstream>
#include <nlohmann/json.hpp>

#include "btx/contract/files.h"
#include "btx/model/data.h"
#include "btx/model/hf_io.h"
#include "btx/model/token_shard.h"
#include "btx/model/tokenizer.h"
#include "test_util.h"

namespace btx::model {
namespace {
using nlohmann::json;
using testing::TempDir;

std::string Bytes(const std::vector<int32_t>& ids, const std::vector<uint8_t>& loss, uint8_t want) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i)
    if (loss[i] == want && ids[i] < 256) s.push_back(static_cast<char>(ids[i]));
  return s;
}

TEST(ChatData, ByteTokenizerConversationCarriesLossOnAssistantTurnsOnly) {
  auto tok = MakeByteTokenizer();
  auto enc = DocumentEncoder::Create(*tok);
  ASSERT_TRUE(enc.ok());
  auto doc = enc->Chat(nlohmann::ordered_json::parse(R"([{"role": "system", "content": "Be kind."},
      {"role": "user", "content": "Grüß dich"}, {"role": "assistant", "content": "Hallo! 🐈"},
      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Tschüss"}])"));
  ASSERT_TRUE(doc.ok()) << doc.status().message();
  ASSERT_EQ(doc->ids.size(), doc->loss.size());
  EXPECT_EQ(doc->ids.front(), kByteBos);
  EXPECT_EQ(doc->ids.back(), kByteEos);
  EXPECT_EQ(doc->loss.front(), 0);
  // ChatML (the byte tokenizer has no template): each answer and its <|im_end|> carry the loss.
  EXPECT_EQ(Bytes(doc->ids, doc->loss, 1), "Hallo! 🐈<|im_end|>Tschüss<|im_end|>");
  EXPECT_EQ(Bytes(doc->ids, doc->loss, 0),
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nGrüß dich<|im_end|>\n<|im_start|>assistant\n\n"
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n\n");
}

TEST(ChatData, BadRecordsNameFileLineAndWhatIsWrong) {
  TempDir dir;
  auto tok = MakeByteTokenizer();
  auto enc = DocumentEncoder::Create(*tok);
  ASSERT_TRUE(enc.ok());
  const std::string good = R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})";
  const std::pair<std::string, std::string> cases[] = {
      {"{\"messages\": [", ":2: invalid JSON"},
      {"[1, 2]", ":2: expected a JSON object, got array"},
      {R"({"text": "x"})", ":2: missing field \"messages\""},
      {R"({"messages": [{"role": "bot", "content": "x"}]})", ":2: messages[0].role: got \"bot\"; expected \"system\", \"user\" or \"assistant\""},
      {R"({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]})", ":2: messages[0].content: got number 5; expected a string"},
      {R"({"messages": [{"role": "user", "content": "only a question"}]})", ":2: the conversation has no assistant message"},
      {R"({"messages": [{"role": "user", "content": "q", "name": "x"}]})", ":2: messages[0]: unknown key \"name\""},
      {R"({"messages": []})", ":2: \"messages\" must be a non-empty list"},
  };
  for (const auto& [bad, want] : cases) {
    const std::string f = dir / "chat.jsonl";
    testing::WriteText(f, good + "\n" + bad + "\n" + good + "\n");
    int docs = 0;
    Status st = ForEachDocument(f, {DataFormat::kChat, "text"}, *enc, [&](EncodedDocument&&) { ++docs; return Status::Ok(); });
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find(f + want), std::string::npos) << st.message();
    EXPECT_EQ(docs, 1) << bad;  // the records before the bad one were read
  }
  // JSONL with another text field; blank lines are skipped; the auto format tells chat from text records.
  testing::WriteText(dir / "docs.jsonl", "{\"body\": \"ab\"}\n\n{\"body\": \"c\", \"id\": 2}\n");
  std::vector<std::vector<int32_t>> seen;
  ASSERT_TRUE(ForEachDocument(dir / "docs.jsonl", {DataFormat::kAuto, "body"}, *enc, [&](EncodedDocument&& d) {
                seen.push_back(d.ids);
                EXPECT_TRUE(d.loss.empty());
                return Status::Ok();
              }).ok());
  EXPECT_EQ(seen, (std::vector<std::vector<int32_t>>{{kByteBos, 'a', 'b', kByteEos}, {kByteBos, 'c', kByteEos}}));
  Status st = ForEachDocument(dir / "docs.jsonl", {DataFormat::kJsonl, "text"}, *enc, [](EncodedDocument&&) { return Status::Ok(); });
  EXPECT_NE(st.message().find("docs.jsonl:1: missing field \"text\""), std::string::npos) << st.message();
  testing::WriteText(dir / "chat.jsonl", good + "\n");
  EXPECT_EQ(*ResolveFormat(dir / "chat.jsonl", {}), DataFormat::kChat);
  EXPECT_EQ(*ResolveFormat(dir / "docs.jsonl", {}), DataFormat::kJsonl);
}

TEST(ChatData, ShardsKeepTheMaskAndVersionOneShardsStillLoad) {
  TempDir dir;
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const std::vector<uint8_t> loss = {0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1};
  ASSERT_TRUE(WriteTokenShard(dir / "m.btxtok", ids, 300, &loss).ok());
  auto m = ReadTokenShardWithMask(dir / "m.btxtok");
  ASSERT_TRUE(m.ok()) << m.status().message();
  EXPECT_EQ(m->tokens, ids);
  EXPECT_EQ(m->loss, loss);
  EXPECT_EQ(*ReadTokenShard(dir / "m.btxtok"), ids);

  // A version-1 shard as earlier releases wrote it, byte for byte: header, u16 ids, nothing else.
  std::string v1(64 + 2 * 3, '\0');
  std::memcpy(v1.data(), kShardMagic, 8);
  auto put = [&](size_t off, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) v1[off + i] = static_cast<char>((v >> (8 * i)) & 0xff);
  };
  put(8, 1, 4);
  put(12, 2, 4);
  put(16, 3, 8);
  put(24, 300, 8);
  put(56, Fnv1a64(v1.data(), 56), 8);
  put(64, 7, 2);
  put(66, 8, 2);
  put(68, 299, 2);
  testing::WriteText(dir / "old.btxtok", v1);
  auto old = ReadTokenShardWithMask(dir / "old.btxtok");
  ASSERT_TRUE(old.ok()) << old.status().message();
  EXPECT_EQ(old->tokens, (std::vector<int32_t>{7, 8, 299}));
  EXPECT_TRUE(old->loss.empty());
  // Unmasked shards are still written as version 1.
  ASSERT_TRUE(WriteTokenShard(dir / "new.btxtok", {7, 8, 299}, 300).ok());
  EXPECT_EQ(*ReadFile(dir / "new.btxtok"), v1);

  // A masked shard cut short is refused.
  std::string cut = *ReadFile(dir / "m.btxtok");
  cut.pop_back();
  testing::WriteText(dir / "cut.btxtok", cut);
  auto bad = ReadTokenShardWithMask(dir / "cut.btxtok");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("loss mask"), std::string::npos) << bad.status().message();

  // LoadData keeps shard masks, and marks text documents after them as counted.
  testing::WriteText(dir / "z.txt", "xy");
  auto tok = MakeByteTokenizer();
  auto data = LoadData({dir / "m.btxtok", dir / "z.txt"}, *tok, {});
  ASSERT_TRUE(data.ok()) << data.status().message();
  ASSERT_TRUE(data->loss);
  EXPECT_EQ(data->tokens->size(), ids.size() + 4);
  std::vector<uint8_t> want = loss;
  want.insert(want.end(), 4, 1);
  EXPECT_EQ(*data->loss, want);
}

TEST(ChatData, SamplerTargetsIgnoreUncountedTokensAndSkipWindowsWithoutAny) {
  auto tokens = std::make_shared<std::vector<int32_t>>();
  auto loss = std::make_shared<std::vector<uint8_t>>();
  for (int i = 0; i < 13; ++i) {
    tokens->push_back(100 + i);
    // Window 0 = tokens 0..4 (targets 1..4) has no counted target; window 1 targets 5..8; window 2 targets 9..12.
    loss->push_back(i == 6 || i == 7 || i == 12 ? 1 : 0);
  }
  auto s = WindowSampler::Create(tokens, 4, 3, loss);
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->num_windows(), 2);
  std::set<int64_t> firsts;
  for (uint64_t i = 0; i < 4; ++i) {
    int64_t dst[5], tgt[4];
    s->Fill(i, dst, tgt);
    firsts.insert(dst[0]);
    for (int k = 0; k < 4; ++k) {
      const int32_t pos = static_cast<int32_t>(dst[k + 1] - 100);
      EXPECT_EQ(tgt[k], (*loss)[pos] ? dst[k + 1] : kIgnoreIndex) << "sample " << i << " position " << k;
    }
  }
  EXPECT_EQ(firsts, (std::set<int64_t>{104, 108}));
  auto none = std::make_shared<std::vector<uint8_t>>(13, 0);
  auto empty = WindowSampler::Create(tokens, 4, 3, none);
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("no window"), std::string::npos);

  // Data parallel: a rank's share is its rows' share of the counted targets, not of the rows.
  at::Tensor t = at::tensor({1, -100, -100, -100, 2, 3, 4, -100}, at::kLong).reshape({2, 4});
  EXPECT_DOUBLE_EQ(CountedShare(t, 0, 1), 0.25);
  EXPECT_DOUBLE_EQ(CountedShare(t, 1, 2), 0.75);
  EXPECT_DOUBLE_EQ(CountedShare(at::ones({4, 3}, at::kLong), 1, 2), 0.25);
}

// --- a router finetune on chat data, through btx-train ------------------------------------------------------

// Runs one job; its exit code, and the metrics of its "done" event (fd 3 is the protocol's progress fd).
int RunTrain(const std::string& dir, const std::string& name, const json& job, std::string* log, json* metrics = nullptr) {
  testing::WriteText(dir + "/" + name + ".json", job.dump());
  const std::string cmd = "cd '" + dir + "' && '" BTX_TRAIN_PATH "' --job " + name + ".json 3>" + name + ".events >" +
                          name + ".log 2>&1";
  const int st = std::system(cmd.c_str());
  *log = *ReadFile(dir + "/" + name + ".log");
  std::ifstream in(dir + "/" + name + ".events");
  for (std::string line; std::getline(in, line);) {
    const json e = json::parse(line, nullptr, false);
    if (metrics && e.is_object() && e.value("event", "") == "done") *metrics = e["metrics"];
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

json Job(const TempDir& dir, const std::string& kind, const std::string& out, const json& spec) {
  return {{"job_id", "t-" + out}, {"attempt", 1}, {"pipeline", "chat"}, {"kind", kind}, {"name", out},
          {"output_dir", dir / out}, {"threads", 2}, {"device", "cpu"}, {"spec", spec}};
}

// The first layer's router weights of a model dir.
at::Tensor HfTensorSourceLoad(const std::string& dir) {
  return *HfTensorSource::Open(dir)->Load("model.layers.0.block_sparse_moe.gate.weight");
}

// Conversations of exactly kSeq bytes each (byte tokenizer, bos/eos included), so every training window is one
// conversation: a question, an answer, then a user turn of noise. The answer's predictions see only what precedes
// them, so noise the loss ignores cannot change training at all.
constexpr int kSeq = 128;
std::string ChatFile(uint32_t noise_seed, bool noise_before_answer) {
  std::string out;
  uint32_t x = noise_seed * 2654435761u + 1;
  for (int c = 0; c < 24; ++c) {
    const std::string q = "What is " + std::to_string(c) + "+" + std::to_string(c % 5) + "?";
    const std::string a = std::to_string(c + c % 5) + ".";
    const size_t fixed = std::string("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n"
                                     "<|im_end|>\n").size() + q.size() + a.size() + 2;
    std::string noise;
    for (size_t k = fixed; k < kSeq; ++k) {
      x = x * 1664525u + 1013904223u;
      noise.push_back(static_cast<char>('a' + (x >> 24) % 26));
    }
    json m = noise_before_answer
                 ? json::array({{{"role", "user"}, {"content", q + noise}}, {{"role", "assistant"}, {"content", a}},
                                {{"role", "user"}, {"content", ""}}})
                 : json::array({{{"role", "user"}, {"content", q}}, {{"role", "assistant"}, {"content", a}},
                                {{"role", "user"}, {"content", noise}}});
    out += json{{"messages", m}}.dump() + "\n";
  }
  return out;
}

TEST(ChatData, RouterFinetuneCountsOnlyAssistantTokens) {
  TempDir dir;
  testing::WriteText(dir / "text.txt", testing::SampleText(60, 3));
  std::string log;
  ASSERT_EQ(RunTrain(dir.path(), "seed",
                     Job(dir, "pretrain", "seed",
                         {{"init", {{"preset", "tiny"}, {"hidden_size", 32}, {"intermediate_size", 48}}},
                          {"tokenizer", "byte"}, {"data", {{"train", dir / "text.txt"}}},
                          {"train", {{"batch_tokens", 256}, {"seq_len", kSeq}, {"warmup", 0}, {"checkpoint_every", 0}}},
                          {"steps", 2}}),
                     &log),
            0)
      << log;
  ASSERT_EQ(RunTrain(dir.path(), "moe",
                     Job(dir, "merge", "moe", {{"method", "upcycle"}, {"seed", dir / "seed"}, {"num_experts", 2}, {"top_k", 1}}),
                     &log),
            0)
      << log;
  auto finetune = [&](const std::string& name, const std::string& chat) {
    testing::WriteText(dir / (name + ".jsonl"), chat);
    std::string out;
    json metrics;
    const int code = RunTrain(
        dir.path(), name,
        Job(dir, "finetune", name,
            {{"model", dir / "moe"},
             {"mixture", {{{"name", "chat"}, {"train", dir / (name + ".jsonl")}, {"valid", dir / (name + ".jsonl")},
                           {"format", "chat"}}}},
             {"train", {{"batch_tokens", 2 * kSeq}, {"seq_len", kSeq}, {"warmup", 0}, {"lr", 1e-2},
                        {"checkpoint_every", 0}, {"valid_tokens", 8 * kSeq}}},
             {"steps", 3}, {"freeze", {"all_but_router"}}, {"load_balance", 0}, {"z_loss", 0}}),
        &out, &metrics);
    EXPECT_EQ(code, 0) << out;
    return metrics;
  };
  const json a = finetune("noise-a", ChatFile(1, false));
  const json b = finetune("noise-b", ChatFile(2, false));
  ASSERT_TRUE(a.contains("train_loss") && a.contains("valid_loss")) << a.dump();
  ASSERT_TRUE(b.contains("train_loss") && b.contains("valid_loss")) << b.dump();
  // Noise after the answers: the counted tokens never see it, so training and validation are the same.
  EXPECT_NEAR(a["train_loss"].get<double>(), b["train_loss"].get<double>(), 1e-6);
  EXPECT_NEAR(a["valid_loss"].get<double>(), b["valid_loss"].get<double>(), 1e-6);
  auto ra = HfTensorSourceLoad(dir / "noise-a"), rb = HfTensorSourceLoad(dir / "noise-b");
  EXPECT_TRUE(at::allclose(ra, rb, 0, 1e-6)) << (ra - rb).abs().max().item<double>();
  // The check can fail: the same noise before the answers (which see it) changes the loss.
  const json c = finetune("noise-c", ChatFile(1, true));
  const json d = finetune("noise-d", ChatFile(2, true));
  EXPECT_GT(std::abs(c["valid_loss"].get<double>() - d["valid_loss"].get<double>()), 1e-4);
}

}  // namespace
}  // namespace btx::model
