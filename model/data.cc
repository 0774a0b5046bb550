#include "btx/model/data.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>

#include "btx/contract/files.h"
#include "btx/model/token_shard.h"

namespace btx::model {
namespace fs = std::filesystem;

StatusOr<std::vector<std::string>> ExpandDataPaths(const std::vector<std::string>& paths) {
  std::vector<std::string> out;
  for (const auto& p : paths) {
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      BTX_ASSIGN_OR_RETURN(auto files, ListFilesRecursive(p));
      for (auto& f : files) out.push_back((fs::path(p) / f).string());
    } else if (fs::is_regular_file(p, ec)) {
      out.push_back(p);
    } else {
      return NotFound("data path " + p + " does not exist");
    }
  }
  if (out.empty()) return InvalidArgument("data paths contain no files");
  return out;
}

StatusOr<TokenStream> LoadTokens(const std::vector<std::string>& paths, const Tokenizer& tok, int64_t max_tokens,
                                 int64_t vocab_limit) {
  BTX_ASSIGN_OR_RETURN(auto files, ExpandDataPaths(paths));
  auto out = std::make_shared<std::vector<int32_t>>();
  for (const auto& f : files) {
    if (max_tokens > 0 && static_cast<int64_t>(out->size()) >= max_tokens) break;
    if (f.ends_with(".btxtok")) {
      BTX_ASSIGN_OR_RETURN(auto t, ReadTokenShard(f));
      out->insert(out->end(), t.begin(), t.end());
    } else {
      BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(f));
      if (tok.bos_id() >= 0) out->push_back(tok.bos_id());
      auto t = tok.Encode(text);
      out->insert(out->end(), t.begin(), t.end());
      if (tok.eos_id() >= 0) out->push_back(tok.eos_id());
    }
  }
  if (max_tokens > 0 && static_cast<int64_t>(out->size()) > max_tokens) out->resize(max_tokens);
  if (vocab_limit > 0) {
    for (size_t i = 0; i < out->size(); ++i)
      if ((*out)[i] < 0 || (*out)[i] >= vocab_limit)
        return InvalidArgument("token id " + std::to_string((*out)[i]) + " is outside the model vocabulary (" +
                               std::to_string(vocab_limit) + ")");
  }
  return TokenStream(out);
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

StatusOr<WindowSampler> WindowSampler::Create(TokenStream tokens, int64_t seq_len, uint64_t seed) {
  WindowSampler s;
  s.windows_ = (static_cast<int64_t>(tokens->size()) - 1) / seq_len;
  if (s.windows_ < 1)
    return InvalidArgument("data has " + std::to_string(tokens->size()) + " tokens, needs at least seq_len+1 = " +
                           std::to_string(seq_len + 1));
  s.tokens_ = std::move(tokens);
  s.seq_len_ = seq_len;
  s.seed_ = seed;
  return s;
}

void WindowSampler::Fill(uint64_t index, int64_t* dst) {
  const int64_t epoch = static_cast<int64_t>(index / windows_);
  if (epoch != perm_epoch_) {
    // Fisher-Yates with our own generator: std distributions differ between standard libraries.
    perm_.resize(windows_);
    for (int64_t i = 0; i < windows_; ++i) perm_[i] = i;
    uint64_t state = SplitMix64(seed_ ^ SplitMix64(static_cast<uint64_t>(epoch) + 1));
    for (int64_t i = windows_ - 1; i > 0; --i) {
      state = SplitMix64(state);
      std::swap(perm_[i], perm_[state % static_cast<uint64_t>(i + 1)]);
    }
    perm_epoch_ = epoch;
  }
  const int64_t w = perm_[index % windows_];
  const int32_t* src = tokens_->data() + w * seq_len_;
  for (int64_t i = 0; i <= seq_len_; ++i) dst[i] = src[i];
}

MixtureSampler::MixtureSampler(std::vector<WindowSampler> samplers, std::vector<double> weights, uint64_t seed)
    : samplers_(std::move(samplers)), seed_(seed), cursors_(samplers_.size(), 0) {
  double total = 0;
  for (double w : weights) total += w;
  double acc = 0;
  for (double w : weights) cumulative_.push_back((acc += w) / total);
}

at::Tensor MixtureSampler::Next(int64_t count, int64_t seq_len) {
  at::Tensor out = at::empty({count, seq_len + 1}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < count; ++b) {
    size_t d = 0;
    if (samplers_.size() > 1) {
      const double u = static_cast<double>(SplitMix64(seed_ * 0x632be59bd9b4e019ull + drawn_) >> 11) * 0x1.0p-53;
      while (d + 1 < cumulative_.size() && u >= cumulative_[d]) ++d;
    }
    samplers_[d].Fill(cursors_[d]++, p + b * (seq_len + 1));
    ++drawn_;
  }
  return out;
}

}  // namespace btx::model
