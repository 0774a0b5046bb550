#include "btx/contract/specs.h"

#include <gtest/gtest.h>

namespace btx::contract {
namespace {
using json = nlohmann::json;

FieldErrors Errors(const std::function<void(Reader&)>& parse, bool refs = false) {
  FieldErrors errors;
  Reader r(errors, refs);
  parse(r);
  return errors;
}

TEST(ParseTrain, DefaultsAreTheDocumentedOnes) {
  FieldErrors errors;
  Reader r(errors);
  const TrainConfig c = ParseTrain(r, json::object(), "train");
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(c.batch_tokens, 8192);
  EXPECT_EQ(c.seq_len, 256);
  EXPECT_DOUBLE_EQ(c.lr, 3e-4);
  EXPECT_EQ(c.schedule, "cosine");
  EXPECT_EQ(c.checkpoint_every, 50);
  EXPECT_EQ(c.threads, 0);
  // What ToJson writes reads back as the same configuration.
  const TrainConfig again = ParseTrain(r, ToJson(c), "train");
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(ToJson(again), ToJson(c));
}

TEST(ParseTrain, ZeroLearningRateAndUnknownKeysAreRefusedWithTheirPath) {
  auto errors = Errors([](Reader& r) { ParseTrain(r, json{{"lr", 0}, {"learning_rate", 1e-3}}, "spec.train"); });
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_EQ(errors[0].path, "spec.train.learning_rate");
  EXPECT_EQ(errors[1].path, "spec.train.lr");
  errors = Errors([](Reader& r) { ParseTrain(r, json{{"batch_tokens", 1000}, {"seq_len", 256}}, "train"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "train.batch_tokens");
  errors = Errors([](Reader& r) { ParseTrain(r, json{{"batch_tokens", 512}, {"seq_len", 256}, {"grad_accum", 4}}, "train"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "train.grad_accum");
}

TEST(ParseTrain, MemoryOptionsHaveDefaultsAndRanges) {
  FieldErrors errors;
  Reader r(errors);
  TrainConfig c = ParseTrain(r, json::object(), "train");
  EXPECT_EQ(c.attention, "auto");
  EXPECT_FALSE(c.activation_checkpointing);
  EXPECT_EQ(c.loss_chunk_tokens, 0);
  c = ParseTrain(r, json{{"attention", "chunked"}, {"activation_checkpointing", true}, {"loss_chunk_tokens", 4096}},
                 "train");
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(c.attention, "chunked");
  EXPECT_TRUE(c.activation_checkpointing);
  EXPECT_EQ(c.loss_chunk_tokens, 4096);
  EXPECT_EQ(ToJson(ParseTrain(r, ToJson(c), "train")), ToJson(c));
  auto bad = Errors([](Reader& r) {
    ParseTrain(r, json{{"attention", "flash"}, {"activation_checkpointing", 1}, {"loss_chunk_tokens", -1}}, "spec.train");
  });
  ASSERT_EQ(bad.size(), 3u);
  EXPECT_EQ(bad[0].path, "spec.train.attention");
  EXPECT_EQ(bad[1].path, "spec.train.activation_checkpointing");
  EXPECT_EQ(bad[2].path, "spec.train.loss_chunk_tokens");
}

TEST(ParseTrain, ZeroAndPrecisionHaveDefaultsAndRanges) {
  FieldErrors errors;
  Reader r(errors);
  TrainConfig c = ParseTrain(r, json::object(), "train");
  EXPECT_EQ(c.zero, 1);
  EXPECT_EQ(c.precision, "fp32");
  c = ParseTrain(r, json{{"zero", 0}, {"precision", "bf16"}}, "train");
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(c.zero, 0);
  EXPECT_EQ(c.precision, "bf16");
  EXPECT_EQ(ToJson(ParseTrain(r, ToJson(c), "train")), ToJson(c));
  c = ParseTrain(r, json{{"zero", 3}}, "train");
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(c.zero, 3);
  EXPECT_EQ(ToJson(ParseTrain(r, ToJson(c), "train")), ToJson(c));
  auto bad = Errors([](Reader& r) { ParseTrain(r, json{{"zero", 2}, {"precision", "fp16"}}, "spec.train"); });
  ASSERT_EQ(bad.size(), 2u);
  EXPECT_EQ(bad[0].path, "spec.train.zero");
  // The message names the allowed values and that 2 does not exist.
  EXPECT_NE(bad[0].message.find("0 (replicated), 1 (ZeRO-1"), std::string::npos) << bad[0].message;
  EXPECT_NE(bad[0].message.find("3 (ZeRO-3"), std::string::npos) << bad[0].message;
  EXPECT_NE(bad[0].message.find("2 is not implemented"), std::string::npos) << bad[0].message;
  EXPECT_EQ(bad[1].path, "spec.train.precision");
  for (const json& z : {json(-1), json(4), json("3"), json(1.5)}) {
    auto e = Errors([&](Reader& r) { ParseTrain(r, json{{"zero", z}}, "spec.train"); });
    ASSERT_EQ(e.size(), 1u) << z;
    EXPECT_EQ(e[0].path, "spec.train.zero") << z;
  }
}

TEST(ParseModelInit, HuggingFaceNamesOverrideThePresetAndOtherNamesAreRefused) {
  FieldErrors errors;
  Reader r(errors);
  const ModelInit m = ParseModelInit(r, json{{"preset", "tiny"}, {"num_hidden_layers", 4}, {"hidden_size", 96}}, "seed.init");
  EXPECT_TRUE(errors.empty()) << Describe(errors);
  EXPECT_EQ(m.num_hidden_layers, 4);
  EXPECT_EQ(m.hidden_size, 96);
  EXPECT_EQ(m.num_attention_heads, 4);  // the preset's

  auto bad = Errors([](Reader& r) {
    ParseModelInit(r, json{{"preset", "tiny"}, {"num_layers", 4}, {"hidden_size", 96}, {"num_heads", 4}}, "seed.init");
  });
  ASSERT_EQ(bad.size(), 2u);
  EXPECT_EQ(bad[0].path, "seed.init.num_heads");
  EXPECT_NE(bad[0].message.find("num_attention_heads"), std::string::npos);
  EXPECT_EQ(bad[1].path, "seed.init.num_layers");
  EXPECT_NE(bad[1].message.find("did you mean num_hidden_layers?"), std::string::npos);
}

TEST(ParseModelInit, ShapesThatCannotBuildAModelAreRefused) {
  auto errors = Errors([](Reader& r) { ParseModelInit(r, json{{"hidden_size", 96}, {"num_attention_heads", 5}}, "init"); });
  ASSERT_EQ(errors.size(), 1u);  // 96 % 5; KV heads default to the heads (the HF rule), which divides
  EXPECT_EQ(errors[0].path, "init.num_attention_heads");
  errors = Errors([](Reader& r) { ParseModelInit(r, json{{"num_key_value_heads", 3}}, "init"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "init.num_key_value_heads");
  errors = Errors([](Reader& r) { ParseModelInit(r, json{{"preset", "huge"}}, "init"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "init.preset");
}

TEST(ParseTokenizer, TakesTheDocumentedFormsAndTrainsOnlyWhereAllowed) {
  FieldErrors errors;
  Reader r(errors);
  EXPECT_EQ(ParseTokenizer(r, json("byte"), "tokenizer", false).kind, TokenizerSpec::Kind::kByte);
  EXPECT_EQ(ParseTokenizer(r, json("/m/sp.model"), "tokenizer", false).path, "/m/sp.model");
  EXPECT_EQ(ParseTokenizer(r, json{{"sentencepiece", "/m/sp.model"}}, "tokenizer", false).path, "/m/sp.model");
  EXPECT_EQ(ParseTokenizer(r, json{{"type", "sentencepiece"}, {"vocab_size", 500}}, "tokenizer", true).vocab_size, 500);
  EXPECT_TRUE(errors.empty()) << Describe(errors);
  auto bad = Errors([](Reader& r) { ParseTokenizer(r, json{{"type", "sentencepiece"}, {"vocab_size", 500}}, "tokenizer", false); });
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_NE(bad[0].message.find("only a seed trained from scratch"), std::string::npos);
  bad = Errors([](Reader& r) { ParseTokenizer(r, json{{"sentencepiece", "/a"}, {"extra", 1}}, "tokenizer", true); });
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_EQ(bad[0].path, "tokenizer.extra");
}

TEST(ParseMerge, MethodRulesAreCheckedAtParseTime) {
  auto errors = Errors([](Reader& r) { ParseMerge(r, json{{"method", "upcycle"}}, "spec"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "spec.seed");
  errors = Errors([](Reader& r) {
    ParseMerge(r, json{{"experts", {{{"name", "a"}, {"model", "/a"}}, {{"name", "a"}, {"model", "/b"}}}}}, "spec");
  });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "spec.experts[1].name");
  errors = Errors([](Reader& r) {
    ParseMerge(r, json{{"experts", {{{"name", "a"}, {"model", "/a"}}}}, {"router_init", "hidden"}, {"seed", "/s"}}, "spec");
  });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "spec.data");
  errors = Errors([](Reader& r) {
    ParseMerge(r, json{{"experts", {{{"name", "a"}, {"model", "/a"}}}}, {"top_k", 2}}, "spec");
  });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "spec.top_k");
}

TEST(ParseFinetune, MixtureAndFreezeAreChecked) {
  FieldErrors errors;
  Reader r(errors, true);
  const FinetuneSpec s = ParseFinetune(
      r, json{{"model", {{"$artifact", "merge"}}}, {"steps", 5}, {"mixture", {{{"name", "a"}, {"train", "/t"}}}}}, "spec");
  EXPECT_TRUE(errors.empty()) << Describe(errors);
  EXPECT_FALSE(s.top_k.has_value());
  EXPECT_DOUBLE_EQ(s.mixture[0].weight, 1.0);
  auto bad = Errors([](Reader& r) {
    ParseFinetune(r, json{{"model", "/m"}, {"steps", 5}, {"freeze", {"routers"}}, {"mixture", {{{"name", "a"}, {"weight", 0}, {"train", "/t"}}}}},
                  "spec");
  });
  ASSERT_EQ(bad.size(), 2u);
  EXPECT_EQ(bad[0].path, "spec.freeze[0]");
  EXPECT_EQ(bad[1].path, "spec.mixture[0].weight");
}

TEST(ParseData, FormatAndTextFieldAreCheckedAndRoundTrip) {
  FieldErrors errors;
  Reader r(errors);
  DataSpec d = ParseData(r, json{{"train", "a.jsonl"}, {"format", "jsonl"}, {"text_field", "body"}}, "data");
  EXPECT_TRUE(errors.empty()) << Describe(errors);
  EXPECT_EQ(d.format, "jsonl");
  EXPECT_EQ(d.text_field, "body");
  EXPECT_EQ(ToJson(d), (json{{"train", {"a.jsonl"}}, {"format", "jsonl"}, {"text_field", "body"}}));
  // Unset: inferred per file, and nothing extra written back.
  d = ParseData(r, json{{"train", "a.txt"}}, "data");
  EXPECT_EQ(d.format, "");
  EXPECT_EQ(d.text_field, "text");
  EXPECT_EQ(ToJson(d), (json{{"train", {"a.txt"}}}));

  errors = Errors([](Reader& r) { ParseData(r, json{{"train", "a"}, {"format", "parquet"}}, "experts[0].data"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "experts[0].data.format");
  EXPECT_NE(errors[0].message.find("chat"), std::string::npos) << errors[0].message;
  errors = Errors([](Reader& r) { ParseData(r, json{{"train", "a"}, {"format", "chat"}, {"text_field", "x"}}, "data"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "data.text_field");
  EXPECT_NE(errors[0].message.find("only jsonl"), std::string::npos) << errors[0].message;
  errors = Errors([](Reader& r) { ParseData(r, json{{"train", "a"}, {"text_field", 3}}, "data"); });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "data.text_field");

  // A finetune mixture entry takes them too.
  errors.clear();
  FinetuneSpec f = ParseFinetune(
      r, json{{"model", "m"}, {"steps", 1}, {"mixture", {{{"name", "c"}, {"train", "c.jsonl"}, {"format", "chat"}}}}},
      "spec");
  EXPECT_TRUE(errors.empty()) << Describe(errors);
  ASSERT_EQ(f.mixture.size(), 1u);
  EXPECT_EQ(f.mixture[0].data.format, "chat");
}

TEST(ParseEval, ModelsNeedExactlyOneOfModelAndEnsemble) {
  auto errors = Errors([](Reader& r) {
    ParseEval(r, json{{"models", {{{"name", "x"}, {"model", "/m"}, {"ensemble", {"/a"}}}}}, {"domains", {{{"name", "d"}, {"valid", "/v"}}}}},
              "spec");
  });
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].path, "spec.models[0]");
}

}  // namespace
}  // namespace btx::contract
