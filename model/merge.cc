#include "btx/model/merge.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <future>
#include <optional>
#include <memory>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "btx/model/data.h"
#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/llama.h"
#include "btx/model/safetensors.h"
#include "btx/model/tokenizer.h"

namespace btx::model {
namespace fs = std::filesystem;


namespace {
// Dense FFN name in the source for an HF expert tensor name "....experts.E.wK.weight".
struct ExpertRef {
  int64_t layer, expert;
  std::string dense;
};
bool ParseExpertName(const std::string& n, ExpertRef* r) {
  int layer = -1, expert = -1;
  char w[8] = {0};
  if (std::sscanf(n.c_str(), "model.layers.%d.block_sparse_moe.experts.%d.%2s", &layer, &expert, w) != 3) return false;
  const std::string k = w;
  const char* proj = k == "w1" ? "gate_proj" : k == "w3" ? "up_proj" : k == "w2" ? "down_proj" : nullptr;
  if (!proj) return false;
  r->layer = layer;
  r->expert = expert;
  r->dense = "model.layers." + std::to_string(layer) + ".mlp." + proj + ".weight";
  return true;
}

Status SameShape(const ModelConfig& a, const ModelConfig& b, const std::string& what) {
  if (a.vocab_size != b.vocab_size || a.hidden_size != b.hidden_size || a.intermediate_size != b.intermediate_size ||
      a.num_hidden_layers != b.num_hidden_layers || a.num_attention_heads != b.num_attention_heads ||
      a.num_key_value_heads != b.num_key_value_heads || a.tie_word_embeddings != b.tie_word_embeddings ||
      a.head_dim() != b.head_dim() || a.qkv_bias != b.qkv_bias || a.o_bias != b.o_bias || !(a.rope_scaling == b.rope_scaling) ||
      a.rope_theta != b.rope_theta)
    return InvalidArgument(what + " has a different architecture than the first model");
  if (a.model_type != b.model_type || a.hidden_act != b.hidden_act || a.rms_norm_eps != b.rms_norm_eps)
    return InvalidArgument(what + " is a " + b.model_type + " (" + b.hidden_act + ") model, the first a " + a.model_type +
                           " (" + a.hidden_act + ") one");
  if (a.is_moe() || b.is_moe()) return InvalidArgument(what + " is not a dense Llama model");
  return Status::Ok();
}

// Mean normalised FFN input of the seed model per layer over `tokens`: [L, D].
StatusOr<at::Tensor> MeanHidden(const LlamaModel& seed, const std::vector<int32_t>& tokens, int64_t max_tokens) {
  const int64_t chunk = 256, n = std::min<int64_t>(static_cast<int64_t>(tokens.size()), max_tokens);
  if (n < 2) return InvalidArgument("router_init=hidden: prompts are empty");
  at::NoGradGuard ng;
  const auto& c = seed.config();
  at::Tensor sum = at::zeros({c.num_hidden_layers, c.hidden_size}, at::kDouble);
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t len = std::min(chunk, n - s);
    at::Tensor t = at::empty({1, len}, at::kLong);
    for (int64_t i = 0; i < len; ++i) t.data_ptr<int64_t>()[i] = tokens[s + i];
    ForwardOptions fo;
    fo.collect_ffn_inputs = true;
    auto out = seed.Forward(t, fo);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) sum[l] += out.ffn_inputs[l][0].to(at::kDouble).sum(0);
  }
  at::Tensor mean = sum / static_cast<double>(n);
  return (mean / mean.norm(2, {1}, true).clamp_min(1e-12)).to(at::kFloat);
}

// Maps the pages of [p, p + n) before they are used. write() from a mapping whose pages are not mapped yet
// takes a slow path for every page (the copy faults, gives up, faults the page in and retries), which made
// writing from the mappings 2-4x slower than cp; populating the range first costs one call.
void Prefault(const uint8_t* p, size_t n) {
  if (n == 0) return;
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older kernels answer EINVAL and the pages are touched instead
#endif
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(page - 1), e = reinterpret_cast<uintptr_t>(p) + n;
  if (::madvise(reinterpret_cast<void*>(a), e - a, MADV_POPULATE_READ) == 0) return;
  volatile uint8_t sink = 0;
  for (uintptr_t q = a; q < e; q += page) sink = sink + *reinterpret_cast<const uint8_t*>(q);
}

