#include "btx/model/config.h"

#include <nlohmann/json.hpp>

namespace btx::model {
using nlohmann::json;

const int64_t kQwen2MoeSharedWidth = 1;

Status ModelConfig::Validate() const {
  auto bad = [](const std::string& f, const std::string& why) { return InvalidArgument(f + ": " + why); };
  if (vocab_size <= 0) return bad("vocab_size", "must be > 0");
  if (hidden_size <= 0) return bad("hidden_size", "must be > 0");
  if (intermediate_size <= 0) return bad("intermediate_size", "must be > 0");
  if (num_hidden_layers <= 0) return bad("num_hidden_layers", "must be > 0");
  if (num_attention_heads <= 0 || (explicit_head_dim <= 0 && hidden_size % num_attention_heads != 0))
    return bad("num_attention_heads", "must divide hidden_size");
  if (head_dim() % 2 != 0) return bad("num_attention_heads", "head_dim must be even for RoPE");
  if (num_key_value_heads <= 0 || num_attention_heads % num_key_value_heads != 0)
    return bad("num_key_value_heads", "must divide num_attention_heads");
  if (rms_norm_eps <= 0) return bad("rms_norm_eps", "must be > 0");
  if (rope_theta <= 0) return bad("rope_theta", "must be > 0");
  if (num_local_experts < 0) return bad("num_local_experts", "must be >= 0");
  if (is_moe() && (num_experts_per_tok < 1 || num_experts_per_tok > num_local_experts))
    return bad("num_experts_per_tok", "must be in [1, num_local_experts]");
  if (router != "softmax_topk" && router != "sparsemixer") return bad("router", "must be softmax_topk or sparsemixer");
  const RopeScaling& rs = rope_scaling;
  if (!rs.type.empty() && rs.type != "linear" && rs.type != "dynamic" && rs.type != "llama3")
    return bad("rope_scaling", "type '" + rs.type + "' is not supported (linear, dynamic, llama3)");
  if (!rs.type.empty() && !(rs.factor >= 1.0)) return bad("rope_scaling.factor", "must be >= 1");
  if (rs.type == "llama3" && (rs.original_max_position_embeddings <= 0 || !(rs.high_freq_factor > rs.low_freq_factor)))
    return bad("rope_scaling", "llama3 needs original_max_position_embeddings > 0 and high_freq_factor > low_freq_factor");
  if (sliding_window < 0) return bad("sliding_window", "must be >= 0");
  if (torch_dtype != "float32" && torch_dtype != "bfloat16" && torch_dtype != "float16")
    return bad("torch_dtype", "'" + torch_dtype + "' is not float32, bfloat16 or float16");
  if (hidden_act != "silu" && hidden_act != "gelu_pytorch_tanh" && hidden_act != "gelu")
    return bad("hidden_act", "'" + hidden_act + "' is not silu, gelu_pytorch_tanh or gelu");
  if (model_type != "llama" && model_type != "mistral" && model_type != "qwen2" && model_type != "gemma" &&
      model_type != "mixtral")
    return bad("model_type", "'" + model_type + "' is not llama, mistral, qwen2 or gemma");
  if (is_moe()) {
    // What each MoE layout can express (the transformers class that reads it, or btx's own for Gemma).
    if (model_type == "qwen2" && (o_bias || explicit_head_dim > 0 || !qkv_bias))
      return bad("model_type", "qwen2_moe has q/k/v biases, no o_proj bias and head_dim = hidden_size / heads");
    if (model_type != "qwen2" && model_type != "gemma" && (qkv_bias || o_bias))
      return bad("qkv_bias", "a Mixtral MoE has no attention biases");
    if (model_type != "gemma" && explicit_head_dim > 0)
      return bad("head_dim", std::to_string(head_dim()) + " differs from hidden_size / num_attention_heads, which " +
                                 (model_type == "qwen2" ? "Qwen2-MoE" : "Mixtral") + " (as transformers 4.46 loads it) cannot express");
  }
  if (model_type == "gemma" && !rope_scaling.type.empty())
    return bad("rope_scaling", "transformers 4.46's Gemma ignores rope_scaling; btx refuses it rather than differ");
  return Status::Ok();
}

std::string ModelConfig::hf_model_type() const {
  if (!is_moe()) return model_type == "mixtral" ? "llama" : model_type;
  if (model_type == "qwen2") return "qwen2_moe";
  if (model_type == "gemma") return "btx_gemma_moe";
  return "mixtral";
}

Status ModelConfig::CheckSeqLen(int64_t seq_len) const {
  if (sliding_window > 0 && seq_len > sliding_window) {
    return InvalidArgument("seq_len " + std::to_string(seq_len) + " exceeds the model's sliding_window (" +
                           std::to_string(sliding_window) +
                           "): sliding-window attention is not implemented, so sequences must fit in the window");
  }
  return Status::Ok();
}

json ConfigToHfJson(const ModelConfig& c) {
  json j = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"head_dim", c.head_dim()},
      {"initializer_range", c.initializer_range},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"attention_dropout", 0.0},
      {"use_cache", true},
      {"torch_dtype", c.torch_dtype},
  };
  if (!c.rope_scaling.type.empty()) {
    const RopeScaling& rs = c.rope_scaling;
    j["rope_scaling"] = {{"rope_type", rs.type}, {"factor", rs.factor}};
    if (rs.type == "llama3") {
      j["rope_scaling"]["low_freq_factor"] = rs.low_freq_factor;
      j["rope_scaling"]["high_freq_factor"] = rs.high_freq_factor;
      j["rope_scaling"]["original_max_position_embeddings"] = rs.original_max_position_embeddings;
    }
  }
  const std::string type = c.hf_model_type();
  j["model_type"] = type;
  j["hidden_act"] = c.hidden_act;
  if (c.is_moe()) {
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
    j["output_router_logits"] = false;
    j["btx_router"] = c.router;
    j["btx_router_z_loss_coef"] = c.router_z_loss_coef;
    if (!c.expert_names.empty()) j["btx_expert_names"] = c.expert_names;
  }
  if (type == "mixtral") {
    j["architectures"] = {"MixtralForCausalLM"};
    j["num_local_experts"] = c.num_local_experts;
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json();
  } else if (type == "qwen2_moe") {
    // Every layer sparse; btx's router renormalises the top-k gates (norm_topk_prob). Qwen2-MoE always has a
    // shared expert behind a sigmoid gate: btx writes it as zeros of width 1, so it adds exactly 0 (and stays 0
    // under training: with zero up/gate/down weights every gradient reaching it is 0). See docs/architecture.md.
    j["architectures"] = {"Qwen2MoeForCausalLM"};
    j["num_experts"] = c.num_local_experts;
    j["moe_intermediate_size"] = c.intermediate_size;
    j["shared_expert_intermediate_size"] = kQwen2MoeSharedWidth;
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = json::array();
    j["norm_topk_prob"] = true;
    j["use_sliding_window"] = c.sliding_window > 0;
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json();
    j["max_window_layers"] = c.num_hidden_layers;
  } else if (type == "btx_gemma_moe") {
    // No transformers class: Gemma's fields plus Mixtral's expert fields and tensor names (docs/architecture.md).
    j["architectures"] = {"BtxGemmaMoeForCausalLM"};
    j["num_local_experts"] = c.num_local_experts;
    j["hidden_activation"] = c.hidden_act;
    j["attention_bias"] = c.qkv_bias;
  } else if (type == "gemma") {
    j["architectures"] = {"GemmaForCausalLM"};
    j["hidden_activation"] = c.hidden_act;
    j["attention_bias"] = c.qkv_bias;
  } else if (type == "qwen2") {
    j["architectures"] = {"Qwen2ForCausalLM"};
    j["use_sliding_window"] = c.sliding_window > 0;
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json();
  } else if (type == "mistral") {
    j["architectures"] = {"MistralForCausalLM"};
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json();
  } else {
    j["architectures"] = {"LlamaForCausalLM"};
    j["pretraining_tp"] = 1;
    j["attention_bias"] = c.qkv_bias;
    j["mlp_bias"] = false;
  }
  return j;
}

