#include "btx/model/token_shard.h"

#include <algorithm>
#include <cstring>

#include "btx/contract/files.h"

namespace btx::model {

uint64_t Fnv1a64(const void* data, size_t n) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

namespace {
template <typename T>
void PutLe(std::string& s, size_t off, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) s[off + i] = static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff);
}
template <typename T>
T GetLe(const std::string& s, size_t off) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(s[off + i])) << (8 * i);
  return static_cast<T>(v);
}
}  // namespace

Status WriteTokenShard(const std::string& path, const std::vector<int32_t>& tokens, uint64_t vocab_size,
                       const std::vector<uint8_t>* loss_mask) {
  if (loss_mask && loss_mask->size() != tokens.size())
    return InvalidArgument("shard " + path + ": " + std::to_string(loss_mask->size()) + " loss flags for " +
                           std::to_string(tokens.size()) + " tokens");
  int32_t mx = tokens.empty() ? 0 : *std::max_element(tokens.begin(), tokens.end());
  int32_t mn = tokens.empty() ? 0 : *std::min_element(tokens.begin(), tokens.end());
  if (mn < 0) return InvalidArgument("negative token id in shard " + path);
  const uint32_t width = mx < 65536 ? 2 : 4;
  const size_t mask_bytes = loss_mask ? (tokens.size() + 7) / 8 : 0;
  std::string buf(kShardHeaderBytes + tokens.size() * width + mask_bytes, '\0');
  std::memcpy(buf.data(), kShardMagic, 8);
  PutLe<uint32_t>(buf, 8, loss_mask ? kShardVersionLossMask : kShardVersion);
  PutLe<uint32_t>(buf, 12, width);
  PutLe<uint64_t>(buf, 16, tokens.size());
  PutLe<uint64_t>(buf, 24, vocab_size);
  PutLe<uint64_t>(buf, 56, Fnv1a64(buf.data(), 56));
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (width == 2) PutLe<uint16_t>(buf, kShardHeaderBytes + 2 * i, static_cast<uint16_t>(tokens[i]));
    else PutLe<uint32_t>(buf, kShardHeaderBytes + 4 * i, static_cast<uint32_t>(tokens[i]));
  }
  // Bits, least significant first: the mask costs 1/16 of a u16 shard.
  const size_t mask_at = kShardHeaderBytes + tokens.size() * width;
  for (size_t i = 0; loss_mask && i < tokens.size(); ++i)
    if ((*loss_mask)[i]) buf[mask_at + i / 8] = static_cast<char>(buf[mask_at + i / 8] | (1 << (i % 8)));
  return WriteFileDurable(path, buf);
}

StatusOr<std::vector<int32_t>> ReadTokenShard(const std::string& path) {
  BTX_ASSIGN_OR_RETURN(TokenShard s, ReadTokenShardWithMask(path));
  return std::move(s.tokens);
}

StatusOr<TokenShard> ReadTokenShardWithMask(const std::string& path) {
  BTX_ASSIGN_OR_RETURN(std::string buf, ReadFile(path));
  auto bad = [&](const std::string& why) { return DataLoss("token shard " + path + ": " + why); };
  if (buf.size() < kShardHeaderBytes) return bad("shorter than the 64-byte header");
  if (std::memcmp(buf.data(), kShardMagic, 8) != 0) return bad("bad magic");
  if (GetLe<uint64_t>(buf, 56) != Fnv1a64(buf.data(), 56)) return bad("header checksum mismatch");
  const uint32_t version = GetLe<uint32_t>(buf, 8), width = GetLe<uint32_t>(buf, 12);
  if (version != kShardVersion && version != kShardVersionLossMask)
    return bad("unsupported version " + std::to_string(version) + " (this build reads 1 and 2)");
  if (width != 2 && width != 4) return bad("token width must be 2 or 4, got " + std::to_string(width));
  const uint64_t count = GetLe<uint64_t>(buf, 16), vocab = GetLe<uint64_t>(buf, 24);
  const bool masked = version == kShardVersionLossMask;
  if (count > (buf.size() - kShardHeaderBytes) / width ||
      kShardHeaderBytes + count * width + (masked ? (count + 7) / 8 : 0) != buf.size())
    return bad("file size " + std::to_string(buf.size()) + " does not match " + std::to_string(count) + " tokens" +
               (masked ? " and their loss mask" : ""));
  TokenShard shard;
  std::vector<int32_t>& out = shard.tokens;
  out.resize(count);
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t v = width == 2 ? GetLe<uint16_t>(buf, kShardHeaderBytes + 2 * i) : GetLe<uint32_t>(buf, kShardHeaderBytes + 4 * i);
    if (vocab && v >= vocab) return bad("token " + std::to_string(v) + " at " + std::to_string(i) + " >= vocab_size");
    if (v > 0x7fffffffu) return bad("token id too large");
    out[i] = static_cast<int32_t>(v);
  }
  if (masked) {
    const size_t at = kShardHeaderBytes + count * width;
    shard.loss.resize(count);
    for (uint64_t i = 0; i < count; ++i) shard.loss[i] = (static_cast<uint8_t>(buf[at + i / 8]) >> (i % 8)) & 1;
  }
  return shard;
}

}  // namespace btx::model
