#include "btx/model/hf_io.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "btx/contract/files.h"

namespace btx::model {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {
const std::string kExperts = "block_sparse_moe.experts.";
// "model.layers.N.block_sparse_moe.experts.w1" -> ("model.layers.N.block_sparse_moe.experts.", "w1")
bool IsStacked(const std::string& name) {
  auto p = name.rfind(kExperts);
  return p != std::string::npos && name.find('.', p + kExperts.size()) == std::string::npos;
}
std::string ExpertName(const std::string& stacked, int64_t e) {
  auto p = stacked.rfind(kExperts) + kExperts.size();
  return stacked.substr(0, p) + std::to_string(e) + "." + stacked.substr(p) + ".weight";
}
}  // namespace

namespace {
bool Qwen2Moe(const ModelConfig& c) { return c.is_moe() && c.hf_model_type() == "qwen2_moe"; }
void Replace(std::string& s, const std::string& from, const std::string& to) {
  if (auto p = s.find(from); p != std::string::npos) s.replace(p, from.size(), to);
}
// Qwen2-MoE's zero shared expert of layer prefix p ("model.layers.N."), as HF names and shapes.
std::vector<std::pair<std::string, std::vector<int64_t>>> SharedExpert(const ModelConfig& c, const std::string& p) {
  const int64_t D = c.hidden_size, W = kQwen2MoeSharedWidth;
  return {{p + "mlp.shared_expert.gate_proj.weight", {W, D}},
          {p + "mlp.shared_expert.up_proj.weight", {W, D}},
          {p + "mlp.shared_expert.down_proj.weight", {D, W}},
          {p + "mlp.shared_expert_gate.weight", {1, D}}};
}
// The layer prefix of an internal stacked w2 name, after which the layer's extra tensors are written.
std::string LayerPrefix(const std::string& stacked) { return stacked.substr(0, stacked.rfind("block_sparse_moe.")); }
}  // namespace

std::string HfMoeName(const ModelConfig& cfg, const std::string& name) {
  if (!Qwen2Moe(cfg) || name.find(".block_sparse_moe.") == std::string::npos) return name;
  std::string n = name;
  Replace(n, ".block_sparse_moe.", ".mlp.");
  if (n.find(".mlp.experts.") != std::string::npos) {
    Replace(n, ".w1.weight", ".gate_proj.weight");
    Replace(n, ".w3.weight", ".up_proj.weight");
    Replace(n, ".w2.weight", ".down_proj.weight");
  }
  return n;
}

std::string MixtralStyleName(const ModelConfig& cfg, const std::string& hf_name) {
  if (!Qwen2Moe(cfg)) return hf_name;
  if (hf_name.find(".mlp.shared_expert") != std::string::npos) return "";
  std::string n = hf_name;
  if (n.find(".mlp.experts.") != std::string::npos) {
    Replace(n, ".gate_proj.weight", ".w1.weight");
    Replace(n, ".up_proj.weight", ".w3.weight");
    Replace(n, ".down_proj.weight", ".w2.weight");
    Replace(n, ".mlp.", ".block_sparse_moe.");
  } else if (n.ends_with(".mlp.gate.weight")) {
    Replace(n, ".mlp.", ".block_sparse_moe.");
  }
  return n;
}

std::vector<st::TensorSpec> HfSpecs(const ModelConfig& cfg, st::DType dtype) {
  std::vector<st::TensorSpec> out;
  for (auto& [name, shape] : LlamaModel::Layout(cfg)) {
    if (IsStacked(name)) {
      for (int64_t e = 0; e < shape[0]; ++e)
        out.push_back({HfMoeName(cfg, ExpertName(name, e)), dtype, std::vector<int64_t>(shape.begin() + 1, shape.end())});
      if (Qwen2Moe(cfg) && name.ends_with(".w2"))
        for (auto& [n, s] : SharedExpert(cfg, LayerPrefix(name))) out.push_back({n, dtype, s});
    } else {
      out.push_back({HfMoeName(cfg, name), dtype, shape});
    }
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> ToHfTensors(const LlamaModel& m) {
  const ModelConfig& cfg = m.config();
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& [name, t] : m.params()) {
    if (IsStacked(name)) {
      for (int64_t e = 0; e < t.size(0); ++e) out.emplace_back(HfMoeName(cfg, ExpertName(name, e)), t[e]);
      if (Qwen2Moe(cfg) && name.ends_with(".w2"))
        for (auto& [n, s] : SharedExpert(cfg, LayerPrefix(name))) out.emplace_back(n, at::zeros(s, at::kFloat));
    } else {
      out.emplace_back(HfMoeName(cfg, name), t);
    }
  }
  return out;
}

Status WriteHfWeights(const std::string& dir, const std::vector<st::TensorSpec>& specs, const st::TensorProducer& produce,
                      uint64_t max_shard_bytes, FileDigests* digests) {
  const std::map<std::string, std::string> meta = {{"format", "pt"}};  // transformers refuses files without it
  std::vector<std::vector<size_t>> shards(1);
  uint64_t total = 0, cur = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    uint64_t bytes = st::DTypeSize(specs[i].dtype);
    for (auto d : specs[i].shape) bytes *= static_cast<uint64_t>(d);
    if (max_shard_bytes > 0 && cur > 0 && cur + bytes > max_shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += bytes;
    total += bytes;
  }
  auto write = [&](const std::string& name, const std::vector<st::TensorSpec>& sub, const st::TensorProducer& p) {
    std::string hex;
    Status written = st::WriteStreaming(dir + "/" + name, sub, p, meta, digests ? &hex : nullptr);
    if (written.ok() && digests) (*digests)[name] = std::move(hex);
    return written;
  };
  if (shards.size() == 1) return write("model.safetensors", specs, produce);
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    std::vector<st::TensorSpec> sub;
    for (size_t i : shards[s]) {
      sub.push_back(specs[i]);
      weight_map[specs[i].name] = fname;
    }
    const auto& ids = shards[s];
    BTX_RETURN_IF_ERROR(write(fname, sub, [&](size_t k) { return produce(ids[k]); }));
  }
  const std::string index = json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2);
  const std::string index_name = "model.safetensors.index.json";
  BTX_RETURN_IF_ERROR(WriteFileDurable(dir + "/" + index_name, index));
  if (digests) (*digests)[index_name] = Sha256Hex(index.data(), index.size());
  return Status::Ok();
}

