#include "btx/model/eval.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>

#include "btx/model/data.h"
#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/tokenizer.h"

namespace btx::model {
using nlohmann::json;

namespace {
// Adds one window's routing. Which experts each position chose is recomputed from the layer's FFN input and
// router weight as the forward routes (softmax, top-k; SparseMixer's evaluation-mode choice is the same top-k),
// because the forward reports only per-expert counts. The tests check both agree.
void AddRouting(const LlamaModel& m, const at::Tensor& input, const ForwardOutput& out, RoutingStats* r) {
  const ModelConfig& c = m.config();
  const int64_t L = c.num_hidden_layers, E = c.num_local_experts, V = c.vocab_size;
  const int64_t k = std::min(c.num_experts_per_tok, E);
  if (r->expert_counts.empty()) {
    r->expert_counts = out.expert_counts;
    for (int64_t l = 0; l < L; ++l) r->token_expert.push_back(at::zeros({V, E}, at::kLong));
    r->token_count = at::zeros({V}, at::kLong);
  } else {
    for (int64_t l = 0; l < L; ++l) r->expert_counts[l] += out.expert_counts[l];
  }
  at::Tensor ids = input.reshape({-1}).to(at::kLong).cpu();
  r->token_count += at::bincount(ids, {}, V);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& h = out.ffn_inputs[l];
    at::Tensor logits = at::linear(h.reshape({-1, c.hidden_size}),
                                   m.param("model.layers." + std::to_string(l) + ".block_sparse_moe.gate.weight"));
    at::Tensor idx = std::get<1>(at::topk(at::softmax(logits, -1), k, -1)).cpu();  // [T, k]
    at::Tensor keys = (ids.unsqueeze(1) * E + idx).reshape({-1});
    r->token_expert[l] += at::bincount(keys, {}, V * E).reshape({V, E});
  }
}

std::string Hex2(unsigned v) {
  char b[8];
  std::snprintf(b, sizeof b, "<0x%02X>", v & 0xff);
  return b;
}

// Decodes each single id once: a sentencepiece decode runs the helper process, and the reports ask for the same
// ids in every layer.
class DecodeCache : public Tokenizer {
 public:
  explicit DecodeCache(const Tokenizer& t) : t_(t) {}
  std::vector<int32_t> Encode(std::string_view text) const override { return t_.Encode(text); }
  std::string Decode(const std::vector<int32_t>& ids) const override {
    if (ids.size() != 1) return t_.Decode(ids);
    auto it = cache_.find(ids[0]);
    if (it == cache_.end()) it = cache_.emplace(ids[0], t_.Decode(ids)).first;
    return it->second;
  }
  int64_t vocab_size() const override { return t_.vocab_size(); }
  int32_t bos_id() const override { return t_.bos_id(); }
  int32_t eos_id() const override { return t_.eos_id(); }
  std::string kind() const override { return t_.kind(); }
  Status SaveTo(const std::string& dir) const override { return t_.SaveTo(dir); }

 private:
  const Tokenizer& t_;
  mutable std::map<int32_t, std::string> cache_;
};

// Expert names for a model's reports: the spec's, else those the merge wrote into config.json.
std::vector<std::string> ExpertNames(const EvalModelSpec& spec, int64_t experts) {
  std::vector<std::string> names = spec.expert_names;
  if (names.empty()) {
    auto text = ReadFile(spec.dirs.front() + "/config.json");
    json j = text.ok() ? json::parse(*text, nullptr, false) : json();
    if (j.is_object() && j.contains("btx_expert_names") && j["btx_expert_names"].is_array())
      for (const auto& n : j["btx_expert_names"])
        if (n.is_string()) names.push_back(n.get<std::string>());
  }
  if (static_cast<int64_t>(names.size()) != experts) names.clear();
  return names;
}
}  // namespace

std::string TokenText(const Tokenizer& tok, int32_t id) {
  if (id == tok.bos_id()) return "<bos>";
  if (id == tok.eos_id()) return "<eos>";
  if (tok.kind() == "byte" && id == kBytePad) return "<pad>";
  const std::string s = tok.Decode({id});
  if (s.empty()) return "<id " + std::to_string(id) + ">";
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\n') out += "\\n", ++i;
    else if (c == '\t') out += "\\t", ++i;
    else if (c == '\r') out += "\\r", ++i;
    else if (c >= 0x20 && c < 0x7f) out.push_back(static_cast<char>(c)), ++i;
    else if (c < 0x80) out += Hex2(c), ++i;
    else {
      // A whole, valid UTF-8 sequence (not overlong, no surrogates) is kept; anything else is shown byte by byte,
      // which also keeps the JSON writer, which refuses invalid UTF-8, happy.
      const int n = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
      bool ok = n > 0 && i + n <= s.size();
      for (int j = 1; ok && j < n; ++j) ok = (static_cast<unsigned char>(s[i + j]) & 0xc0) == 0x80;
      if (ok && n == 3) {
        const auto c1 = static_cast<unsigned char>(s[i + 1]);
        ok = !(c == 0xe0 && c1 < 0xa0) && !(c == 0xed && c1 >= 0xa0);
      }
      if (ok && n == 4) {
        const auto c1 = static_cast<unsigned char>(s[i + 1]);
        ok = !(c == 0xf0 && c1 < 0x90) && !(c == 0xf4 && c1 >= 0x90);
      }
      if (ok) out.append(s, i, n), i += n;
      else out += Hex2(c), ++i;
    }
  }
  return out;
}

