// Llama-family decoder (Llama, Mistral, Qwen2, Gemma) with a dense gated FFN or a Mixtral-style MoE FFN, held as a
// flat name->tensor map.
// Names are HF names, except MoE experts, which are stacked per layer for the grouped kernels:
//   model.layers.N.block_sparse_moe.experts.w1 / w3: [E, F, D], .w2: [E, D, F]
// (see hf_io.h for the conversion to per-expert HF tensors).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "btx/model/config.h"
#include "btx/contract/status.h"

namespace btx::model {

enum class MoeBackend {
  kKernels,    // btx::kernels grouped operators (default when linked)
  kReference,  // per-expert loop in plain ATen ops; cross-checks the kernels in tests
};
bool KernelsAvailable();

// Attention kernel (btx::kernels): kAuto = SDPA where LibTorch has it (>= 2.0), else chunked from 4096 tokens on,
// else naive. kNaive materialises the T x T scores; kChunked keeps O(T) (flash-attention style backward).
enum class AttentionKind { kAuto, kNaive, kChunked };

// One decoder layer as a function of its input and parameters: `w` maps parameter names to the tensors to use
// (names it lacks fall back to the model's own tensors). Returns {output} (dense) or {output, lb, z} (MoE).
// It captures by value and may be called again after Forward returned (recomputation in the backward).
using LayerFn = std::function<std::vector<at::Tensor>(const at::Tensor& x, const std::unordered_map<std::string, at::Tensor>& w)>;
// Runs decoder layer `layer` on `x` by calling `fn` with the layer's parameters: ZeRO-3 (zero3.h) gathers them
// around the call and recomputes the layer in the backward.
using LayerRunner = std::function<std::vector<at::Tensor>(int64_t layer, const at::Tensor& x, const LayerFn& fn)>;

struct ForwardOptions {
  bool training = false;
  MoeBackend backend = MoeBackend::kKernels;
  bool collect_ffn_inputs = false;  // record each layer's normalised FFN input (router "hidden" init)
  // MoE only: overrides config.num_experts_per_tok / router when >= 1 / non-empty.
  int64_t top_k = 0;
  AttentionKind attention = AttentionKind::kAuto;
  // Keep only each layer's input for the backward and recompute the rest there (with gradients enabled).
  bool activation_checkpointing = false;
  // Leave `logits` undefined and return the final normed hidden state in `hidden` (chunked cross-entropy).
  bool return_hidden = false;
  // When set, every decoder layer runs through it (it then decides about recomputation; activation_checkpointing
  // is not applied on top).
  LayerRunner layer_runner;
};

struct ForwardOutput {
  at::Tensor logits;                  // [B, T, V]
  at::Tensor hidden;                  // [B, T, D] after the final norm, when return_hidden
  at::Tensor aux_loss;                // scalar: sum over layers of coef_lb * lb + coef_z * z (0 for dense)
  at::Tensor load_balance_loss;       // scalar, unscaled, mean over layers (undefined for dense)
  at::Tensor z_loss;                  // scalar, unscaled, mean over layers (undefined for dense)
  std::vector<at::Tensor> ffn_inputs;      // per layer [B, T, D] when collect_ffn_inputs
  std::vector<at::Tensor> expert_counts;   // per layer [E] int64 assignments (MoE)
};

class LlamaModel {
 public:
  LlamaModel() = default;
  // Random init (normal(0, initializer_range), norms = 1), deterministic for a seed.
  static StatusOr<LlamaModel> Init(const ModelConfig& cfg, uint64_t seed);
  // Takes internal-layout tensors (float32); checks every expected name and shape.
  static StatusOr<LlamaModel> FromTensors(const ModelConfig& cfg, std::vector<std::pair<std::string, at::Tensor>> t);
  // Expected internal names and shapes for a config, in canonical order.
  static std::vector<std::pair<std::string, std::vector<int64_t>>> Layout(const ModelConfig& cfg);

  const ModelConfig& config() const { return cfg_; }
  ModelConfig& mutable_config() { return cfg_; }
  std::vector<std::pair<std::string, at::Tensor>>& params() { return params_; }
  const std::vector<std::pair<std::string, at::Tensor>>& params() const { return params_; }
  const at::Tensor& param(const std::string& name) const;
  // The output projection [V, D]: lm_head.weight, or the embeddings when tied.
  const at::Tensor& lm_head() const {
    return param(cfg_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  }

  // tokens: [B, T] int64. Causal LM logits.
  ForwardOutput Forward(const at::Tensor& tokens, const ForwardOptions& opts = {}) const;

  void To(c10::Device device);

 private:
  const at::Tensor& P(const std::string& name) const { return param(name); }
  ModelConfig cfg_;
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::unordered_map<std::string, size_t> index_;
};

// Building blocks, exposed for the float64 reference tests.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);
// Gemma's: x / rms(x) * (1 + weight), computed in float32.
at::Tensor GemmaRmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps);
// The gated FFN activation named by ModelConfig::hidden_act (silu, gelu_pytorch_tanh, gelu).
at::Tensor Activation(const at::Tensor& x, const std::string& act);
// cos/sin tables [T, head_dim] (HF "rotate_half" layout: frequencies repeated over both halves).
std::pair<at::Tensor, at::Tensor> RopeTables(int64_t seq_len, int64_t head_dim, double theta, c10::Device device);
// The same with the config's rope_scaling (max_position_embeddings: where dynamic scaling starts).
std::pair<at::Tensor, at::Tensor> RopeTables(int64_t seq_len, int64_t head_dim, double theta, const RopeScaling& scaling,
                                             int64_t max_position_embeddings, c10::Device device);
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);  // x: [B, H, T, hd]
// q: [B, H, T, hd], k/v: [B, Hkv, T, hd]; causal.
at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// Routing + SwiGLU experts in plain ATen ops (per-expert loop), same semantics as btx::kernels.
struct ReferenceMoeOut {
  at::Tensor y, probs, expert_index;
};
ReferenceMoeOut ReferenceMoe(const at::Tensor& x, const at::Tensor& logits, int64_t top_k, const at::Tensor& w1,
                             const at::Tensor& w3, const at::Tensor& w2, const std::string& act = "silu");
// The experts alone for a given routing (expert_index, gates: [T, k]): y[t] = sum_s gates * W2 (act(W1 x) * W3 x).
at::Tensor ReferenceExperts(const at::Tensor& x, const at::Tensor& expert_index, const at::Tensor& gates,
                            const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2, const std::string& act);

}  // namespace btx::model
