// HfTokenizer on small hand-made tokenizer.json files. Identity with the Python library on real-sized tokenizers and
// a megabyte of text is tests/python/tokenizers_hf.py (ctest label "interop").
#include "hf_tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

namespace btx::model {
namespace {

using json = nlohmann::json;

// GPT-2's bytes_to_unicode, to write vocabularies in byte-level form.
std::string ByteLevel(std::string_view raw) {
  std::string out;
  for (unsigned char b : raw) {
    uint32_t cp = b;
    const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    if (!direct) {
      uint32_t n = 0;
      for (int x = 0; x < b; ++x) {
        if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE))) ++n;
      }
      cp = 256 + n;
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  return out;
}

json ByteLevelPre(bool add_prefix_space = false, bool use_regex = true) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"trim_offsets", true},
          {"use_regex", use_regex}};
}
json SplitPre(const std::string& regex, const std::string& behavior, bool invert = false) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", behavior}, {"invert", invert}};
}
json Seq(std::vector<json> steps) { return {{"type", "Sequence"}, {"pretokenizers", steps}}; }
json Added(const std::string& content, bool special = true, bool lstrip = false, bool rstrip = false,
           bool single_word = false, bool normalized = false) {
  return {{"id", 0},          {"content", content},       {"single_word", single_word}, {"lstrip", lstrip},
          {"rstrip", rstrip}, {"normalized", normalized}, {"special", special}};
}

// Vocabulary: byte b has id b; merges (given raw) and extra words get 256, 257... in order.
struct Spec {
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<std::string> extra_words;
  json pre_tokenizer = ByteLevelPre();
  json normalizer = nullptr;
  json added = json::array();
  bool ignore_merges = false;
  bool string_merges = false;
  json model_overrides = json::object();
  json top_overrides = json::object();
};

json MakeJson(const Spec& s) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteLevel(std::string(1, static_cast<char>(b)))] = b;
  int next = 256;
  auto add = [&](const std::string& raw) {
    const std::string bl = ByteLevel(raw);
    if (!vocab.contains(bl)) vocab[bl] = next++;
  };
  json merges = json::array();
  for (const auto& [a, b] : s.merges) {
    add(a + b);
    if (s.string_merges) {
      merges.push_back(ByteLevel(a) + " " + ByteLevel(b));
    } else {
      merges.push_back({ByteLevel(a), ByteLevel(b)});
    }
  }
  for (const auto& w : s.extra_words) add(w);
  json model = {{"type", "BPE"},        {"dropout", nullptr},          {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                {"byte_fallback", false}, {"ignore_merges", s.ignore_merges}, {"vocab", vocab}, {"merges", merges}};
  model.update(s.model_overrides);
  json added = s.added;
  for (auto& a : added) a["id"] = next++;
  json root = {{"version", "1.0"},
               {"truncation", nullptr},
               {"padding", nullptr},
               {"added_tokens", added},
               {"normalizer", s.normalizer},
               {"pre_tokenizer", s.pre_tokenizer},
               {"post_processor", nullptr},
               {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
               {"model", model}};
  root.update(s.top_overrides);
  return root;
}

HfTokenizer Make(const Spec& s) {
  auto t = HfTokenizer::FromJson(MakeJson(s).dump());
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return std::move(t).value();
}

// Ids of tokens given raw (for vocab entries) or verbatim (for added tokens, prefixed with '@').
std::vector<int32_t> Ids(const HfTokenizer& t, const std::vector<std::string>& toks) {
  std::vector<int32_t> ids;
  for (const auto& s : toks) {
    auto id = s.rfind('@', 0) == 0 && s.size() > 1 ? t.TokenToId(s.substr(1)) : t.TokenToId(ByteLevel(s));
    EXPECT_TRUE(id.has_value()) << s;
    ids.push_back(id.value_or(-1));
  }
  return ids;
}
std::vector<std::string> Bytes(std::string_view s) {
  std::vector<std::string> out;
  for (char c : s) out.emplace_back(1, c);
  return out;
}

TEST(HfTokenizerTest, ReplaceInvalidUtf8LikePython) {
  const std::string r = "\xEF\xBF\xBD";
  // Expected values are Python's bytes.decode("utf-8", "replace").
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\xff", r},
      {"\xc3", r},
      {"a\x80" "b", "a" + r + "b"},
      {"\xe0\x80\x80", r + r + r},
      {"\xed\xa0\x80", r + r + r},
      {"\xf0\x9f\x98", r},
      {"\xf0\x9f\x98" "A", r + "A"},
      {"\xe2\x28\xa1", r + "(" + r},
      {"\xf4\x90\x80\x80", r + r + r + r},
      {"\xc0\x80", r + r},
      {"\xf8\x88\x80\x80\x80", r + r + r + r + r},
      {"\xe0\xa0", r},
      {"\xf0\x90\x80\xc3\xa9", r + "\xc3\xa9"},
      {"ok \xe2\x82\xac", "ok \xe2\x82\xac"},
  };
  for (const auto& [in, want] : cases) EXPECT_EQ(ReplaceInvalidUtf8(in), want) << json(want).dump();
}

