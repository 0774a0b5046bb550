// Per-domain validation loss / perplexity of models and of ensembles of dense models.
#pragma once

#include <atomic>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "btx/model/llama.h"
#include "btx/model/status.h"

namespace btx {

struct EvalModelSpec {
  std::string name;
  std::vector<std::string> dirs;  // one dir: a model; several: an ensemble (mean of next-token probabilities)
};
struct EvalDomainSpec {
  std::string name;
  std::vector<std::string> valid;
};
struct EvalOptions {
  int64_t max_tokens = 65536;  // per domain
  int64_t seq_len = 256;
  MoeBackend backend = MoeBackend::kKernels;
};

// Mean next-token NLL (nats) of tokens under the models' averaged probabilities, over non-overlapping windows.
// For a single MoE model, `routing` (when given) receives per-layer [E] int64 (token, slot) assignment counts.
double EnsembleLoss(const std::vector<const LlamaModel*>& models, const std::vector<int32_t>& tokens, int64_t seq_len,
                    const EvalOptions& opts, std::vector<at::Tensor>* routing = nullptr);

// {"models": {name: {"domains": {d: {"loss", "ppl", "tokens", "routing"?}}, "avg_loss", "avg_ppl"}}, "domains": [...]}
// MoE models also report "routing": per layer, the fraction of (token, slot) assignments each expert received.
StatusOr<nlohmann::json> Evaluate(const std::vector<EvalModelSpec>& models, const std::vector<EvalDomainSpec>& domains,
                                  const EvalOptions& opts, const std::atomic<bool>* stop = nullptr);

}  // namespace btx
