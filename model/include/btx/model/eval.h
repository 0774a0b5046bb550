// Per-domain validation loss / perplexity of models and of ensembles of dense models, and routing analysis of
// MoE models: expert shares per layer and domain (BTX paper, Figure 3) and token-ID specialization (OpenMoE).
#pragma once

#include <atomic>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "btx/model/llama.h"
#include "btx/contract/specs.h"
#include "btx/contract/status.h"
#include "btx/model/tokenizer.h"

namespace btx::model {

using contract::EvalDomainSpec;
using contract::EvalModelSpec;

struct EvalOptions {
  int64_t max_tokens = 65536;  // per domain
  int64_t seq_len = 256;
  MoeBackend backend = MoeBackend::kKernels;
  int64_t top_tokens = 8;        // token specialization: tokens listed per expert and layer
  int64_t min_token_count = 4;   // token specialization: token ids seen fewer times are left out of the score
};

// Routing of one MoE model over some tokens, per layer.
struct RoutingStats {
  std::vector<at::Tensor> expert_counts;  // [E] int64: (position, slot) assignments, as the forward counts them
  std::vector<at::Tensor> token_expert;   // [V, E] int64: positions whose input token is v that chose expert e
  at::Tensor token_count;                 // [V] int64: positions whose input token is v
};

// Mean next-token NLL (nats) of tokens under the models' averaged probabilities, over non-overlapping windows.
// For a single MoE model, `routing` (when given) accumulates its routing over these tokens. With `loss` (chat data:
// one flag per token), only the tokens it flags count.
double EnsembleLoss(const std::vector<const LlamaModel*>& models, const std::vector<int32_t>& tokens, int64_t seq_len,
                    const EvalOptions& opts, RoutingStats* routing = nullptr, const std::vector<uint8_t>* loss = nullptr);

// Token-ID specialization of one layer from RoutingStats::token_expert[l] and token_count. For each token id
// with at least min_count occurrences, its top expert is the one most of its occurrences chose and its
// share is the fraction of occurrences that chose it; the layer's score is the mean share weighted by
// occurrences (1 = every token id always reaches its own expert). baseline is the score of a router that
// ignores token ids (each occurrence picks experts with the layer's overall frequencies): the largest
// fraction of occurrences that chose any one expert. Per expert, the token ids whose top expert it is, by
// count. {"score", "baseline", "tokens" (occurrences scored), "token_ids" (distinct ids scored),
//  "experts": [{"expert", "name"?, "token_ids", "top": [{"id", "text", "count", "share"}]}]}
nlohmann::json TokenSpecialization(const at::Tensor& token_expert, const at::Tensor& token_count, int64_t min_count,
                                   int64_t top_tokens, const Tokenizer* tok,
                                   const std::vector<std::string>& expert_names = {});
// A token as printable text for reports: ASCII as is, "\n" "\t" escaped, other bytes and invalid UTF-8 as
// <0xNN>, special ids as <bos> / <eos> / <pad>, an empty decoding as <id N>.
std::string TokenText(const Tokenizer& tok, int32_t id);

// {"models": {name: {"domains": {d: {"loss", "ppl", "tokens", "routing"?}}, "avg_loss", "avg_ppl",
//                    "expert_names"?, "token_specialization"?}}, "domains": [...]}
// MoE models also report "routing": per layer, the fraction of (token, slot) assignments each expert received,
// and "token_specialization": {"min_count", "top_k", "layers": [TokenSpecialization per layer]} over all domains.
StatusOr<nlohmann::json> Evaluate(const std::vector<EvalModelSpec>& models, const std::vector<EvalDomainSpec>& domains,
                                  const EvalOptions& opts, const std::atomic<bool>* stop = nullptr);

// Plain-text tables of an Evaluate result: losses per domain, then per MoE model the routing shares per layer
// and domain and the token specialization per layer with each expert's top tokens.
std::string EvalText(const nlohmann::json& eval);

// Routing charts of an Evaluate result (the MoE models' "routing"): one panel per layer, grouped bars of each
// expert's share per domain, one row of panels per MoE model. Empty when no model has routing data.
std::string RoutingSvg(const nlohmann::json& eval);
// The same chart as a PNG (drawn here, deflated with zlib). Empty when there is no routing data or this build
// has no zlib.
std::string RoutingPng(const nlohmann::json& eval);
bool PngAvailable();

}  // namespace btx::model