TEST(HfTokenizerTest, EmptyAndWhitespace) {
  Spec s;
  s.merges = {{" ", " "}, {"  ", " "}};
  s.pre_tokenizer = ByteLevelPre(true, true);
  auto t = Make(s);
  EXPECT_TRUE(t.Encode("").empty());  // no prefix space for nothing
  // GPT-2 regex: "\s+(?!\S)" leaves the last space to the word; add_prefix_space gives a leading " " only when absent.
  EXPECT_EQ(t.Encode("   "), Ids(t, {"   "}));
  EXPECT_EQ(t.Encode("a   b"), Ids(t, {" ", "a", "  ", " ", "b"}));
  EXPECT_EQ(t.Encode("\t\n "), Ids(t, {" ", "\t", "\n", " "}));
  EXPECT_EQ(t.Decode(t.Encode(" \t\n  x ")), " \t\n  x ");
  EXPECT_EQ(t.Decode(t.Encode("x")), " x");
}

TEST(HfTokenizerTest, NulBytesAndNullDecoder) {
  Spec s;
  s.merges = {{"a", "b"}};
  auto t = Make(s);
  const std::string text("ab\0b\0", 5);
  EXPECT_EQ(t.Encode(text), Ids(t, {"ab", std::string(1, '\0'), "b", std::string(1, '\0')}));
  EXPECT_EQ(t.Decode(t.Encode(text)), text);
  json j = MakeJson(s);
  j["decoder"] = nullptr;  // tokenizers then joins the tokens, as they are, with spaces
  auto plain = HfTokenizer::FromJson(j.dump());
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_EQ(plain->Decode(plain->Encode("ab b")), "ab \xc4\xa0 b");  // "ab", "Ġ", "b"
}

TEST(HfTokenizerTest, MergeOrderAndTies) {
  Spec s;
  s.pre_tokenizer = ByteLevelPre(false, false);
  s.merges = {{"b", "c"}, {"a", "b"}, {"a", "a"}};
  auto t = Make(s);
  EXPECT_EQ(t.Encode("abc"), Ids(t, {"a", "bc"}));  // lower rank first
  EXPECT_EQ(t.Encode("aaa"), Ids(t, {"aa", "a"}));  // equal ranks: leftmost first
  EXPECT_EQ(t.Encode("aaaa"), Ids(t, {"aa", "aa"}));
  Spec s2 = s;
  s2.merges = {{"a", "b"}, {"b", "c"}};
  auto t2 = Make(s2);
  EXPECT_EQ(t2.Encode("abc"), Ids(t2, {"ab", "c"}));
}

TEST(HfTokenizerTest, StringAndPairMergesAgree) {
  Spec s;
  s.merges = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {" ", "w"}};
  auto pairs = Make(s);
  s.string_merges = true;
  auto strings = Make(s);
  EXPECT_EQ(pairs.Encode("hello world"), strings.Encode("hello world"));
  EXPECT_EQ(pairs.Encode("hello world"), Ids(pairs, {"hello", " w", "o", "r", "l", "d"}));
}

TEST(HfTokenizerTest, IgnoreMerges) {
  Spec s;
  s.pre_tokenizer = ByteLevelPre(false, false);
  s.merges = {{"a", "b"}};
  s.extra_words = {"abc"};  // reachable by no merge
  auto with_merges = Make(s);
  EXPECT_EQ(with_merges.Encode("abc"), Ids(with_merges, {"ab", "c"}));
  s.ignore_merges = true;
  auto ignoring = Make(s);
  EXPECT_EQ(ignoring.Encode("abc"), Ids(ignoring, {"abc"}));
  EXPECT_EQ(ignoring.Encode("abcabc"), Ids(ignoring, {"ab", "c", "ab", "c"}));
}