double EnsembleLoss(const std::vector<const LlamaModel*>& models, const std::vector<int32_t>& tokens, int64_t seq_len,
                    const EvalOptions& opts, RoutingStats* routing, const std::vector<uint8_t>* loss) {
  at::NoGradGuard ng;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const bool route = routing && models.size() == 1 && models.front()->config().is_moe();
  double total = 0;
  int64_t count = 0;
  for (int64_t start = 0; start + 1 < n; start += seq_len) {
    const int64_t len = std::min(seq_len, n - 1 - start);
    at::Tensor seq = at::empty({1, len + 1}, at::kLong);
    for (int64_t i = 0; i <= len; ++i) seq.data_ptr<int64_t>()[i] = tokens[start + i];
    at::Tensor input = seq.narrow(1, 0, len), target = seq.narrow(1, 1, len).reshape({len, 1});
    std::vector<at::Tensor> logp;
    for (const LlamaModel* m : models) {
      ForwardOptions fo;
      fo.backend = opts.backend;
      fo.collect_ffn_inputs = route;
      ForwardOutput out = m->Forward(input, fo);
      logp.push_back(at::log_softmax(out.logits[0].to(at::kDouble), -1));
      if (route) AddRouting(*m, input, out, routing);
    }
    // log(mean_m p_m) computed stably in log space.
    at::Tensor mixed = at::logsumexp(at::stack(logp), 0) - std::log(static_cast<double>(models.size()));
    at::Tensor nll = -mixed.gather(1, target).reshape({len});
    if (loss) {
      at::Tensor counted = at::empty({len}, at::kDouble);
      for (int64_t i = 0; i < len; ++i) counted.data_ptr<double>()[i] = (*loss)[start + 1 + i];
      total += (nll * counted.to(nll.device())).sum().item<double>();
      count += static_cast<int64_t>(counted.sum().item<double>());
      continue;
    }
    total += nll.sum().item<double>();
    count += len;
  }
  return count ? total / static_cast<double>(count) : 0.0;
}

json TokenSpecialization(const at::Tensor& token_expert, const at::Tensor& token_count, int64_t min_count,
                         int64_t top_tokens, const Tokenizer* tok, const std::vector<std::string>& expert_names) {
  const at::Tensor te = token_expert.to(at::kLong).contiguous(), tc = token_count.to(at::kLong).contiguous();
  const int64_t V = te.size(0), E = te.size(1);
  const int64_t* c = te.data_ptr<int64_t>();
  const int64_t* n = tc.data_ptr<int64_t>();
  struct Entry {
    int64_t id, count;
    double share;
  };
  std::vector<std::vector<Entry>> owned(E);
  std::vector<int64_t> chose(E, 0);  // occurrences of scored ids that chose expert e
  int64_t occurrences = 0, ids = 0;
  double weighted = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (n[v] < std::max<int64_t>(min_count, 1)) continue;
    int64_t best = 0;
    for (int64_t e = 1; e < E; ++e)
      if (c[v * E + e] > c[v * E + best]) best = e;  // ties go to the lower expert index
    for (int64_t e = 0; e < E; ++e) chose[e] += c[v * E + e];
    const double share = static_cast<double>(c[v * E + best]) / static_cast<double>(n[v]);
    weighted += share * static_cast<double>(n[v]);
    occurrences += n[v];
    ++ids;
    owned[best].push_back({v, c[v * E + best], share});
  }
  const double total = static_cast<double>(std::max<int64_t>(occurrences, 1));
  json out = {{"score", occurrences ? weighted / total : 0.0},
              {"baseline", occurrences ? static_cast<double>(*std::max_element(chose.begin(), chose.end())) / total : 0.0},
              {"tokens", occurrences},
              {"token_ids", ids},
              {"experts", json::array()}};
  for (int64_t e = 0; e < E; ++e) {
    auto& list = owned[e];
    std::sort(list.begin(), list.end(), [](const Entry& a, const Entry& b) {
      return a.count != b.count ? a.count > b.count : a.id < b.id;
    });
    json x = {{"expert", e}, {"token_ids", static_cast<int64_t>(list.size())}, {"top", json::array()}};
    if (static_cast<int64_t>(expert_names.size()) == E) x["name"] = expert_names[e];
    for (size_t i = 0; i < list.size() && static_cast<int64_t>(i) < top_tokens; ++i) {
      json t = {{"id", list[i].id}, {"count", list[i].count}, {"share", list[i].share}};
      if (tok) t["text"] = TokenText(*tok, static_cast<int32_t>(list[i].id));
      x["top"].push_back(t);
    }
    out["experts"].push_back(x);
  }
  return out;
}

