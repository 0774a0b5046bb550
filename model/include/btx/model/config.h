// Model hyper-parameters, mapped one-to-one onto HF LlamaConfig / MistralConfig / Qwen2Config / GemmaConfig fields and
// their MoE forms: MixtralConfig (Llama, Mistral), Qwen2MoeConfig (Qwen2) and btx's own "btx_gemma_moe" (Gemma;
// transformers has no Gemma MoE class: the layout is documented in docs/architecture.md).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "btx/contract/specs.h"
#include "btx/contract/status.h"

namespace btx::model {

// RoPE frequency scaling as Hugging Face's `rope_scaling` (modeling_rope_utils): none (empty type), linear
// (positions / factor), dynamic (NTK base growth past max_position_embeddings) and llama3 (Llama 3.1's per-band
// smoothing between original_max_position_embeddings / low_freq_factor and / high_freq_factor).
struct RopeScaling {
  std::string type;  // "" | linear | dynamic | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 0;  // llama3
  bool operator==(const RopeScaling&) const = default;
};

struct ModelConfig {
  // The dense family (llama | mistral | qwen2 | gemma), also for MoE models: it decides their layout (Mixtral for
  // llama and mistral, Qwen2-MoE for qwen2, btx_gemma_moe for gemma).
  std::string model_type = "llama";
  int64_t vocab_size = 259;  // byte tokenizer: 256 bytes + bos, eos, pad
  int64_t hidden_size = 64;
  int64_t intermediate_size = 176;
  int64_t num_hidden_layers = 2;
  int64_t num_attention_heads = 4;
  int64_t num_key_value_heads = 2;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t explicit_head_dim = 0;  // HF `head_dim` when it is not hidden_size / num_attention_heads (Mistral-Nemo)
  bool qkv_bias = false;          // Qwen2, and Llama's attention_bias
  bool o_bias = false;            // Llama's attention_bias only
  int64_t sliding_window = 0;     // Mistral (and Qwen2 with use_sliding_window): 0 = full causal attention
  // The gated FFN's activation: silu (SwiGLU) | gelu_pytorch_tanh (Gemma's GeGLU) | gelu (exact erf GELU).
  std::string hidden_act = "silu";
  // How the weights are stored (float32 | bfloat16 | float16): outputs keep their seed's. Training itself runs in
  // float32 (bf16 autocast on GPUs) whatever this says.
  std::string torch_dtype = "float32";
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
  // Gemma's differences from Llama: RMSNorm scales by (1 + weight), embeddings are multiplied by sqrt(hidden_size).
  bool is_gemma() const { return model_type == "gemma"; }
  // The model_type written to config.json: the family, or its MoE form.
  std::string hf_model_type() const;
  int64_t head_dim() const { return explicit_head_dim > 0 ? explicit_head_dim : hidden_size / num_attention_heads; }
  // Sequences longer than the sliding window would need its mask, which btx does not implement: refused.
  Status CheckSeqLen(int64_t seq_len) const;
  Status Validate() const;
};

// Width of the shared expert btx writes into Qwen2-MoE checkpoints (all zeros: btx's MoE has none, and
// transformers' Qwen2MoeSparseMoeBlock always builds one).
extern const int64_t kQwen2MoeSharedWidth;

nlohmann::json ConfigToHfJson(const ModelConfig& c);
// Accepts HF llama / mistral / qwen2 / gemma config.json and the MoE forms btx writes (mixtral, qwen2_moe,
// btx_gemma_moe); unknown fields are ignored, unsupported features (and families, e.g. gemma2) refused by name.
StatusOr<ModelConfig> ConfigFromHfJson(const nlohmann::json& j);
// A model initialised from scratch as a pretrain job's `init` says (sizes resolved by the contract's parser);
// vocabulary and special tokens come from the tokenizer when `init.vocab_size` is 0.
StatusOr<ModelConfig> ConfigFromInit(const contract::ModelInit& init, int64_t tokenizer_vocab, int64_t bos_id,
                                     int64_t eos_id);

}  // namespace btx::model