Status WriteModelFiles(const LlamaModel& m, const std::string& dir, const SaveOptions& opts, FileDigests* digests) {
  BTX_RETURN_IF_ERROR(WriteFileDurable(dir + "/config.json", ConfigToHfJson(m.config()).dump(2)));
  auto tensors = ToHfTensors(m);
  auto specs = HfSpecs(m.config(), opts.dtype.value_or(StorageDType(m.config())));
  return WriteHfWeights(
      dir, specs, [&](size_t i) -> StatusOr<at::Tensor> { return tensors[i].second; }, opts.max_shard_bytes,
      digests);
}

st::DType StorageDType(const ModelConfig& cfg) {
  if (cfg.torch_dtype == "bfloat16") return st::DType::kBF16;
  if (cfg.torch_dtype == "float16") return st::DType::kF16;
  return st::DType::kF32;
}

StatusOr<ModelConfig> LoadConfig(const std::string& dir) {
  BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(dir + "/config.json"));
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return InvalidArgument(dir + "/config.json: " + e.what());
  }
  auto c = ConfigFromHfJson(j);
  if (!c.ok()) return c.status().With(dir + "/config.json");
  return c;
}

StatusOr<HfTensorSource> HfTensorSource::Open(const std::string& dir) {
  HfTensorSource s;
  s.dir_ = dir;
  if (!fs::is_directory(dir)) return NotFound("model dir " + dir + " does not exist");
  BTX_ASSIGN_OR_RETURN(s.cfg_, LoadConfig(dir));
  std::vector<std::string> files;
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::exists(index)) {
    BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(index));
    try {
      json j = json::parse(text);
      for (auto& [k, v] : j.at("weight_map").items()) {
        std::string f = v.get<std::string>();
        if (f.find('/') != std::string::npos) return DataLoss(index + ": shard name '" + f + "' is not a plain file name");
        if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
      }
    } catch (const std::exception& e) {
      return DataLoss(index + ": " + e.what());
    }
    std::sort(files.begin(), files.end());
  } else if (fs::exists(dir + "/model.safetensors")) {
    files.push_back("model.safetensors");
  } else {
    return NotFound(dir + ": no model.safetensors or model.safetensors.index.json (only safetensors are supported)");
  }
  for (const auto& f : files) {
    BTX_ASSIGN_OR_RETURN(auto file, st::File::Open(dir + "/" + f));
    for (const auto& t : file->tensors()) s.where_.emplace_back(t.name, s.files_.size());
    s.files_.push_back(file);
  }
  std::sort(s.where_.begin(), s.where_.end());
  for (size_t i = 1; i < s.where_.size(); ++i)
    if (s.where_[i].first == s.where_[i - 1].first) return DataLoss(dir + ": tensor '" + s.where_[i].first + "' appears twice");
  return s;
}

