// Offline tokenization of text corpora into *.btxtok shards (behind `btxctl data prepare`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

struct DataPrepareOptions {
  std::vector<std::string> inputs;  // text files, or directories walked recursively in sorted order
  std::string out;                  // must not exist yet; published atomically
  std::string tokenizer = "byte";   // "byte" | PATH.model | "spm:VOCAB" (trains DIR/tokenizer.model)
  double valid_fraction = 0.01;     // in [0, 0.5]
  int64_t shard_tokens = int64_t{1} << 24;
  uint64_t seed = 0;
};

struct DataPrepareResult {
  int64_t files = 0, bytes = 0;
  int64_t train_tokens = 0, valid_tokens = 0;
  int64_t train_shards = 0, valid_shards = 0;
  std::string out;  // absolute
};

// Every file is one document (bos + tokens + eos). Documents are ordered by a permutation drawn from
// `seed`; the first `valid_fraction` of the input bytes in that order goes to DIR/valid (the document at
// the boundary is split in proportion), the rest to DIR/train. Shards hold shard_tokens tokens each (the
// last one of a split fewer). DIR/manifest.json records inputs, tokenizer and counts.
// Bad options, missing inputs and an existing DIR are InvalidArgument / NotFound / FailedPrecondition
// errors whose message names the option or path.
StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& opts);

// Parses `data-prepare` arguments: INPUT... --out DIR [--tokenizer T] [--valid-fraction F]
// [--shard-tokens N] [--seed S]. Errors name the bad argument.
StatusOr<DataPrepareOptions> ParseDataPrepareArgs(const std::vector<std::string>& args);

}  // namespace btx::model
