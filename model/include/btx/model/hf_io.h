// Hugging Face model directories: config.json + model.safetensors, or shards + model.safetensors.index.json.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "btx/contract/files.h"
#include "btx/model/llama.h"
#include "btx/model/safetensors.h"

namespace btx::model {

struct SaveOptions {
  uint64_t max_shard_bytes = 2ull << 30;  // a model larger than this is split into shards + index.json
  std::optional<st::DType> dtype;  // unset: the config's torch_dtype
};
// The safetensors dtype of a config's torch_dtype.
st::DType StorageDType(const ModelConfig& cfg);

// The HF name of a btx name (Mixtral-style: "...block_sparse_moe.experts.E.w1.weight", "...block_sparse_moe.gate.weight")
// in the config's MoE layout: unchanged for Mixtral and btx_gemma_moe, "...mlp.experts.E.gate_proj.weight" and
// "...mlp.gate.weight" for Qwen2-MoE. Dense tensors keep their names.
std::string HfMoeName(const ModelConfig& cfg, const std::string& name);
// The inverse: the Mixtral-style name of an HF tensor of the config's layout, or "" for a tensor btx does not hold
// and writes as zeros (Qwen2-MoE's shared expert and its gate).
std::string MixtralStyleName(const ModelConfig& cfg, const std::string& hf_name);

// HF tensor names and shapes for a config (experts unstacked: ...experts.E.w1.weight), canonical order.
std::vector<st::TensorSpec> HfSpecs(const ModelConfig& cfg, st::DType dtype = st::DType::kF32);
// HF-named views of a model's tensors (expert tensors are slices of the stacked ones).
std::vector<std::pair<std::string, at::Tensor>> ToHfTensors(const LlamaModel& m);

// Writes config.json and the weights (sharded when large) into an existing directory, streaming tensors
// from `produce` in spec order. Publishing (manifest, rename) is the caller's job (see StagedDir).
// `digests`: gets the sha256 of each file written (safetensors, index), hashed as written, for StagedDir::Publish.
Status WriteHfWeights(const std::string& dir, const std::vector<st::TensorSpec>& specs, const st::TensorProducer& produce,
                      uint64_t max_shard_bytes, FileDigests* digests = nullptr);
// `digests`: as WriteHfWeights's.
Status WriteModelFiles(const LlamaModel& m, const std::string& dir, const SaveOptions& opts = {},
                       FileDigests* digests = nullptr);

// Read access to the tensors of an HF directory across shards, by HF name, without loading them all.
class HfTensorSource {
 public:
  static StatusOr<HfTensorSource> Open(const std::string& dir);
  const ModelConfig& config() const { return cfg_; }
  const std::string& dir() const { return dir_; }
  bool Has(const std::string& name) const;
  StatusOr<at::Tensor> Load(const std::string& name) const;  // float32 copy
  std::vector<std::string> Names() const;

 private:
  std::string dir_;
  ModelConfig cfg_;
  std::vector<std::shared_ptr<st::File>> files_;
  std::vector<std::pair<std::string, size_t>> where_;  // name -> file index, sorted by name
};

// Loads an HF Llama/Mixtral directory (our own or one saved by transformers). When the directory has a
// manifest.sha256 it is verified first; a mismatch fails with DataLoss naming the file.
StatusOr<LlamaModel> LoadModelDir(const std::string& dir);
StatusOr<ModelConfig> LoadConfig(const std::string& dir);

}  // namespace btx::model