TEST(HfTokenizerTest, AddedTokensAdjacentLongestFirst) {
  Spec s;
  s.added = {Added("<|s|>"), Added("<|a"), Added("<|ab|>"), Added("xyz", false)};
  s.merges = {{"<", "|"}};
  auto t = Make(s);
  EXPECT_EQ(t.Encode("x<|s|>y"), Ids(t, {"x", "@<|s|>", "y"}));
  EXPECT_EQ(t.Encode("<|s|><|s|>"), Ids(t, {"@<|s|>", "@<|s|>"}));
  EXPECT_EQ(t.Encode("<|ab|>"), Ids(t, {"@<|ab|>"}));
  EXPECT_EQ(t.Encode("<|ab"), Ids(t, {"@<|a", "b"}));
  EXPECT_EQ(t.Encode("<|"), Ids(t, {"<|"}));
  EXPECT_EQ(t.Encode("wxyzw"), Ids(t, {"w", "@xyz", "w"}));
  EXPECT_EQ(t.Encode(" <|s|> "), Ids(t, {" ", "@<|s|>", " "}));
  EXPECT_EQ(t.Decode(t.Encode("a<|s|>b<|ab|>")), "a<|s|>b<|ab|>");
  // Ids: special tokens not in the vocab follow it; TokenToId finds them verbatim.
  EXPECT_EQ(t.TokenToId("<|s|>"), 257);
  EXPECT_EQ(t.vocab_size(), 261);
  EXPECT_EQ(t.IdToToken(257), "<|s|>");
  EXPECT_EQ(t.IdToToken(5000), std::nullopt);
}

TEST(HfTokenizerTest, AddedTokenFlags) {
  Spec s;
  s.added = {Added("<l>", true, /*lstrip=*/true), Added("<r>", true, false, /*rstrip=*/true),
             Added("hi", false, false, false, /*single_word=*/true, true)};
  s.pre_tokenizer = ByteLevelPre(false, false);
  auto t = Make(s);
  EXPECT_EQ(t.Encode("a  <l>b"), Ids(t, {"a", "@<l>", "b"}));
  EXPECT_EQ(t.Encode("a<r> \t b"), Ids(t, {"a", "@<r>", "b"}));
  EXPECT_EQ(t.Encode("a\xe3\x80\x80<l>"), Ids(t, {"a", "@<l>"}));  // U+3000 is whitespace too
  EXPECT_EQ(t.Encode("hi there"), Ids(t, {"@hi", " ", "t", "h", "e", "r", "e"}));
  EXPECT_EQ(t.Encode("this"), Ids(t, {"t", "h", "i", "s"}));          // not a single word
  EXPECT_EQ(t.Encode("hi_"), Ids(t, {"h", "i", "_"}));                // '_' is a word character
  EXPECT_EQ(t.Encode("(hi)"), Ids(t, {"(", "@hi", ")"}));
  EXPECT_EQ(t.Encode("\xc3\xa9hi"), Ids(t, {"\xc3", "\xa9", "h", "i"}));  // é is alphabetic
}

TEST(HfTokenizerTest, NormalizedAddedTokensMatchAfterNfc) {
  Spec s;
  s.normalizer = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}}}};
  s.pre_tokenizer = ByteLevelPre(false, false);
  s.added = {Added("\xc3\xa9", false, false, false, false, /*normalized=*/true),  // é
             Added("o\xcc\x88", true, false, false, false, /*normalized=*/false)};  // o + U+0308, matched raw
  auto t = Make(s);
  const int32_t e_acute = *t.TokenToId("\xc3\xa9");
  EXPECT_EQ(t.Encode("e\xcc\x81"), std::vector<int32_t>{e_acute});  // e + U+0301 normalizes to é
  EXPECT_EQ(t.Encode("o\xcc\x88"), Ids(t, {"@o\xcc\x88"}));          // raw match before normalization
  EXPECT_EQ(t.Encode("\xc3\xb6"), Ids(t, {"\xc3", "\xb6"}));          // ö is not the raw token
  // NFC of the text between tokens: U+212B (Angstrom sign) becomes U+00C5.
  EXPECT_EQ(t.Encode("\xe2\x84\xab"), Ids(t, {"\xc3", "\x85"}));
}