StatusOr<ModelConfig> ConfigFromHfJson(const json& j) {
  if (!j.is_object()) return InvalidArgument("config.json is not an object");
  ModelConfig c;
  if (j.contains("model_type") && !j["model_type"].is_string()) return InvalidArgument("model_type: must be a string");
  const std::string type = j.value("model_type", std::string("llama"));
  if (type == "gemma2" || type == "gemma3" || type == "gemma3_text")
    return InvalidArgument("model_type '" + type + "' is not supported: its attention logit soft-capping, final logit "
                           "soft-capping and alternating sliding-window layers are not implemented (gemma is)");
  if (type != "llama" && type != "mistral" && type != "qwen2" && type != "mixtral" && type != "gemma" &&
      type != "qwen2_moe" && type != "btx_gemma_moe")
    return InvalidArgument("model_type '" + type + "' is not supported (llama, mistral, qwen2, gemma; MoE: mixtral, "
                           "qwen2_moe, btx_gemma_moe)");
  const bool gemma = type == "gemma" || type == "btx_gemma_moe";
  c.model_type = type == "qwen2_moe" ? "qwen2" : type == "btx_gemma_moe" ? "gemma" : type;
  if (gemma) {
    // GemmaConfig's defaults where config.json leaves a field out.
    c.tie_word_embeddings = true;
    c.rms_norm_eps = 1e-6;
    c.explicit_head_dim = 256;
    c.hidden_act = "gelu_pytorch_tanh";
  }
  try {
    auto get_i = [&](const char* k, int64_t& dst) {
      if (j.contains(k) && !j[k].is_null()) dst = j[k].get<int64_t>();
    };
    auto get_d = [&](const char* k, double& dst) {
      if (j.contains(k) && !j[k].is_null()) dst = j[k].get<double>();
    };
    get_i("vocab_size", c.vocab_size);
    get_i("hidden_size", c.hidden_size);
    get_i("intermediate_size", c.intermediate_size);
    get_i("num_hidden_layers", c.num_hidden_layers);
    get_i("num_attention_heads", c.num_attention_heads);
    c.num_key_value_heads = c.num_attention_heads;  // HF default when the field is absent
    get_i("num_key_value_heads", c.num_key_value_heads);
    get_i("max_position_embeddings", c.max_position_embeddings);
    get_d("rms_norm_eps", c.rms_norm_eps);
    get_d("rope_theta", c.rope_theta);
    get_i("head_dim", c.explicit_head_dim);
    if (c.explicit_head_dim > 0 && c.num_attention_heads > 0 && c.explicit_head_dim * c.num_attention_heads == c.hidden_size)
      c.explicit_head_dim = 0;  // the default: written back all the same
    get_d("initializer_range", c.initializer_range);
    // HF defaults tie_word_embeddings to false for Llama/Mixtral, to true for Gemma.
    if (j.contains("tie_word_embeddings") && !j["tie_word_embeddings"].is_null())
      c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
    if (j.contains("bos_token_id") && j["bos_token_id"].is_number()) c.bos_token_id = j["bos_token_id"].get<int64_t>();
    if (j.contains("eos_token_id") && j["eos_token_id"].is_number()) c.eos_token_id = j["eos_token_id"].get<int64_t>();
    if (gemma) {
      // transformers' GemmaMLP uses hidden_activation, and gelu_pytorch_tanh when it is null, whatever hidden_act
      // says (Gemma's own configs carry hidden_act "gelu").
      if (j.contains("hidden_activation") && !j["hidden_activation"].is_null())
        c.hidden_act = j["hidden_activation"].get<std::string>();
      if (c.hidden_act != "gelu_pytorch_tanh" && c.hidden_act != "gelu")
        return InvalidArgument("hidden_activation '" + c.hidden_act + "' unsupported for gemma (gelu_pytorch_tanh, gelu)");
      if (j.contains("attention_bias") && j["attention_bias"].is_boolean() && j["attention_bias"].get<bool>())
        c.qkv_bias = c.o_bias = true;
    } else if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
      return InvalidArgument("hidden_act '" + j["hidden_act"].dump() + "' unsupported for " + type + " (silu only)");
    }
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
      const json& rs = j["rope_scaling"];
      if (!rs.is_object()) return InvalidArgument("rope_scaling: must be an object");
      // transformers reads "rope_type", and "type" in configs written before it was renamed.
      c.rope_scaling.type = rs.value("rope_type", rs.value("type", std::string()));
      if (c.rope_scaling.type == "default") c.rope_scaling.type.clear();
      if (rs.contains("factor") && !rs["factor"].is_null()) c.rope_scaling.factor = rs["factor"].get<double>();
      if (rs.contains("low_freq_factor")) c.rope_scaling.low_freq_factor = rs["low_freq_factor"].get<double>();
      if (rs.contains("high_freq_factor")) c.rope_scaling.high_freq_factor = rs["high_freq_factor"].get<double>();
      if (rs.contains("original_max_position_embeddings"))
        c.rope_scaling.original_max_position_embeddings = rs["original_max_position_embeddings"].get<int64_t>();
    }
    if (type == "qwen2" || type == "qwen2_moe") {
      c.qkv_bias = true;  // Qwen2Attention: q/k/v with bias, o_proj without
      // Which layers use the window (max_window_layers) does not matter: sequences must fit in it (CheckSeqLen).
      if (j.value("use_sliding_window", false)) get_i("sliding_window", c.sliding_window);
    } else if (type == "mistral" || type == "mixtral") {
      get_i("sliding_window", c.sliding_window);
    } else if (!gemma && j.value("attention_bias", false)) {
      c.qkv_bias = c.o_bias = true;
    }
    if (j.value("mlp_bias", false)) return InvalidArgument("mlp_bias=true is not supported");
    if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) c.torch_dtype = j["torch_dtype"].get<std::string>();
    if (j.contains("pretraining_tp") && j["pretraining_tp"].is_number() && j["pretraining_tp"].get<int64_t>() != 1)
      return InvalidArgument("pretraining_tp != 1 is not supported");
    if (type == "qwen2_moe") {
      c.num_local_experts = 60;  // Qwen2MoeConfig's defaults
      c.num_experts_per_tok = 4;
      c.intermediate_size = 1408;
      get_i("num_experts", c.num_local_experts);
      get_i("moe_intermediate_size", c.intermediate_size);
      int64_t step = 1;
      get_i("decoder_sparse_step", step);
      if (step != 1) return InvalidArgument("qwen2_moe: decoder_sparse_step " + std::to_string(step) + " is not supported (1: every layer sparse)");
      if (j.contains("mlp_only_layers") && j["mlp_only_layers"].is_array() && !j["mlp_only_layers"].empty())
        return InvalidArgument("qwen2_moe: mlp_only_layers is not supported (every layer sparse)");
      // btx renormalises the top-k gates, as Mixtral does; Qwen2-MoE's default (false) does not.
      if (!j.value("norm_topk_prob", false))
        return InvalidArgument("qwen2_moe: norm_topk_prob false is not supported (btx renormalises the top-k gates)");
    }
    if (type == "mixtral" || type == "qwen2_moe" || type == "btx_gemma_moe") {
      if (type != "qwen2_moe") c.num_local_experts = 8;
      get_i(type == "qwen2_moe" ? "num_experts" : "num_local_experts", c.num_local_experts);
      get_i("num_experts_per_tok", c.num_experts_per_tok);
      get_d("router_aux_loss_coef", c.router_aux_loss_coef);
      get_d("btx_router_z_loss_coef", c.router_z_loss_coef);
      c.router = j.value("btx_router", std::string("softmax_topk"));
      if (j.contains("btx_expert_names") && j["btx_expert_names"].is_array() &&
          static_cast<int64_t>(j["btx_expert_names"].size()) == c.num_local_experts) {
        for (const auto& n : j["btx_expert_names"])
          if (n.is_string()) c.expert_names.push_back(n.get<std::string>());
        if (static_cast<int64_t>(c.expert_names.size()) != c.num_local_experts) c.expert_names.clear();
      }
      if (c.num_local_experts <= 0) return InvalidArgument("num_local_experts must be > 0 for " + type);
    }
  } catch (const std::exception& e) {
    return InvalidArgument(std::string("config.json: wrong field type: ") + e.what());
  }
  BTX_RETURN_IF_ERROR(c.Validate());
  return c;
}

StatusOr<ModelConfig> ConfigFromInit(const contract::ModelInit& init, int64_t tokenizer_vocab, int64_t bos_id,
                                     int64_t eos_id) {
  ModelConfig c;
  c.hidden_size = init.hidden_size;
  c.intermediate_size = init.intermediate_size;
  c.num_hidden_layers = init.num_hidden_layers;
  c.num_attention_heads = init.num_attention_heads;
  c.num_key_value_heads = init.num_key_value_heads;
  c.max_position_embeddings = init.max_position_embeddings;
  c.rms_norm_eps = init.rms_norm_eps;
  c.rope_theta = init.rope_theta;
  c.initializer_range = init.initializer_range;
  c.tie_word_embeddings = init.tie_word_embeddings;
  c.vocab_size = init.vocab_size > 0 ? init.vocab_size : tokenizer_vocab;
  if (c.vocab_size < tokenizer_vocab) {
    return InvalidArgument("vocab_size: " + std::to_string(c.vocab_size) + " is smaller than the tokenizer's " +
                           std::to_string(tokenizer_vocab));
  }
  c.bos_token_id = bos_id;
  c.eos_token_id = eos_id;
  BTX_RETURN_IF_ERROR(c.Validate());
  return c;
}

}  // namespace btx::model