bool HfTensorSource::Has(const std::string& name) const {
  auto it = std::lower_bound(where_.begin(), where_.end(), std::make_pair(name, size_t{0}));
  return it != where_.end() && it->first == name;
}

StatusOr<at::Tensor> HfTensorSource::Load(const std::string& name) const {
  auto it = std::lower_bound(where_.begin(), where_.end(), std::make_pair(name, size_t{0}));
  if (it == where_.end() || it->first != name) return NotFound(dir_ + ": missing tensor '" + name + "'");
  return files_[it->second]->Load(name);
}

std::vector<std::string> HfTensorSource::Names() const {
  std::vector<std::string> out;
  for (auto& w : where_) out.push_back(w.first);
  return out;
}

StatusOr<LlamaModel> LoadModelDir(const std::string& dir) {
  if (fs::exists(dir + "/" + kManifestName)) BTX_RETURN_IF_ERROR(VerifyManifest(dir));
  BTX_ASSIGN_OR_RETURN(HfTensorSource src, HfTensorSource::Open(dir));
  const ModelConfig& cfg = src.config();
  std::vector<std::pair<std::string, at::Tensor>> t;
  for (auto& [name, shape] : LlamaModel::Layout(cfg)) {
    if (IsStacked(name)) {
      std::vector<at::Tensor> parts;
      for (int64_t e = 0; e < shape[0]; ++e) {
        BTX_ASSIGN_OR_RETURN(at::Tensor x, src.Load(HfMoeName(cfg, ExpertName(name, e))));
        parts.push_back(x);
      }
      t.emplace_back(name, at::stack(parts));
    } else {
      BTX_ASSIGN_OR_RETURN(at::Tensor x, src.Load(HfMoeName(cfg, name)));
      t.emplace_back(name, x);
    }
  }
  std::vector<std::string> expected;
  for (const auto& spec : HfSpecs(cfg)) expected.push_back(spec.name);
  std::sort(expected.begin(), expected.end());
  for (const auto& n : src.Names()) {
    const bool known = std::binary_search(expected.begin(), expected.end(), n);
    // Older transformers saved the RoPE buffer; a tied model may still carry lm_head.
    if (!known && n.find("rotary_emb.inv_freq") == std::string::npos && !(cfg.tie_word_embeddings && n == "lm_head.weight"))
      return InvalidArgument(dir + ": unexpected tensor '" + n + "' for this config");
    if (known && MixtralStyleName(cfg, n).empty()) {
      // A Qwen2-MoE shared expert: btx's MoE has none, so only the all-zero one it writes is accepted.
      BTX_ASSIGN_OR_RETURN(at::Tensor x, src.Load(n));
      if (x.ne(0).any().item<bool>())
        return InvalidArgument(dir + ": tensor '" + n + "' is not zero: btx's MoE has no shared expert (a Qwen2-MoE " +
                               "with a trained shared expert is not supported)");
    }
  }
  auto m = LlamaModel::FromTensors(cfg, std::move(t));
  if (!m.ok()) return m.status().With(dir);
  return m;
}

}  // namespace btx::model