TEST(HfTokenizerTest, SplitBehaviors) {
  // The examples of tokenizers' SplitDelimiterBehavior docs, seen through merges that cross the pieces.
  const std::string text = "the-final--countdown";
  Spec s;
  s.merges = {{"-", "-"}, {"e", "-"}, {"l", "-"}, {"-", "f"}, {"-", "c"}};
  auto run = [&](const std::string& behavior, bool invert = false) {
    s.pre_tokenizer = Seq({SplitPre("-", behavior, invert), ByteLevelPre(false, false)});
    auto t = Make(s);
    return std::make_pair(t.Encode(text), t);
  };
  {
    auto [ids, t] = run("Removed");
    EXPECT_EQ(ids, Ids(t, Bytes("thefinalcountdown")));
  }
  {
    auto [ids, t] = run("Isolated");
    EXPECT_EQ(ids, Ids(t, Bytes(text)));
  }
  {
    auto [ids, t] = run("MergedWithPrevious");
    EXPECT_EQ(ids, Ids(t, {"t", "h", "e-", "f", "i", "n", "a", "l-", "-", "c", "o", "u", "n", "t", "d", "o", "w", "n"}));
  }
  {
    auto [ids, t] = run("MergedWithNext");
    EXPECT_EQ(ids, Ids(t, {"t", "h", "e", "-f", "i", "n", "a", "l", "-", "-c", "o", "u", "n", "t", "d", "o", "w", "n"}));
  }
  {
    auto [ids, t] = run("Contiguous");
    EXPECT_EQ(ids, Ids(t, {"t", "h", "e", "-", "f", "i", "n", "a", "l", "--", "c", "o", "u", "n", "t", "d", "o", "w", "n"}));
  }
  {
    auto [ids, t] = run("Removed", /*invert=*/true);
    EXPECT_EQ(ids, Ids(t, {"-", "-", "-"}));
  }
  // A String pattern is literal text.
  s.pre_tokenizer = Seq({{{"type", "Split"}, {"pattern", {{"String", "."}}}, {"behavior", "Removed"}, {"invert", false}},
                         ByteLevelPre(false, false)});
  auto lit = Make(s);
  EXPECT_EQ(lit.Encode("a.b-c"), Ids(lit, {"a", "b", "-c"}));
}

TEST(HfTokenizerTest, DigitsAndPrefixSpacePerPiece) {
  Spec s;
  s.merges = {{"1", "2"}, {" ", "a"}};
  s.added = {Added("<s>")};
  s.pre_tokenizer = Seq({{{"type", "Digits"}, {"individual_digits", true}}, ByteLevelPre(false, true)});
  auto individual = Make(s);
  EXPECT_EQ(individual.Encode("a123"), Ids(individual, {"a", "1", "2", "3"}));
  s.pre_tokenizer = Seq({{{"type", "Digits"}, {"individual_digits", false}}, ByteLevelPre(false, true)});
  auto runs = Make(s);
  EXPECT_EQ(runs.Encode("a123"), Ids(runs, {"a", "12", "3"}));
  EXPECT_EQ(runs.Encode("\xd9\xa1\xd9\xa2"), Ids(runs, {"\xd9", "\xa1", "\xd9", "\xa2"}));  // Arabic-Indic digits
  // add_prefix_space applies to every piece between added tokens (as tokenizers does).
  s.pre_tokenizer = ByteLevelPre(true, true);
  auto prefixed = Make(s);
  EXPECT_EQ(prefixed.Encode("a<s>a"), Ids(prefixed, {" a", "@<s>", " a"}));
  EXPECT_EQ(prefixed.Encode(" a"), Ids(prefixed, {" a"}));
}