// An input model's tensors as read-only views into its mapped safetensors files. A merge mostly moves bytes:
// expert FFNs are copied verbatim and the rest is averaged, so the output is written straight from the
// mappings (no copy into a tensor first) and the averages are computed in one pass over them.
class MappedModel {
 public:
  static StatusOr<std::unique_ptr<MappedModel>> Open(const std::string& dir) {
    auto m = std::unique_ptr<MappedModel>(new MappedModel());
    m->dir_ = dir;
    BTX_ASSIGN_OR_RETURN(m->cfg_, LoadConfig(dir));
    // Kept for what the fast path does not cover: tensors stored as f16/bf16 (converted) or misaligned, and the
    // checks of the shard index (e.g. shard names that are not plain file names), which run before mapping.
    BTX_ASSIGN_OR_RETURN(HfTensorSource src, HfTensorSource::Open(dir));
    m->src_ = std::make_unique<HfTensorSource>(std::move(src));
    std::vector<std::string> files;
    const std::string index = dir + "/model.safetensors.index.json";
    if (fs::exists(index)) {
      BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(index));
      nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
      if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object())
        return DataLoss(index + ": no weight_map");
      for (auto& [k, v] : j["weight_map"].items())
        if (v.is_string() && std::find(files.begin(), files.end(), v.get<std::string>()) == files.end())
          files.push_back(v.get<std::string>());
      std::sort(files.begin(), files.end());
    } else {
      files.push_back("model.safetensors");
    }
    for (const auto& f : files) {
      BTX_RETURN_IF_ERROR(m->Map(dir + "/" + f));
    }
    return m;
  }
  const ModelConfig& config() const { return cfg_; }

  // A float32 tensor: a view of the mapped bytes when they are float32 and 4-byte aligned (valid while this
  // object lives; never written to), else a converted copy.
  StatusOr<at::Tensor> Get(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) return src_->Load(name);  // reports the missing tensor as a load would
    const auto& [data, info] = it->second;
    if (info->dtype != st::DType::kF32 || reinterpret_cast<uintptr_t>(data) % alignof(float) != 0) return src_->Load(name);
    Prefault(data, info->end - info->begin);
    return at::from_blob(const_cast<uint8_t*>(data), info->shape, at::TensorOptions().dtype(at::kFloat));
  }
  // Starts reading the tensor's pages from disk in the background, when they are not cached yet.
  void WillNeed(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) return;
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t a = reinterpret_cast<uintptr_t>(it->second.first) & ~(page - 1);
    const uintptr_t e = reinterpret_cast<uintptr_t>(it->second.first) + (it->second.second->end - it->second.second->begin);
    if (e > a) ::madvise(reinterpret_cast<void*>(a), e - a, MADV_WILLNEED);
  }
  // The raw float32 bytes (possibly unaligned), or nullptr when the tensor is stored in another dtype.
  const uint8_t* F32Bytes(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end() || it->second.second->dtype != st::DType::kF32) return nullptr;
    Prefault(it->second.first, it->second.second->end - it->second.second->begin);
    return it->second.first;
  }

 private:
  MappedModel() = default;
  Status Map(const std::string& path) {
    auto file = st::File::Open(path);
    if (!file.ok()) return file.status();
    // Inputs are consumed about in file order (layer by layer): read ahead, and drop pages behind.
    (*file)->Advise(MADV_SEQUENTIAL);
    for (const auto& t : (*file)->tensors())
      if (!where_.emplace(t.name, std::make_pair((*file)->RawBytes(t), &t)).second)
        return DataLoss(dir_ + ": tensor '" + t.name + "' appears twice");
    files_.push_back(std::move(*file));
    return Status::Ok();
  }
  std::string dir_;
  ModelConfig cfg_;
  std::unique_ptr<HfTensorSource> src_;
  std::vector<std::shared_ptr<st::File>> files_;  // where_ points into their mappings and tensor lists
  std::unordered_map<std::string, std::pair<const uint8_t*, const st::TensorInfo*>> where_;
};

// Starts write-back of what the output files hold so far after every 32 MiB produced, so that the disk writes
// while the merge copies and the writer's final fsync waits for the last stretch only, not the whole file.
class WritebackKicker {
 public:
  explicit WritebackKicker(std::string dir) : dir_(std::move(dir)) {}
  void Produced(uint64_t bytes) {
    pending_ += bytes;
    if (pending_ < (32ull << 20)) return;
    pending_ = 0;
#ifdef __linux__
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir_, ec)) {
      if (e.path().extension() != ".safetensors") continue;
      int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) continue;
      ::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);  // a hint: failures change nothing
      ::close(fd);
    }
#endif
  }

 private:
  std::string dir_;
  uint64_t pending_ = 0;
};

