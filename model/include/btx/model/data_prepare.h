// Offline tokenization of text corpora into *.btxtok shards (behind `btxctl data prepare`).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "btx/contract/status.h"
#include "btx/model/data.h"

namespace btx::model {

struct DataPrepareOptions {
  std::vector<std::string> inputs;  // text / JSONL / chat JSONL files, or directories walked recursively in sorted order
  std::string out;                  // must not exist yet; published atomically
  // "byte" | PATH.model | "spm:VOCAB" (trains DIR/tokenizer.model) | a model DIR (its tokenizer and chat template)
  std::string tokenizer = "byte";
  DataFormatOptions format;         // --format, --text-field
  double valid_fraction = 0.01;     // in [0, 0.5]
  int64_t shard_tokens = int64_t{1} << 24;
  uint64_t seed = 0;
  // Called after each input file with the input bytes done so far and in all.
  std::function<void(int64_t done, int64_t total)> progress;
};

struct DataPrepareResult {
  int64_t files = 0, bytes = 0;
  int64_t train_tokens = 0, valid_tokens = 0;
  int64_t train_shards = 0, valid_shards = 0;
  int64_t loss_tokens = 0;  // tokens the loss counts (all but the non-assistant tokens of chat data)
  std::string out;  // absolute
};

// Every text file is one document (bos + tokens + eos), every JSONL record one, every chat record one conversation
// (its tokens carry the loss mask into version-2 shards; token_shard.h); a bad record fails the run naming its
// file and line. Documents are ordered by a permutation drawn from
// `seed`; the first `valid_fraction` of the input bytes in that order goes to DIR/valid (the document at
// the boundary is split in proportion), the rest to DIR/train. Shards hold shard_tokens tokens each (the
// last one of a split fewer). DIR/manifest.json records inputs, tokenizer and counts.
// Bad options, missing inputs and an existing DIR are InvalidArgument / NotFound / FailedPrecondition
// errors whose message names the option or path.
StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& opts);

// Parses `data-prepare` arguments: INPUT... --out DIR [--tokenizer T] [--format text|jsonl|chat]
// [--text-field NAME] [--valid-fraction F] [--shard-tokens N] [--seed S]. Errors name the bad argument.
StatusOr<DataPrepareOptions> ParseDataPrepareArgs(const std::vector<std::string>& args);

}  // namespace btx::model
