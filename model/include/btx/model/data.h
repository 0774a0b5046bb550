// Training data: token streams from text files / dirs / shards, and a deterministic, resumable sampler.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "btx/contract/status.h"
#include "btx/model/tokenizer.h"

namespace btx::model {

using TokenStream = std::shared_ptr<const std::vector<int32_t>>;

// Expands paths (files, or directories walked recursively in sorted order) to files.
StatusOr<std::vector<std::string>> ExpandDataPaths(const std::vector<std::string>& paths);
// Every text file is one document: bos + tokens + eos. *.btxtok shards are appended as stored.
// Stops after max_tokens when > 0. Fails if a token id is >= vocab_limit (when > 0).
StatusOr<TokenStream> LoadTokens(const std::vector<std::string>& paths, const Tokenizer& tok, int64_t max_tokens = 0,
                                 int64_t vocab_limit = 0);

uint64_t SplitMix64(uint64_t x);

// Non-overlapping windows of seq_len+1 tokens, visited in a fresh seeded permutation each epoch.
// Sample i is a pure function of (seed, i), so a cursor is all that resuming needs.
class WindowSampler {
 public:
  static StatusOr<WindowSampler> Create(TokenStream tokens, int64_t seq_len, uint64_t seed);
  int64_t num_windows() const { return windows_; }
  // Copies sample `index` (seq_len+1 tokens) into dst.
  void Fill(uint64_t index, int64_t* dst);

 private:
  TokenStream tokens_;
  int64_t seq_len_ = 0, windows_ = 0;
  uint64_t seed_ = 0;
  int64_t perm_epoch_ = -1;
  std::vector<int64_t> perm_;
};

// Weighted mixture of samplers; the domain of sample i is drawn from hash(seed, i).
class MixtureSampler {
 public:
  MixtureSampler(std::vector<WindowSampler> samplers, std::vector<double> weights, uint64_t seed);
  // [count, seq_len+1] int64 batch of the next samples; advances the cursors.
  at::Tensor Next(int64_t count, int64_t seq_len);
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