// Float64 mean of equally shaped float32 tensors given as raw (possibly unaligned) bytes, in one pass.
void MeanF32(const std::vector<const uint8_t*>& srcs, int64_t n, float* out) {
  const double k = static_cast<double>(srcs.size());
  constexpr int64_t kBlock = 4096;
  double acc[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    for (size_t s = 0; s < srcs.size(); ++s) {
      const uint8_t* p = srcs[s] + 4 * b;
      for (int64_t i = 0; i < len; ++i) {
        float x;
        std::memcpy(&x, p + 4 * i, 4);
        acc[i] = s == 0 ? static_cast<double>(x) : acc[i] + static_cast<double>(x);
      }
    }
    for (int64_t i = 0; i < len; ++i) out[b + i] = static_cast<float>(acc[i] / k);
  }
}

Status MergeUnverified(const MergeSpec& s, const std::string& dir, const std::atomic<bool>* stop,
                       FileDigests* weight_digests);
}  // namespace

Status MergeToDir(const MergeSpec& s, const std::string& dir, const std::atomic<bool>* stop,
                  FileDigests* weight_digests) {
  // Checking the inputs' manifests hashes every input byte, which costs more CPU than the merge itself. It runs
  // beside the merge (which reads the same, cached pages), one input dir per thread on as many threads as the job
  // may use (the merge's own thread mostly waits for the kernel to copy), and the merge fails if any check does.
  // Nothing is published before this returns.
  std::vector<std::string> to_verify;
  auto add = [&](const std::string& d) {
    if (fs::exists(d + "/" + kManifestName) && std::find(to_verify.begin(), to_verify.end(), d) == to_verify.end())
      to_verify.push_back(d);
  };
  // Only inputs whose weights are read: upcycling reads the seed alone, the seed of a BTX merge is read when it
  // is kept as an expert or initialises the routers.
  if (s.method != "upcycle")
    for (const auto& [name, path] : s.experts) add(path);
  if (s.method == "upcycle" || (s.method == "btx" && (s.keep_seed_expert || s.router_init == "hidden"))) add(s.seed);
  std::atomic<bool> give_up{false};
  std::atomic<size_t> next{0};
  std::vector<std::future<Status>> checks;
  const size_t threads = std::min<size_t>(to_verify.size(), std::max(1, at::get_num_threads()));
  for (size_t t = 0; t < threads; ++t)
    checks.push_back(std::async(std::launch::async, [&] {
      for (size_t i = next++; i < to_verify.size(); i = next++) {
        if (give_up.load() || (stop && stop->load())) return Cancelled("merge interrupted");
        Status st = VerifyManifest(to_verify[i]);
        if (!st.ok()) {
          give_up = true;
          return st;
        }
      }
      return Status::Ok();
    }));
  Status merged = MergeUnverified(s, dir, stop, weight_digests);
  if (!merged.ok()) give_up = true;
  Status check = Status::Ok();
  for (auto& c : checks) {
    Status st = c.get();
    // A corrupt input explains whatever else went wrong, so it is the error reported.
    if (!st.ok() && (check.ok() || check.code() == StatusCode::kCancelled)) check = st;
  }
  if (!check.ok() && check.code() != StatusCode::kCancelled) return check;
  BTX_RETURN_IF_ERROR(merged);
  return check;
}

