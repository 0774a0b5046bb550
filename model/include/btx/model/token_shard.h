// Token shards (*.btxtok): pre-tokenized data, format documented in model/README.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

inline constexpr char kShardMagic[8] = {'B', 'T', 'X', 'T', 'O', 'K', '\r', '\n'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

// Chooses u16 when every id fits, else u32. vocab_size 0 means unknown (no range check on read).
Status WriteTokenShard(const std::string& path, const std::vector<int32_t>& tokens, uint64_t vocab_size);
StatusOr<std::vector<int32_t>> ReadTokenShard(const std::string& path);
uint64_t Fnv1a64(const void* data, size_t n);

}  // namespace btx::model
