// Turning dense experts into one model: BTX (Mixtral MoE), sparse upcycling, BTM (parameter average).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "btx/contract/files.h"
#include "btx/contract/specs.h"
#include "btx/contract/status.h"

namespace btx::model {

// What a merge job reads: the job contract's struct (contract/specs.h), checked by its parser.
using contract::MergeSpec;

// Writes config.json, the weights (tensor by tensor from mmapped inputs) and the seed's tokenizer files into
// an existing directory. BTX: expert e's mlp.{gate,up,down}_proj -> experts.e.{w1,w3,w2}; every other tensor
// is the mean over the merged models (the experts, plus the seed when keep_seed_expert).
// `weight_digests`: gets the sha256 of the weight files (safetensors, index), hashed as they were written, for
// StagedDir::Publish (the merge's output is its largest file set: publication would otherwise read it again).
Status MergeToDir(const MergeSpec& s, const std::string& dir, const std::atomic<bool>* stop = nullptr,
                  FileDigests* weight_digests = nullptr);

}  // namespace btx::model
