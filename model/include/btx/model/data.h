// Training data: token streams from text files / dirs / shards, and a deterministic, resumable sampler.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "btx/contract/status.h"
#include "btx/model/tokenizer.h"

namespace btx::model {

using TokenStream = std::shared_ptr<const std::vector<int32_t>>;
// Per token of a stream: 1 when predicting that token counts in the loss (chat data: assistant tokens), 0 when
// not. Null: every token counts.
using LossMask = std::shared_ptr<const std::vector<uint8_t>>;
// The target the loss ignores (at::nll_loss's default ignore_index, and the trainer's one convention).
inline constexpr int64_t kIgnoreIndex = -100;

// What a data file holds. kAuto decides per file by its extension: *.btxtok a token shard, *.jsonl / *.ndjson /
// *.json JSON lines (chat when the first record has "messages", else records with a text field), anything else
// plain text.
enum class DataFormat { kAuto, kText, kJsonl, kChat };
struct DataFormatOptions {
  DataFormat format = DataFormat::kAuto;
  std::string text_field = "text";  // kJsonl
};
// "", "auto", "text", "jsonl", "chat".
StatusOr<DataFormat> ParseDataFormat(const std::string& name);
const char* DataFormatName(DataFormat f);

// One document as tokens: text as bos + tokens + eos (every token counts); a conversation as its chat template
// renders it, the loss on the assistant messages' content and the end-of-turn marker after each (chat_template.h).
struct EncodedDocument {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss;  // empty: every token counts
};

// Turns documents into tokens with one tokenizer; the chat template comes from the tokenizer (its model dir's
// tokenizer_config.json), else ChatML for tokenizers without one (the byte tokenizer).
class DocumentEncoder {
 public:
  static StatusOr<DocumentEncoder> Create(const Tokenizer& tok);
  EncodedDocument Text(std::string_view text) const;
  // `messages` as in a chat record; errors say what is wrong with it (the caller adds file and line).
  StatusOr<EncodedDocument> Chat(const nlohmann::ordered_json& messages) const;

  struct ChatState;

 private:
  const Tokenizer* tok_ = nullptr;
  std::shared_ptr<const ChatState> chat_;
  std::string chat_error_;  // why this tokenizer cannot encode conversations (checked at the first one)
};

// Calls `fn` for every document of `file` in order: the file itself (text), each record (JSONL, chat). A bad
// record stops it with InvalidArgument "FILE:LINE: what is wrong". Shards are not documents (LoadData reads them).
Status ForEachDocument(const std::string& file, const DataFormatOptions& options, const DocumentEncoder& enc,
                       const std::function<Status(EncodedDocument&&)>& fn);
// The format `file` is read as under `options` (kAuto resolved; chat vs JSONL by the first record).
StatusOr<DataFormat> ResolveFormat(const std::string& file, const DataFormatOptions& options);

// Expands paths (files, or directories walked recursively in sorted order) to files.
StatusOr<std::vector<std::string>> ExpandDataPaths(const std::vector<std::string>& paths);

struct TokenData {
  TokenStream tokens;
  LossMask loss;  // null when every token counts
};
// Documents of every file, concatenated; *.btxtok shards appended as stored (with their loss mask if they have
// one). Stops after max_tokens when > 0. Fails if a token id is >= vocab_limit (when > 0).
StatusOr<TokenData> LoadData(const std::vector<std::string>& paths, const Tokenizer& tok,
                             const DataFormatOptions& options, int64_t max_tokens = 0, int64_t vocab_limit = 0);
// LoadData with the format of each file inferred, without the loss mask.
StatusOr<TokenStream> LoadTokens(const std::vector<std::string>& paths, const Tokenizer& tok, int64_t max_tokens = 0,
                                 int64_t vocab_limit = 0);

uint64_t SplitMix64(uint64_t x);

// Non-overlapping windows of seq_len+1 tokens, visited in a fresh seeded permutation each epoch.
// Sample i is a pure function of (seed, i), so a cursor is all that resuming needs.
class WindowSampler {
 public:
  static StatusOr<WindowSampler> Create(TokenStream tokens, int64_t seq_len, uint64_t seed, LossMask loss = nullptr);
  int64_t num_windows() const { return windows_; }
  // Copies sample `index` (seq_len+1 tokens) into dst; with `targets`, also its seq_len next-token targets:
  // the tokens dst[1..], or kIgnoreIndex where the loss mask says the token does not count.
  void Fill(uint64_t index, int64_t* dst, int64_t* targets = nullptr);

 private:
  TokenStream tokens_;
  LossMask loss_;
  std::vector<int64_t> eligible_;  // with a loss mask: the windows with at least one counted target
  int64_t seq_len_ = 0, windows_ = 0;
  uint64_t seed_ = 0;
  int64_t perm_epoch_ = -1;
  std::vector<int64_t> perm_;
};

// Rows [begin, end) of a [rows, seq_len] target batch: their share of its targets that are not kIgnoreIndex. A
// data-parallel rank weights the mean loss of its rows by it, so the ranks' sum is the mean over the whole batch's
// counted targets (every rank draws the whole batch, so no communication is needed). Without ignored targets it
// is the share of the rows.
double CountedShare(const at::Tensor& targets, int64_t begin, int64_t end);

// Weighted mixture of samplers; the domain of sample i is drawn from hash(seed, i).
class MixtureSampler {
 public:
  MixtureSampler(std::vector<WindowSampler> samplers, std::vector<double> weights, uint64_t seed);
  // [count, seq_len+1] int64 batch of the next samples; advances the cursors.
  at::Tensor Next(int64_t count, int64_t seq_len);
  struct Batch {
    at::Tensor tokens;   // [count, seq_len+1]: inputs are [:, :-1]
    at::Tensor targets;  // [count, seq_len]: tokens[:, 1:], kIgnoreIndex where no loss
  };
  // As Next, with the targets the loss takes.
  Batch NextBatch(int64_t count, int64_t seq_len);
  std::vector<uint64_t> cursors() const { return cursors_; }
  uint64_t drawn() const { return drawn_; }
  void Restore(uint64_t drawn, std::vector<uint64_t> cursors) {
    drawn_ = drawn;
    cursors_ = std::move(cursors);
  }

 private:
  std::vector<WindowSampler> samplers_;
  std::vector<double> cumulative_;
  uint64_t seed_;
  uint64_t drawn_ = 0;
  std::vector<uint64_t> cursors_;
};

}  // namespace btx::model