TEST(HfTokenizerTest, OnigurumaRegexMeanings) {
  Spec s;
  s.merges = {{"'", "s"}, {"a", "a"}};
  auto split = [&](const std::string& re) {
    s.pre_tokenizer = Seq({SplitPre(re, "Removed"), ByteLevelPre(false, false)});
    return Make(s);
  };
  auto ws = split("\\s");  // Oniguruma's \s includes U+0085 and U+3000, not U+200B
  EXPECT_EQ(ws.Encode("a\xc2\x85" "b\xe3\x80\x80" "c"), Ids(ws, {"a", "b", "c"}));
  EXPECT_EQ(ws.Encode("a\xe2\x80\x8b" "b"), Ids(ws, {"a", "\xe2", "\x80", "\x8b", "b"}));
  auto interval = split("a{,2}");  // {0,2}
  EXPECT_EQ(interval.Encode("aaaaab"), Ids(interval, {"b"}));
  auto hex = split("\\h+");  // a hexadecimal digit
  EXPECT_EQ(hex.Encode("xyz09afg"), Ids(hex, {"x", "y", "z", "g"}));
  // (?i) folds 'S and the long s.
  s.pre_tokenizer = Seq({SplitPre("(?i:'s)", "Isolated"), ByteLevelPre(false, false)});
  auto ci = Make(s);
  EXPECT_EQ(ci.Encode("x's"), Ids(ci, {"x", "'s"}));
  EXPECT_EQ(ci.Encode("x'S"), Ids(ci, {"x", "'", "S"}));
  EXPECT_EQ(ci.Encode("x'\xc5\xbf"), Ids(ci, {"x", "'", "\xc5", "\xbf"}));
}

TEST(HfTokenizerTest, InvalidUtf8IsRepairedFirst) {
  Spec s;
  s.merges = {{"\xef", "\xbf"}, {"\xef\xbf", "\xbd"}};
  auto t = Make(s);
  EXPECT_EQ(t.Encode("a\xff" "b"), t.Encode("a\xef\xbf\xbd" "b"));
  EXPECT_EQ(t.Encode("\xed\xa0\x80"), t.Encode("\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"));
  // Decoding a lone byte token gives U+FFFD, like from_utf8_lossy.
  EXPECT_EQ(t.Decode({0xC3}), "\xef\xbf\xbd");
  EXPECT_EQ(t.Decode({0xC3, 0xA9}), "\xc3\xa9");
  EXPECT_EQ(t.Decode({-1, 1 << 30, 'a'}), "a");  // unknown ids are skipped
}

TEST(HfTokenizerTest, UnknownTokenFused) {
  Spec s;
  s.pre_tokenizer = ByteLevelPre(false, false);
  json vocab = json::object();
  for (char c : std::string("<unk>ab")) vocab[std::string(1, c)] = static_cast<int>(vocab.size());
  vocab["<unk>"] = 100;
  json j = MakeJson(s);
  j["model"]["vocab"] = vocab;
  j["model"]["merges"] = json::array();
  j["model"]["unk_token"] = "<unk>";
  j["model"]["fuse_unk"] = true;
  auto t = HfTokenizer::FromJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->Encode("axyb"), (std::vector<int32_t>{*t->TokenToId("a"), 100, *t->TokenToId("b")}));
  j["model"]["fuse_unk"] = false;
  auto unfused = HfTokenizer::FromJson(j.dump());
  ASSERT_TRUE(unfused.ok());
  EXPECT_EQ(unfused->Encode("xya"), (std::vector<int32_t>{100, 100, *t->TokenToId("a")}));
  j["model"]["unk_token"] = nullptr;  // tokenizers then drops unknown characters
  auto dropping = HfTokenizer::FromJson(j.dump());
  ASSERT_TRUE(dropping.ok());
  EXPECT_EQ(dropping->Encode("xay"), std::vector<int32_t>{*t->TokenToId("a")});
}

TEST(HfTokenizerTest, AddedTokenIdsFollowTokenizers) {
  Spec s;
  s.extra_words = {"<tool>"};
  s.added = {Added("<tool>"), Added("<new>"), Added("<new2>", false)};
  json j = MakeJson(s);
  for (auto& a : j["added_tokens"]) a["id"] = 9999;  // the file's ids are only checked by tokenizers
  auto t = HfTokenizer::FromJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->TokenToId("<tool>"), 256);  // already in the vocab: its id
  EXPECT_EQ(t->TokenToId("<new>"), 257);   // then vocab size, +1...
  EXPECT_EQ(t->TokenToId("<new2>"), 258);
  EXPECT_EQ(t->vocab_size(), 259);
}

