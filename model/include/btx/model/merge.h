// Turning dense experts into one model: BTX (Mixtral MoE), sparse upcycling, BTM (parameter average).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "btx/contract/files.h"
#include "btx/contract/status.h"

namespace btx {

struct MergeSpec {
  std::string method = "btx";  // btx | upcycle | btm
  std::string seed;            // seed model dir (required for upcycle, keep_seed_expert, router_init=hidden)
  std::vector<std::pair<std::string, std::string>> experts;  // (name, model dir)
  bool keep_seed_expert = false;  // btx: the seed FFN becomes one more expert (last slot)
  std::string router_init = "random";  // random | hidden
  int64_t top_k = 2;
  int64_t num_experts = 0;  // upcycle: number of copies; 0 = number of listed experts (or 4 without any)
  // router_init=hidden: per expert name, data whose mean FFN input (seed model) becomes the router row.
  std::map<std::string, std::vector<std::string>> prompts;
  int64_t hidden_tokens = 4096;
  uint64_t random_seed = 1234;
  uint64_t max_shard_bytes = 2ull << 30;
};

Status ValidateMergeSpec(const MergeSpec& s);
// Writes config.json, the weights (tensor by tensor from mmapped inputs) and the seed's tokenizer files into
// an existing directory. BTX: expert e's mlp.{gate,up,down}_proj -> experts.e.{w1,w3,w2}; every other tensor
// is the mean over the merged models (the experts, plus the seed when keep_seed_expert).
// `weight_digests`: gets the sha256 of the weight files (safetensors, index), hashed as they were written, for
// StagedDir::Publish (the merge's output is its largest file set: publication would otherwise read it again).
Status MergeToDir(const MergeSpec& s, const std::string& dir, const std::atomic<bool>* stop = nullptr,
                  FileDigests* weight_digests = nullptr);

}  // namespace btx
