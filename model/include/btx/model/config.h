// Model hyper-parameters, mapped one-to-one onto HF LlamaConfig / MixtralConfig fields.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "btx/contract/specs.h"
#include "btx/contract/status.h"

namespace btx::model {

struct ModelConfig {
  int64_t vocab_size = 259;  // byte tokenizer: 256 bytes + bos, eos, pad
  int64_t hidden_size = 64;
  int64_t intermediate_size = 176;
  int64_t num_hidden_layers = 2;
  int64_t num_attention_heads = 4;
  int64_t num_key_value_heads = 2;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  double initializer_range = 0.02;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 256;
  int64_t eos_token_id = 257;
  // MoE (Mixtral) when num_local_experts > 0.
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 2;
  double router_aux_loss_coef = 0.01;  // load-balancing loss coefficient
  double router_z_loss_coef = 0.0;
  std::string router = "softmax_topk";  // or "sparsemixer"; not an HF field, kept under "btx_router"
  // A name per expert for reports, set by the merge ("btx_expert_names"); kept through finetuning.
  std::vector<std::string> expert_names;

  bool is_moe() const { return num_local_experts > 0; }
  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  Status Validate() const;
};

nlohmann::json ConfigToHfJson(const ModelConfig& c);
// Accepts HF llama / mixtral config.json; unknown fields are ignored, unsupported features rejected.
StatusOr<ModelConfig> ConfigFromHfJson(const nlohmann::json& j);
// A model initialised from scratch as a pretrain job's `init` says (sizes resolved by the contract's parser);
// vocabulary and special tokens come from the tokenizer when `init.vocab_size` is 0.
StatusOr<ModelConfig> ConfigFromInit(const contract::ModelInit& init, int64_t tokenizer_vocab, int64_t bos_id,
                                     int64_t eos_id);

}  // namespace btx::model