TEST(HfTokenizerTest, RefusesWhatItCannotReproduce) {
  struct Case {
    std::string field, value;
    std::function<void(json&)> edit;
  };
  const std::vector<Case> cases = {
      {"model.type", "WordPiece", [](json& j) { j["model"]["type"] = "WordPiece"; }},
      {"model.byte_fallback", "true", [](json& j) { j["model"]["byte_fallback"] = true; }},
      {"model.dropout", "0.1", [](json& j) { j["model"]["dropout"] = 0.1; }},
      {"model.continuing_subword_prefix", "##", [](json& j) { j["model"]["continuing_subword_prefix"] = "##"; }},
      {"model.end_of_word_suffix", "</w>", [](json& j) { j["model"]["end_of_word_suffix"] = "</w>"; }},
      {"model.unk_token", "<nope>", [](json& j) { j["model"]["unk_token"] = "<nope>"; }},
      {"model.merges[0]", "zz", [](json& j) { j["model"]["merges"] = json::array({json::array({"z", "zz"})}); }},
      {"model.merges[0]", "a b c", [](json& j) { j["model"]["merges"] = json::array({"a b c"}); }},
      {"model.vocab", "id 3", [](json& j) { j["model"]["vocab"]["dup"] = 3; }},
      {"normalizer.type", "NFKC", [](json& j) { j["normalizer"] = {{"type", "NFKC"}}; }},
      {"normalizer.normalizers[1].type", "Lowercase",
       [](json& j) { j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "Lowercase"}}}}}; }},
      {"pre_tokenizer.type", "Metaspace",
       [](json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}, {"prepend_scheme", "always"}}; }},
      {"pre_tokenizer.pretokenizers[0].type", "Whitespace",
       [](json& j) { j["pre_tokenizer"] = Seq({{{"type", "Whitespace"}}, ByteLevelPre()}); }},
      {"pre_tokenizer", "ByteLevel must be the last",
       [](json& j) { j["pre_tokenizer"] = Seq({ByteLevelPre(), SplitPre("a", "Isolated")}); }},
      {"pre_tokenizer", "no ByteLevel", [](json& j) { j["pre_tokenizer"] = SplitPre("a", "Isolated"); }},
      {"pre_tokenizer", "null", [](json& j) { j["pre_tokenizer"] = nullptr; }},
      {"pre_tokenizer.pretokenizers[0].pattern.Regex", "\\b",
       [](json& j) { j["pre_tokenizer"] = Seq({SplitPre("\\bx", "Isolated"), ByteLevelPre()}); }},
      {"pre_tokenizer.pretokenizers[0].pattern.Regex", "POSIX",
       [](json& j) { j["pre_tokenizer"] = Seq({SplitPre("[[:alpha:]]", "Isolated"), ByteLevelPre()}); }},
      {"pre_tokenizer.pretokenizers[0].behavior", "Shuffled",
       [](json& j) { j["pre_tokenizer"] = Seq({SplitPre("a", "Shuffled"), ByteLevelPre()}); }},
      {"decoder.type", "Metaspace", [](json& j) { j["decoder"] = {{"type", "Metaspace"}}; }},
      {"truncation", "max_length", [](json& j) { j["truncation"] = {{"max_length", 8}}; }},
      {"padding", "Fixed", [](json& j) { j["padding"] = {{"strategy", {{"Fixed", 8}}}}; }},
      {"version", "2.0", [](json& j) { j["version"] = "2.0"; }},
  };
  Spec s;
  s.merges = {{"a", "b"}};
  for (const auto& c : cases) {
    json j = MakeJson(s);
    c.edit(j);
    auto t = HfTokenizer::FromJson(j.dump(), "x/tokenizer.json");
    ASSERT_FALSE(t.ok()) << c.field;
    const std::string msg = t.status().message();
    EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument) << msg;
    EXPECT_NE(msg.find("x/tokenizer.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.field), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.value), std::string::npos) << msg;
  }
  EXPECT_FALSE(HfTokenizer::FromJson("{not json").ok());
  EXPECT_EQ(HfTokenizer::Load("/nonexistent/tokenizer.json").status().code(), StatusCode::kNotFound);
}

// Random merges over a small alphabet, as training would make them, plus what tiktoken conversions have: other pairs
// forming an existing token, and repeated pairs.
Spec RandomSpec(std::mt19937& rng, int n_merges) {
  Spec s;
  std::vector<std::string> toks = {"a", "b", "c", "d", " "};
  std::set<std::string> seen(toks.begin(), toks.end());
  while (static_cast<int>(s.merges.size()) < n_merges) {
    const std::string a = toks[rng() % toks.size()];
    const std::string b = toks[rng() % toks.size()];
    if (a.size() + b.size() > 12 || (seen.count(a + b) && rng() % 4 != 0)) continue;
    s.merges.emplace_back(a, b);
    if (seen.insert(a + b).second) toks.push_back(a + b);
  }
  return s;
}