StatusOr<json> Evaluate(const std::vector<EvalModelSpec>& models, const std::vector<EvalDomainSpec>& domains,
                        const EvalOptions& opts, const std::atomic<bool>* stop) {
  if (models.empty()) return InvalidArgument("spec.models: empty");
  if (domains.empty()) return InvalidArgument("spec.domains: empty");
  // Domain data is tokenized once with the first model's tokenizer; every model must share its vocabulary.
  const std::string& first = models.front().dirs.front();
  BTX_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(first));
  BTX_ASSIGN_OR_RETURN(ModelConfig first_cfg, LoadConfig(first));
  std::map<std::string, TokenStream> data;
  std::map<std::string, LossMask> masks;  // chat domains: only assistant tokens count
  for (const auto& d : domains) {
    auto t = LoadData(d.valid, *tok, DataFormatOptions{}, opts.max_tokens + 1, first_cfg.vocab_size);
    if (!t.ok()) return t.status().With("domain '" + d.name + "'");
    data[d.name] = t->tokens;
    masks[d.name] = t->loss;
  }
  json out = {{"models", json::object()}, {"domains", json::array()}};
  for (const auto& d : domains) out["domains"].push_back(d.name);
  const DecodeCache decode(*tok);
  for (const auto& spec : models) {
    std::vector<LlamaModel> loaded;
    for (const auto& dir : spec.dirs) {
      auto m = LoadModelDir(dir);
      if (!m.ok()) return m.status().With("model '" + spec.name + "'");
      if (m->config().vocab_size != first_cfg.vocab_size)
        return InvalidArgument("model '" + spec.name + "' has vocab_size " + std::to_string(m->config().vocab_size) +
                               ", the first model has " + std::to_string(first_cfg.vocab_size));
      BTX_RETURN_IF_ERROR(m->config().CheckSeqLen(opts.seq_len).With("seq_len (model '" + spec.name + "')"));
      loaded.push_back(std::move(*m));
    }
    std::vector<const LlamaModel*> ptrs;
    for (auto& m : loaded) ptrs.push_back(&m);
    const bool moe = loaded.size() == 1 && loaded.front().config().is_moe();
    std::vector<std::string> names;
    if (moe) {
      names = ExpertNames(spec, loaded.front().config().num_local_experts);
      if (!spec.expert_names.empty() && names.empty())
        return InvalidArgument("model '" + spec.name + "': expert_names lists " + std::to_string(spec.expert_names.size()) +
                               " names for " + std::to_string(loaded.front().config().num_local_experts) + " experts");
    }
    json res = {{"domains", json::object()}};
    RoutingStats all;  // over every domain, for token specialization
    double sum = 0;
    for (const auto& d : domains) {
      if (stop && stop->load()) return Cancelled("evaluation interrupted");
      RoutingStats routing;
      const double loss = EnsembleLoss(ptrs, *data[d.name], opts.seq_len, opts, moe ? &routing : nullptr, masks[d.name].get());
      res["domains"][d.name] = {{"loss", loss}, {"ppl", std::exp(loss)},
                                {"tokens", static_cast<int64_t>(data[d.name]->size()) - 1}};
      if (!routing.expert_counts.empty()) {
        json layers = json::array();
        for (const at::Tensor& c : routing.expert_counts) {
          at::Tensor f = c.to(at::kDouble) / std::max<double>(1.0, c.sum().item<double>());
          layers.push_back(std::vector<double>(f.data_ptr<double>(), f.data_ptr<double>() + f.numel()));
        }
        res["domains"][d.name]["routing"] = layers;
        if (all.token_count.defined()) {
          all.token_count += routing.token_count;
          for (size_t l = 0; l < all.token_expert.size(); ++l) all.token_expert[l] += routing.token_expert[l];
        } else {
          all = routing;
        }
      }
      sum += loss;
    }
    res["avg_loss"] = sum / static_cast<double>(domains.size());
    res["avg_ppl"] = std::exp(sum / static_cast<double>(domains.size()));
    if (spec.dirs.size() > 1) res["ensemble"] = spec.dirs;
    if (!names.empty()) res["expert_names"] = names;
    if (all.token_count.defined()) {
      json layers = json::array();
      for (const at::Tensor& te : all.token_expert)
        layers.push_back(TokenSpecialization(te, all.token_count, opts.min_token_count, opts.top_tokens, &decode, names));
      res["token_specialization"] = {{"min_count", opts.min_token_count},
                                     {"top_k", loaded.front().config().num_experts_per_tok},
                                     {"layers", layers}};
    }
    out["models"][spec.name] = res;
  }
  return out;
}

}  // namespace btx::model