namespace {
Status MergeUnverified(const MergeSpec& s, const std::string& dir, const std::atomic<bool>* stop,
                       FileDigests* weight_digests) {
  std::vector<std::unique_ptr<MappedModel>> experts;
  for (const auto& [name, path] : s.experts) {
    auto src = MappedModel::Open(path);
    if (!src.ok()) return src.status().With("expert '" + name + "'");
    experts.push_back(std::move(*src));
  }
  std::unique_ptr<MappedModel> seed;
  if (!s.seed.empty()) {
    auto src = MappedModel::Open(s.seed);
    if (!src.ok()) return src.status().With("seed");
    seed = std::move(*src);
  }
  const ModelConfig base = seed ? seed->config() : experts.front()->config();
  for (size_t i = 0; i < experts.size(); ++i) BTX_RETURN_IF_ERROR(SameShape(base, experts[i]->config(), "expert '" + s.experts[i].first + "'"));
  if (seed) BTX_RETURN_IF_ERROR(SameShape(base, seed->config(), "seed"));

  // Which sources are averaged for shared (non-expert) tensors, and which source each MoE expert copies.
  std::vector<const MappedModel*> averaged;
  std::vector<const MappedModel*> expert_src;
  if (s.method == "upcycle") {
    averaged = {seed.get()};
    int64_t n = s.num_experts > 0 ? s.num_experts : (experts.empty() ? 4 : static_cast<int64_t>(experts.size()));
    expert_src.assign(n, seed.get());
  } else {
    for (auto& e : experts) averaged.push_back(e.get()), expert_src.push_back(e.get());
    if (s.method == "btx" && s.keep_seed_expert) averaged.push_back(seed.get()), expert_src.push_back(seed.get());
  }
  // Each family's MoE layout (Mixtral, Qwen2-MoE, btx_gemma_moe) says what it can hold; out.Validate() below
  // refuses the rest (e.g. Llama's attention_bias, Mistral-Nemo's head_dim in a Mixtral), naming the feature.
  if (s.method != "btm" && (base.qkv_bias || base.o_bias) && base.model_type != "qwen2" && base.model_type != "gemma") {
    return InvalidArgument("a " + base.model_type + " model with attention biases cannot be mixed into a Mixtral MoE " +
                           "(no attention biases); only method btm (a dense average) supports it");
  }
  if (s.method != "btm" && base.explicit_head_dim > 0 && base.model_type != "gemma") {
    return InvalidArgument("head_dim " + std::to_string(base.head_dim()) + " differs from hidden_size / num_attention_heads, " +
                           "which " + (base.model_type == "qwen2" ? "Qwen2-MoE" : "Mixtral") +
                           " (as transformers 4.46 loads it) cannot express; only method btm supports it");
  }
  ModelConfig out = base;
  if (s.method != "btm") {
    out.num_local_experts = static_cast<int64_t>(expert_src.size());
    out.num_experts_per_tok = std::min<int64_t>(s.top_k, out.num_local_experts);
  }
  BTX_RETURN_IF_ERROR(out.Validate());

  // Routers are small (E x D per layer) and computed up front.
  std::vector<at::Tensor> routers;
  if (out.is_moe()) {
    const int64_t E = out.num_local_experts, L = out.num_hidden_layers, D = out.hidden_size;
    if (s.router_init == "random" || s.method == "upcycle") {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(s.random_seed);
      for (int64_t l = 0; l < L; ++l) routers.push_back(at::normal(0.0, out.initializer_range, {E, D}, gen, at::kFloat));
    } else {
      // Not LoadModelDir: that would hash the seed a second time, beside the check already running.
      std::vector<std::pair<std::string, at::Tensor>> weights;
      for (const auto& [name, shape] : LlamaModel::Layout(seed->config())) {
        BTX_ASSIGN_OR_RETURN(at::Tensor t, seed->Get(name));
        weights.emplace_back(name, t.clone());
      }
      BTX_ASSIGN_OR_RETURN(LlamaModel seed_model, LlamaModel::FromTensors(seed->config(), std::move(weights)));
      BTX_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(s.seed));
      std::vector<at::Tensor> rows;  // per expert [L, D]
      std::vector<int32_t> all;
      for (const auto& [name, path] : s.experts) {
        auto tokens = LoadTokens(s.prompts.at(name), *tok, s.hidden_tokens, base.vocab_size);
        if (!tokens.ok()) return tokens.status().With("prompts of '" + name + "'");
        all.insert(all.end(), (*tokens)->begin(), (*tokens)->end());
        BTX_ASSIGN_OR_RETURN(at::Tensor h, MeanHidden(seed_model, **tokens, s.hidden_tokens));
        rows.push_back(h);
      }
      if (s.keep_seed_expert) {
        // The seed expert is the generalist: its row is the mean over every domain's prompts.
        BTX_ASSIGN_OR_RETURN(at::Tensor h, MeanHidden(seed_model, all, s.hidden_tokens * static_cast<int64_t>(s.experts.size())));
        rows.push_back(h);
      }
      at::Tensor stacked = at::stack(rows, 1);  // [L, E, D]
      for (int64_t l = 0; l < L; ++l) routers.push_back(stacked[l].contiguous());
    }
  }

