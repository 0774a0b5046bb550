#include "btx/model/merge.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <optional>
#include <nlohmann/json.hpp>

#include "btx/model/data.h"
#include "btx/model/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/llama.h"
#include "btx/model/tokenizer.h"

namespace btx {
namespace fs = std::filesystem;

Status ValidateMergeSpec(const MergeSpec& s) {
  if (s.method != "btx" && s.method != "upcycle" && s.method != "btm")
    return InvalidArgument("spec.method: must be btx, upcycle or btm, got '" + s.method + "'");
  if (s.router_init != "random" && s.router_init != "hidden")
    return InvalidArgument("spec.router_init: must be random or hidden, got '" + s.router_init + "'");
  if (s.method != "upcycle" && s.experts.empty()) return InvalidArgument("spec.experts: needs at least one expert");
  if ((s.method == "upcycle" || s.keep_seed_expert || s.router_init == "hidden") && s.seed.empty())
    return InvalidArgument("spec.seed: required for this merge");
  if (s.top_k < 1) return InvalidArgument("spec.top_k: must be >= 1");
  if (s.router_init == "hidden" && s.method == "btx")
    for (const auto& [name, dir] : s.experts)
      if (!s.prompts.count(name)) return InvalidArgument("spec.data: router_init=hidden needs prompts for expert '" + name + "'");
  return Status::Ok();
}

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
      a.num_key_value_heads != b.num_key_value_heads || a.tie_word_embeddings != b.tie_word_embeddings)
    return InvalidArgument(what + " has a different architecture than the first model");
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
}  // namespace

Status MergeToDir(const MergeSpec& s, const std::string& dir, const std::atomic<bool>* stop) {
  BTX_RETURN_IF_ERROR(ValidateMergeSpec(s));
  std::vector<HfTensorSource> experts;
  for (const auto& [name, path] : s.experts) {
    if (fs::exists(path + "/" + kManifestName)) BTX_RETURN_IF_ERROR(VerifyManifest(path));
    auto src = HfTensorSource::Open(path);
    if (!src.ok()) return src.status().With("expert '" + name + "'");
    experts.push_back(std::move(*src));
  }
  std::optional<HfTensorSource> seed;
  if (!s.seed.empty()) {
    if (fs::exists(s.seed + "/" + kManifestName)) BTX_RETURN_IF_ERROR(VerifyManifest(s.seed));
    auto src = HfTensorSource::Open(s.seed);
    if (!src.ok()) return src.status().With("seed");
    seed = std::move(*src);
  }
  const ModelConfig base = seed ? seed->config() : experts.front().config();
  for (size_t i = 0; i < experts.size(); ++i) BTX_RETURN_IF_ERROR(SameShape(base, experts[i].config(), "expert '" + s.experts[i].first + "'"));
  if (seed) BTX_RETURN_IF_ERROR(SameShape(base, seed->config(), "seed"));

  // Which sources are averaged for shared (non-expert) tensors, and which source each MoE expert copies.
  std::vector<const HfTensorSource*> averaged;
  std::vector<const HfTensorSource*> expert_src;
  if (s.method == "upcycle") {
    averaged = {&*seed};
    int64_t n = s.num_experts > 0 ? s.num_experts : (experts.empty() ? 4 : static_cast<int64_t>(experts.size()));
    expert_src.assign(n, &*seed);
  } else {
    for (auto& e : experts) averaged.push_back(&e), expert_src.push_back(&e);
    if (s.method == "btx" && s.keep_seed_expert) averaged.push_back(&*seed), expert_src.push_back(&*seed);
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
      BTX_ASSIGN_OR_RETURN(LlamaModel seed_model, LoadModelDir(s.seed));
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

  const auto specs = HfSpecs(out);
  auto produce = [&](size_t i) -> StatusOr<at::Tensor> {
    if (stop && stop->load()) return Cancelled("merge interrupted");
    const std::string& name = specs[i].name;
    ExpertRef ref;
    if (ParseExpertName(name, &ref)) {
      auto t = expert_src.at(ref.expert)->Load(ref.dense);
      if (!t.ok()) return t.status();
      return *t;
    }
    int layer = -1;
    // sscanf stops matching silently after %d, so the suffix is checked separately.
    if (name.ends_with(".block_sparse_moe.gate.weight") && std::sscanf(name.c_str(), "model.layers.%d.", &layer) == 1)
      return routers.at(layer);
    at::Tensor sum;
    for (const auto* src : averaged) {
      auto t = src->Load(name);
      if (!t.ok()) return t.status();
      at::Tensor x = t->to(at::kDouble);
      sum = sum.defined() ? sum.add_(x) : x;
    }
    return (sum / static_cast<double>(averaged.size())).to(at::kFloat);
  };
  BTX_RETURN_IF_ERROR(WriteFileDurable(dir + "/config.json", ConfigToHfJson(out).dump(2)));
  BTX_RETURN_IF_ERROR(WriteHfWeights(dir, specs, produce, s.max_shard_bytes));
  const std::string tok_dir = seed ? s.seed : s.experts.front().second;
  if (HasTokenizer(tok_dir)) {
    BTX_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(tok_dir));
    BTX_RETURN_IF_ERROR(tok->SaveTo(dir));
  }
  return Status::Ok();
}

}  // namespace btx
