// Token shards (*.btxtok): pre-tokenized data, format documented in model/README.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

inline constexpr char kShardMagic[8] = {'B', 'T', 'X', 'T', 'O', 'K', '\r', '\n'};
inline constexpr uint32_t kShardVersion = 1;          // tokens only
inline constexpr uint32_t kShardVersionLossMask = 2;  // tokens, then one loss bit per token
inline constexpr size_t kShardHeaderBytes = 64;

// Chooses u16 when every id fits, else u32. vocab_size 0 means unknown (no range check on read).
// With a loss mask (one 0/1 per token: does predicting this token count?) the shard is version 2; without one it
// stays version 1, byte for byte what earlier releases wrote and read.
Status WriteTokenShard(const std::string& path, const std::vector<int32_t>& tokens, uint64_t vocab_size,
                       const std::vector<uint8_t>* loss_mask = nullptr);
StatusOr<std::vector<int32_t>> ReadTokenShard(const std::string& path);

struct TokenShard {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> loss;  // empty: a version-1 shard, every token counts
};
StatusOr<TokenShard> ReadTokenShardWithMask(const std::string& path);
uint64_t Fnv1a64(const void* data, size_t n);

}  // namespace btx::model
