#include "btx/model/eval.h"

#include <ATen/ATen.h>

#include <cmath>
#include <map>

#include "btx/model/data.h"
#include "btx/model/hf_io.h"
#include "btx/model/tokenizer.h"

namespace btx {

double EnsembleLoss(const std::vector<const LlamaModel*>& models, const std::vector<int32_t>& tokens, int64_t seq_len,
                    const EvalOptions& opts, std::vector<at::Tensor>* routing) {
  at::NoGradGuard ng;
  const int64_t n = static_cast<int64_t>(tokens.size());
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
      ForwardOutput out = m->Forward(input, fo);
      logp.push_back(at::log_softmax(out.logits[0].to(at::kDouble), -1));
      if (routing && models.size() == 1) {
        if (routing->empty()) *routing = out.expert_counts;
        else
          for (size_t l = 0; l < out.expert_counts.size(); ++l) (*routing)[l] += out.expert_counts[l];
      }
    }
    // log(mean_m p_m) computed stably in log space.
    at::Tensor mixed = at::logsumexp(at::stack(logp), 0) - std::log(static_cast<double>(models.size()));
    total -= mixed.gather(1, target).sum().item<double>();
    count += len;
  }
  return count ? total / static_cast<double>(count) : 0.0;
}

StatusOr<nlohmann::json> Evaluate(const std::vector<EvalModelSpec>& models, const std::vector<EvalDomainSpec>& domains,
                                  const EvalOptions& opts, const std::atomic<bool>* stop) {
  if (models.empty()) return InvalidArgument("spec.models: empty");
  if (domains.empty()) return InvalidArgument("spec.domains: empty");
  // Domain data is tokenized once with the first model's tokenizer; every model must share its vocabulary.
  const std::string& first = models.front().dirs.front();
  BTX_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(first));
  BTX_ASSIGN_OR_RETURN(ModelConfig first_cfg, LoadConfig(first));
  std::map<std::string, TokenStream> data;
  for (const auto& d : domains) {
    auto t = LoadTokens(d.valid, *tok, opts.max_tokens + 1, first_cfg.vocab_size);
    if (!t.ok()) return t.status().With("domain '" + d.name + "'");
    data[d.name] = *t;
  }
  nlohmann::json out = {{"models", nlohmann::json::object()}, {"domains", nlohmann::json::array()}};
  for (const auto& d : domains) out["domains"].push_back(d.name);
  for (const auto& spec : models) {
    std::vector<LlamaModel> loaded;
    for (const auto& dir : spec.dirs) {
      auto m = LoadModelDir(dir);
      if (!m.ok()) return m.status().With("model '" + spec.name + "'");
      if (m->config().vocab_size != first_cfg.vocab_size)
        return InvalidArgument("model '" + spec.name + "' has vocab_size " + std::to_string(m->config().vocab_size) +
                               ", the first model has " + std::to_string(first_cfg.vocab_size));
      loaded.push_back(std::move(*m));
    }
    std::vector<const LlamaModel*> ptrs;
    for (auto& m : loaded) ptrs.push_back(&m);
    nlohmann::json res = {{"domains", nlohmann::json::object()}};
    double sum = 0;
    for (const auto& d : domains) {
      if (stop && stop->load()) return Cancelled("evaluation interrupted");
      std::vector<at::Tensor> routing;
      const double loss = EnsembleLoss(ptrs, *data[d.name], opts.seq_len, opts, &routing);
      res["domains"][d.name] = {{"loss", loss}, {"ppl", std::exp(loss)},
                                {"tokens", static_cast<int64_t>(data[d.name]->size()) - 1}};
      if (!routing.empty()) {
        nlohmann::json layers = nlohmann::json::array();
        for (const at::Tensor& c : routing) {
          at::Tensor f = c.to(at::kDouble) / std::max<double>(1.0, c.sum().item<double>());
          layers.push_back(std::vector<double>(f.data_ptr<double>(), f.data_ptr<double>() + f.numel()));
        }
        res["domains"][d.name]["routing"] = layers;
      }
      sum += loss;
    }
    res["avg_loss"] = sum / static_cast<double>(domains.size());
    res["avg_ppl"] = std::exp(sum / static_cast<double>(domains.size()));
    if (spec.dirs.size() > 1) res["ensemble"] = spec.dirs;
    out["models"][spec.name] = res;
  }
  return out;
}

}  // namespace btx
