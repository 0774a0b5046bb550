// Hugging Face tokenizer.json files for byte-level BPE models (GPT-2, Llama 3, Qwen2, SmolLM), encoded token for
// token as the Python `tokenizers` library (0.20) does with add_special_tokens=False. Internal to model/; no LibTorch.
//
// Encode runs the library's pipeline: added tokens (special or not, with their lstrip/rstrip/single_word/normalized
// flags) are cut out first, leftmost-longest; the rest is normalized (NFC, via utf8proc), pre-tokenized (Split regex,
// Digits, ByteLevel; the Oniguruma regexes of tokenizer.json are translated to PCRE2) and BPE-merged.
// Input that is not valid UTF-8 is first repaired as Python's bytes.decode("utf-8", errors="replace") does (each
// maximal invalid subsequence becomes one U+FFFD), so ids equal those that `tokenizers` gives for that repaired text.
// Unicode tables: PCRE2 10.42 and Oniguruma 6.9.8 both follow Unicode 14; utf8proc (Unicode 13) and the library's
// NFC tables (older) can differ only on combining marks assigned after Unicode 9.
//
// Load refuses, naming the JSON field and value, everything that would not encode exactly so: other models,
// normalizers, pre-tokenizers or decoders, byte_fallback, dropout, subword prefixes/suffixes, truncation, padding,
// and regex constructs that mean different things to Oniguruma and PCRE2 (\b, POSIX classes, nested classes...).
// The post-processor is ignored (it only acts with add_special_tokens=True; btx adds BOS itself).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

class HfTokenizer {
 public:
  static StatusOr<HfTokenizer> Load(const std::string& tokenizer_json_path);
  // The content of a tokenizer.json; `origin` prefixes error messages.
  static StatusOr<HfTokenizer> FromJson(std::string_view json_text, const std::string& origin = "tokenizer.json");

  // Thread-safe (the BPE cache is shared between threads and between copies).
  std::vector<int32_t> Encode(std::string_view text) const;
  // As `tokenizers`' decode(ids, skip_special_tokens=False): ids it does not know are skipped, and bytes that do
  // not form UTF-8 become U+FFFD.
  std::string Decode(const std::vector<int32_t>& ids) const;
  // Max id + 1 over the vocabulary and the added tokens.
  int64_t vocab_size() const;
  // Added tokens first, then the BPE vocabulary (tokens are in byte-level form, e.g. "Ġthe").
  std::optional<int32_t> TokenToId(std::string_view token) const;
  std::optional<std::string> IdToToken(int32_t id) const;

  struct Impl;

 private:
  explicit HfTokenizer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<Impl> impl_;
};

// Every maximal invalid subsequence replaced by U+FFFD (what Python's errors="replace" and Rust's from_utf8_lossy do).
std::string ReplaceInvalidUtf8(std::string_view s);

namespace hf_internal {
// Words of at most this many symbols are merged by a quadratic scan, longer ones with a heap (as `tokenizers`);
// both give the same merges. Tests lower it to compare them. Not thread-safe against concurrent Encode.
void SetBpeScanMaxForTesting(size_t max_symbols);
}  // namespace hf_internal

}  // namespace btx::model