  const auto specs = HfSpecs(out, StorageDType(out));
  // What each output tensor is: a copy of one input's tensor, a router, or the mean over `averaged`.
  std::vector<ExpertRef> refs(specs.size());
  std::vector<int> kind(specs.size(), 2);  // 0 expert copy, 1 router, 2 mean, 3 zeros (Qwen2-MoE's shared expert)
  std::vector<uint64_t> bytes(specs.size(), sizeof(float));
  for (size_t i = 0; i < specs.size(); ++i) {
    for (int64_t d : specs[i].shape) bytes[i] *= static_cast<uint64_t>(d);
    int layer = -1;
    const std::string name = MixtralStyleName(out, specs[i].name);  // the layouts differ in names only
    if (name.empty()) kind[i] = 3;
    else if (ParseExpertName(name, &refs[i])) kind[i] = 0;
    // sscanf stops matching silently after %d, so the suffix is checked separately.
    else if (name.ends_with(".block_sparse_moe.gate.weight") && std::sscanf(name.c_str(), "model.layers.%d.", &layer) == 1)
      kind[i] = 1, refs[i].layer = layer;
  }
  auto mean = [&](size_t i) -> StatusOr<at::Tensor> {
    const std::string& name = specs[i].name;
    if (averaged.size() == 1) return averaged[0]->Get(name);
    std::vector<const uint8_t*> raw;
    for (const auto* src : averaged) {
      const uint8_t* p = src->F32Bytes(name);
      if (!p) break;
      raw.push_back(p);
    }
    if (raw.size() == averaged.size()) {
      at::Tensor out = at::empty(specs[i].shape, at::kFloat);
      MeanF32(raw, out.numel(), out.data_ptr<float>());
      return out;
    }
    at::Tensor sum;  // some input is stored as f16/bf16 (or the tensor is missing: Get reports it)
    for (const auto* src : averaged) {
      auto t = src->Get(name);
      if (!t.ok()) return t.status();
      at::Tensor x = t->to(at::kDouble);
      sum = sum.defined() ? sum.add_(x) : x;
    }
    return (sum / static_cast<double>(averaged.size())).to(at::kFloat);
  };
  // The next mean is computed on another thread while the writer copies the current tensor out; at most one is
  // ahead, so at most two averaged tensors are in memory.
  std::optional<std::pair<size_t, std::future<StatusOr<at::Tensor>>>> ahead;
  auto launch_after = [&](size_t i) {
    size_t j = i + 1;
    while (j < specs.size() && kind[j] != 2) ++j;
    if (j < specs.size()) ahead.emplace(j, std::async(std::launch::async, mean, j));
  };
  WritebackKicker kick(dir);
  uint64_t produced = 0, readahead_bytes = 0;
  size_t readahead = 0;
  // Called for i = 0, 1, ... in order (across shards too).
  auto produce = [&](size_t i) -> StatusOr<at::Tensor> {
    if (stop && stop->load()) return Cancelled("merge interrupted");
    kick.Produced(bytes[i]);
    // Disk reads of the inputs of the next 256 MiB of output overlap the copy of this tensor (a cold cache would
    // otherwise be read tensor by tensor, from several files in turn).
    produced += bytes[i];
    for (; readahead < specs.size() && readahead_bytes < produced + (256ull << 20); ++readahead) {
      const size_t j = readahead;
      readahead_bytes += bytes[j];
      if (kind[j] == 0) expert_src.at(refs[j].expert)->WillNeed(refs[j].dense);
      else if (kind[j] == 2)
        for (const auto* src : averaged) src->WillNeed(specs[j].name);
    }
    if (ahead && ahead->first == i) {
      StatusOr<at::Tensor> r = ahead->second.get();
      ahead.reset();
      launch_after(i);
      return r;
    }
    if (!ahead) launch_after(i);
    if (kind[i] == 0) return expert_src.at(refs[i].expert)->Get(refs[i].dense);
    if (kind[i] == 1) return routers.at(refs[i].layer);
    if (kind[i] == 3) return at::zeros(specs[i].shape, at::kFloat);
    return mean(i);  // only a mean that nothing computed ahead: the first one
  };
  nlohmann::json config = ConfigToHfJson(out);
  if (out.is_moe()) {
    // Not an HF field (transformers keeps unknown fields as attributes); the evaluation labels experts with it.
    std::vector<std::string> names;
    if (s.method == "upcycle") {
      for (size_t e = 0; e < expert_src.size(); ++e) names.push_back("seed copy " + std::to_string(e));
    } else {
      for (const auto& [name, path] : s.experts) names.push_back(name);
      if (s.keep_seed_expert) names.push_back("seed");
    }
    config["btx_expert_names"] = names;
  }
  BTX_RETURN_IF_ERROR(WriteFileDurable(dir + "/config.json", config.dump(2)));
  BTX_RETURN_IF_ERROR(WriteHfWeights(dir, specs, produce, s.max_shard_bytes, weight_digests));
  const std::string tok_dir = seed ? s.seed : s.experts.front().second;
  if (HasTokenizer(tok_dir)) {
    BTX_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(tok_dir));
    BTX_RETURN_IF_ERROR(tok->SaveTo(dir));
  }
  return Status::Ok();
}
}  // namespace

}  // namespace btx::model