TEST(HfTokenizerTest, ScanAndHeapMergesAgreeOnRandomWords) {
  std::mt19937 rng(std::random_device{}());
  const unsigned seed = rng();
  rng.seed(seed);
  Spec s = RandomSpec(rng, 300);
  s.pre_tokenizer = ByteLevelPre(false, false);
  std::vector<std::string> words;
  for (int i = 0; i < 400; ++i) {
    std::string w;
    const int len = 1 + static_cast<int>(rng() % (i % 4 == 0 ? 400 : 40));
    for (int k = 0; k < len; ++k) w += "abcd "[rng() % (i % 2 ? 2 : 5)];
    words.push_back(w);
  }
  hf_internal::SetBpeScanMaxForTesting(1 << 20);
  auto scan = Make(s);
  std::vector<std::vector<int32_t>> by_scan;
  for (const auto& w : words) by_scan.push_back(scan.Encode(w));
  hf_internal::SetBpeScanMaxForTesting(0);
  auto heap = Make(s);
  for (size_t i = 0; i < words.size(); ++i) {
    ASSERT_EQ(heap.Encode(words[i]), by_scan[i]) << "seed " << seed << " word " << words[i];
    ASSERT_EQ(heap.Decode(by_scan[i]), words[i]) << "seed " << seed;
  }
  hf_internal::SetBpeScanMaxForTesting(64);
}

TEST(HfTokenizerTest, RoundTripsRandomText) {
  std::mt19937 rng(std::random_device{}());
  const unsigned seed = rng();
  rng.seed(seed);
  Spec s = RandomSpec(rng, 100);
  s.added = {Added("<|endoftext|>")};
  s.pre_tokenizer = Seq({SplitPre("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                                  "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
                                  "Isolated"),
                         ByteLevelPre(false, false)});
  auto t = Make(s);
  const std::vector<uint32_t> pool = {'a', 'b', ' ', '\n', '\t', '1', '\'', 's', 0xE9, 0x301, 0x4E2D, 0x1F600,
                                      0x200D, 0x3000, 0x85, 0x5D0, 0x661};
  for (int i = 0; i < 300; ++i) {
    std::string text;
    const int len = static_cast<int>(rng() % 60);
    for (int k = 0; k < len; ++k) {
      if (rng() % 50 == 0) {
        text += "<|endoftext|>";
        continue;
      }
      const uint32_t cp = pool[rng() % pool.size()];
      if (cp < 0x80) {
        text += static_cast<char>(cp);
      } else if (cp < 0x800) {
        text += static_cast<char>(0xC0 | (cp >> 6));
        text += static_cast<char>(0x80 | (cp & 0x3F));
      } else if (cp < 0x10000) {
        text += static_cast<char>(0xE0 | (cp >> 12));
        text += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        text += static_cast<char>(0x80 | (cp & 0x3F));
      } else {
        text += static_cast<char>(0xF0 | (cp >> 18));
        text += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
        text += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
        text += static_cast<char>(0x80 | (cp & 0x3F));
      }
    }
    ASSERT_EQ(t.Decode(t.Encode(text)), text) << "seed " << seed << " text " << json(text).dump();
  }
}

TEST(HfTokenizerTest, ThreadsShareTheCache) {
  std::mt19937 rng(7);
  Spec s = RandomSpec(rng, 200);
  auto t = Make(s);
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) {
    std::string x;
    for (int k = 0; k < 500; ++k) x += "abcd "[rng() % 5];
    texts.push_back(x);
  }
  std::vector<std::vector<int32_t>> want;
  {
    auto fresh = Make(s);
    for (const auto& x : texts) want.push_back(fresh.Encode(x));
  }
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&, th] {
      for (int r = 0; r < 5; ++r) {
        for (size_t i = th; i < texts.size() + th; ++i) {
          const size_t k = i % texts.size();
          if (t.Encode(texts[k]) != want[k]) ++bad;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(HfTokenizerTest, LoadsFromFile) {
  Spec s;
  s.merges = {{"a", "b"}};
  const std::string path = (std::filesystem::temp_directory_path() / ("hf_tok_" + std::to_string(::getpid()) + ".json")).string();
  {
    std::ofstream f(path);
    f << MakeJson(s).dump(2);
  }
  auto t = HfTokenizer::Load(path);
  std::filesystem::remove(path);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->Encode("ab"), std::vector<int32_t>{256});
}

}  // namespace
}  // namespace btx::model
