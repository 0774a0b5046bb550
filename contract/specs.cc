#include "btx/contract/specs.h"

namespace btx::contract {
using json = nlohmann::json;
namespace {

constexpr Range kPositive{0, 10, true, false};

const std::vector<std::string> kTrainKeys = {
    "batch_tokens", "seq_len", "lr",    "min_lr_ratio", "warmup",    "schedule",     "weight_decay",     "grad_clip",
    "grad_accum",   "seed",    "beta1", "beta2",        "eps",       "log_every",    "checkpoint_every", "valid_tokens",
    "keep_checkpoints", "threads", "zero", "precision", "attention", "activation_checkpointing", "loss_chunk_tokens"};

// Names users bring from other tools, mapped to the Hugging Face config names `seed.init` takes.
const std::vector<std::pair<std::string, std::string>> kInitHints = {
    {"num_layers", "num_hidden_layers"},          {"n_layers", "num_hidden_layers"},
    {"num_heads", "num_attention_heads"},         {"n_heads", "num_attention_heads"},
    {"num_kv_heads", "num_key_value_heads"},      {"n_kv_heads", "num_key_value_heads"},
    {"max_seq_len", "max_position_embeddings"},   {"tie_embeddings", "tie_word_embeddings"},
    {"dim", "hidden_size"},                       {"ffn_dim", "intermediate_size"},
    {"d_model", "hidden_size"}};

int64_t Steps(Reader& r, const json& v, const std::string& path) {
  if (!v.is_object() || !v.contains("steps") || v["steps"].is_null()) {
    r.FailMissing(JoinPath(path, "steps"), "an integer in [1, " + std::to_string(kMaxSteps) + "]");
    return 0;
  }
  return r.Int(v, path, "steps", 0, 1, kMaxSteps);
}

std::optional<TokenizerSpec> OptionalTokenizer(Reader& r, const json& v, const std::string& path) {
  if (!v.contains("tokenizer") || v["tokenizer"].is_null()) return std::nullopt;
  return ParseTokenizer(r, v["tokenizer"], JoinPath(path, "tokenizer"), false);
}

}  // namespace

TrainConfig ParseTrain(Reader& r, const json& v, const std::string& path) {
  TrainConfig c;
  if (v.is_null() || !r.Object(path, v, kTrainKeys)) return c;
  c.seq_len = r.Int(v, path, "seq_len", c.seq_len, 8, 131072);
  c.batch_tokens = r.Int(v, path, "batch_tokens", c.batch_tokens, 8, int64_t{1} << 26);
  if (c.batch_tokens % std::max<int64_t>(c.seq_len, 1) != 0) {
    r.Fail(JoinPath(path, "batch_tokens"), c.batch_tokens, "a multiple of " + JoinPath(path, "seq_len"));
  }
  c.lr = r.Num(v, path, "lr", c.lr, kPositive);
  c.min_lr_ratio = r.Num(v, path, "min_lr_ratio", c.min_lr_ratio, {0, 1});
  c.warmup = r.Int(v, path, "warmup", c.warmup, 0, 10'000'000);
  c.schedule = r.Enum(v, path, "schedule", c.schedule, {"cosine", "linear", "constant"});
  c.weight_decay = r.Num(v, path, "weight_decay", c.weight_decay, {0, 10});
  c.grad_clip = r.Num(v, path, "grad_clip", c.grad_clip, {0, 1e6});
  c.grad_accum = r.Int(v, path, "grad_accum", c.grad_accum, 1, 1024);
  if (c.grad_accum > c.sequences_per_step()) {
    r.Fail(JoinPath(path, "grad_accum"), c.grad_accum,
           "at most the sequences per step (batch_tokens / seq_len = " + std::to_string(c.sequences_per_step()) + ")");
  }
  c.seed = static_cast<uint64_t>(r.Int(v, path, "seed", static_cast<int64_t>(c.seed), 0, int64_t{1} << 62));
  c.beta1 = r.Num(v, path, "beta1", c.beta1, {0, 1, false, true});
  c.beta2 = r.Num(v, path, "beta2", c.beta2, {0, 1, false, true});
  c.eps = r.Num(v, path, "eps", c.eps, {0, 1, true, false});
  c.log_every = r.Int(v, path, "log_every", c.log_every, 1, 10'000'000);
  c.checkpoint_every = r.Int(v, path, "checkpoint_every", c.checkpoint_every, 0, 10'000'000);
  c.valid_tokens = r.Int(v, path, "valid_tokens", c.valid_tokens, 1, int64_t{1} << 40);
  c.keep_checkpoints = r.Int(v, path, "keep_checkpoints", c.keep_checkpoints, 1, 1000);
  c.threads = r.Int(v, path, "threads", c.threads, 0, 1024);
  // ZeRO stages: 0 replicated, 1 optimizer state sharded, 3 parameters, gradients and optimizer state sharded.
  // There is no 2 (3 shards the gradients too).
  if (v.contains("zero") && !v["zero"].is_null()) {
    const json& z = v["zero"];
    if (z.is_number_integer() && (z == 0 || z == 1 || z == 3))
      c.zero = z.get<int64_t>();
    else
      r.Fail(JoinPath(path, "zero"), v["zero"],
           "0 (replicated), 1 (ZeRO-1: optimizer state sharded) or 3 (ZeRO-3: parameters, gradients and optimizer "
           "state sharded); 2 is not implemented");
  }
  c.precision = r.Enum(v, path, "precision", c.precision, {"fp32", "bf16"});
  c.attention = r.Enum(v, path, "attention", c.attention, {"auto", "naive", "chunked"});
  c.activation_checkpointing = r.Bool(v, path, "activation_checkpointing", c.activation_checkpointing);
  c.loss_chunk_tokens = r.Int(v, path, "loss_chunk_tokens", c.loss_chunk_tokens, 0, int64_t{1} << 24);
  return c;
}

json ToJson(const TrainConfig& c) {
  return {{"batch_tokens", c.batch_tokens}, {"seq_len", c.seq_len},
          {"lr", c.lr},                     {"min_lr_ratio", c.min_lr_ratio},
          {"warmup", c.warmup},             {"schedule", c.schedule},
          {"weight_decay", c.weight_decay}, {"grad_clip", c.grad_clip},
          {"grad_accum", c.grad_accum},     {"seed", c.seed},
          {"beta1", c.beta1},               {"beta2", c.beta2},
          {"eps", c.eps},                   {"log_every", c.log_every},
          {"checkpoint_every", c.checkpoint_every}, {"valid_tokens", c.valid_tokens},
          {"keep_checkpoints", c.keep_checkpoints}, {"threads", c.threads},
          {"zero", c.zero}, {"precision", c.precision},
          {"attention", c.attention}, {"activation_checkpointing", c.activation_checkpointing},
          {"loss_chunk_tokens", c.loss_chunk_tokens}};
}

TokenizerSpec ParseTokenizer(Reader& r, const json& v, const std::string& path, bool allow_train) {
  TokenizerSpec t;
  if (v.is_null() || (v.is_string() && v.get<std::string>() == "byte")) return t;
  if (v.is_string()) {
    t.kind = TokenizerSpec::Kind::kSentencePiece;
    t.path = r.Path(v, path);
    return t;
  }
  const std::string expected = allow_train ? "\"byte\", a sentencepiece .model path, {sentencepiece: PATH} or "
                                             "{type: sentencepiece, vocab_size: N}"
                                           : "\"byte\", a sentencepiece .model path or {sentencepiece: PATH}";
  if (!v.is_object()) {
    r.Fail(path, v, expected);
    return t;
  }
  if (v.contains("sentencepiece")) {
    if (r.Object(path, v, {"sentencepiece"})) {
      t.kind = TokenizerSpec::Kind::kSentencePiece;
      t.path = r.PathField(v, path, "sentencepiece", true);
    }
    return t;
  }
  if (!r.Object(path, v, {"type", "vocab_size"})) return t;
  const std::string type = r.Enum(v, path, "type", "byte", {"byte", "sentencepiece"});
  if (type == "byte") {
    if (v.contains("vocab_size")) r.Fail(JoinPath(path, "vocab_size"), v["vocab_size"], "no vocab_size with type byte");
    return t;
  }
  if (!allow_train) {
    r.Fail(path, v, expected + " (only a seed trained from scratch can train its tokenizer)");
    return t;
  }
  t.kind = TokenizerSpec::Kind::kTrainSentencePiece;
  if (!v.contains("vocab_size")) r.FailMissing(JoinPath(path, "vocab_size"), "an integer in [16, 1048576]");
  t.vocab_size = r.Int(v, path, "vocab_size", 0, 16, 1 << 20);
  return t;
}

json ToJson(const TokenizerSpec& t) {
  switch (t.kind) {
    case TokenizerSpec::Kind::kByte: return "byte";
    case TokenizerSpec::Kind::kSentencePiece: return {{"sentencepiece", t.path}};
    case TokenizerSpec::Kind::kTrainSentencePiece: return {{"type", "sentencepiece"}, {"vocab_size", t.vocab_size}};
  }
  return "byte";
}

bool ApplyPreset(const std::string& name, ModelInit& m) {
  const ModelInit tiny;
  if (name == "tiny") {
    m.hidden_size = tiny.hidden_size;
    m.intermediate_size = tiny.intermediate_size;
    m.num_hidden_layers = tiny.num_hidden_layers;
    m.num_attention_heads = tiny.num_attention_heads;
    m.num_key_value_heads = tiny.num_key_value_heads;
  } else if (name == "small") {
    m.hidden_size = 256;
    m.intermediate_size = 688;
    m.num_hidden_layers = 4;
    m.num_attention_heads = 8;
    m.num_key_value_heads = 4;
  } else {
    return false;
  }
  m.preset = name;
  return true;
}

ModelInit ParseModelInit(Reader& r, const json& v, const std::string& path) {
  ModelInit m;
  if (!r.Object(path, v,
                {"preset", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "vocab_size", "rms_norm_eps", "rope_theta",
                 "initializer_range", "tie_word_embeddings"},
                kInitHints)) {
    return m;
  }
  ApplyPreset(r.Enum(v, path, "preset", "tiny", {"tiny", "small"}), m);
  m.hidden_size = r.Int(v, path, "hidden_size", m.hidden_size, 8, 65536);
  m.intermediate_size = r.Int(v, path, "intermediate_size", m.intermediate_size, 8, 1 << 20);
  m.num_hidden_layers = r.Int(v, path, "num_hidden_layers", m.num_hidden_layers, 1, 1024);
  m.num_attention_heads = r.Int(v, path, "num_attention_heads", m.num_attention_heads, 1, 1024);
  // Without it, Hugging Face configs mean multi-head attention (as many KV heads as heads).
  const int64_t kv_default = v.contains("num_attention_heads") && !v.contains("num_key_value_heads")
                                 ? m.num_attention_heads
                                 : m.num_key_value_heads;
  m.num_key_value_heads = r.Int(v, path, "num_key_value_heads", kv_default, 1, 1024);
  m.max_position_embeddings = r.Int(v, path, "max_position_embeddings", m.max_position_embeddings, 8, 1 << 24);
  m.vocab_size = r.Int(v, path, "vocab_size", m.vocab_size, 0, 1 << 24);
  m.rms_norm_eps = r.Num(v, path, "rms_norm_eps", m.rms_norm_eps, {0, 1, true, true});
  m.rope_theta = r.Num(v, path, "rope_theta", m.rope_theta, {0, 1e12, true, false});
  m.initializer_range = r.Num(v, path, "initializer_range", m.initializer_range, {0, 1, true, false});
  m.tie_word_embeddings = r.Bool(v, path, "tie_word_embeddings", m.tie_word_embeddings);
  if (m.num_attention_heads > 0 && m.hidden_size % m.num_attention_heads != 0) {
    r.Fail(JoinPath(path, "num_attention_heads"), m.num_attention_heads,
           "a divisor of hidden_size (" + std::to_string(m.hidden_size) + ")");
  } else if (m.num_attention_heads > 0 && (m.hidden_size / m.num_attention_heads) % 2 != 0) {
    r.Fail(JoinPath(path, "num_attention_heads"), m.num_attention_heads,
           "a head size (hidden_size / num_attention_heads) that is even, for rotary embeddings");
  }
  if (m.num_key_value_heads > 0 && m.num_attention_heads % m.num_key_value_heads != 0) {
    r.Fail(JoinPath(path, "num_key_value_heads"), m.num_key_value_heads,
           "a divisor of num_attention_heads (" + std::to_string(m.num_attention_heads) + ")");
  }
  return m;
}

json ToJson(const ModelInit& m) {
  return {{"preset", m.preset},
          {"hidden_size", m.hidden_size},
          {"intermediate_size", m.intermediate_size},
          {"num_hidden_layers", m.num_hidden_layers},
          {"num_attention_heads", m.num_attention_heads},
          {"num_key_value_heads", m.num_key_value_heads},
          {"max_position_embeddings", m.max_position_embeddings},
          {"vocab_size", m.vocab_size},
          {"rms_norm_eps", m.rms_norm_eps},
          {"rope_theta", m.rope_theta},
          {"initializer_range", m.initializer_range},
          {"tie_word_embeddings", m.tie_word_embeddings}};
}

DataSpec ParseData(Reader& r, const json& v, const std::string& path, size_t max_paths) {
  DataSpec d;
  if (!r.Object(path, v, {"train", "valid", "format", "text_field"})) return d;
  d.train = r.Paths(v.contains("train") ? v["train"] : json(), JoinPath(path, "train"), max_paths);
  if (v.contains("valid") && !v["valid"].is_null()) d.valid = r.Paths(v["valid"], JoinPath(path, "valid"), max_paths);
  ParseDataFormat(r, v, path, d);
  return d;
}

void ParseDataFormat(Reader& r, const json& v, const std::string& path, DataSpec& d) {
  if (v.contains("format") && !v["format"].is_null()) d.format = r.Enum(v, path, "format", "", kDataFormats);
  if (v.contains("text_field") && !v["text_field"].is_null()) {
    d.text_field = r.String(v, path, "text_field", 256);
    // A text field read from anything but JSON records would be silently ignored.
    if (!d.format.empty() && d.format != "jsonl")
      r.Fail(JoinPath(path, "text_field"), v["text_field"], "no text_field with format " + d.format + " (only jsonl has one)");
  }
}

json ToJson(const DataSpec& d) {
  json j = {{"train", d.train}};
  if (!d.valid.empty()) j["valid"] = d.valid;
  if (!d.format.empty()) j["format"] = d.format;
  if (d.text_field != "text") j["text_field"] = d.text_field;
  return j;
}

PretrainSpec ParsePretrain(Reader& r, const json& v, const std::string& path) {
  PretrainSpec s;
  if (!r.Object(path, v, {"init", "tokenizer", "data", "train", "steps"})) return s;
  s.init = ParseModelInit(r, v.contains("init") ? v["init"] : json::object(), JoinPath(path, "init"));
  s.tokenizer = ParseTokenizer(r, v.contains("tokenizer") ? v["tokenizer"] : json(), JoinPath(path, "tokenizer"), true);
  s.data = ParseData(r, v.contains("data") ? v["data"] : json(), JoinPath(path, "data"));
  s.train = ParseTrain(r, v.contains("train") ? v["train"] : json(), JoinPath(path, "train"));
  s.steps = Steps(r, v, path);
  if (s.init.vocab_size > 0 && s.tokenizer.kind == TokenizerSpec::Kind::kTrainSentencePiece &&
      s.init.vocab_size < s.tokenizer.vocab_size) {
    r.Fail(JoinPath(path, "init.vocab_size"), s.init.vocab_size, "at least the tokenizer's vocab_size");
  }
  return s;
}

BranchSpec ParseBranch(Reader& r, const json& v, const std::string& path) {
  BranchSpec s;
  if (!r.Object(path, v, {"seed", "name", "tokenizer", "data", "train", "steps"})) return s;
  s.seed = r.PathField(v, path, "seed", true);
  if (v.contains("name")) s.name = r.Name(v, path, "name");
  s.tokenizer = OptionalTokenizer(r, v, path);
  s.data = ParseData(r, v.contains("data") ? v["data"] : json(), JoinPath(path, "data"));
  s.train = ParseTrain(r, v.contains("train") ? v["train"] : json(), JoinPath(path, "train"));
  s.steps = Steps(r, v, path);
  return s;
}

MergeSpec ParseMerge(Reader& r, const json& v, const std::string& path) {
  MergeSpec s;
  if (!r.Object(path, v,
                {"method", "seed", "experts", "keep_seed_expert", "router_init", "top_k", "num_experts", "data",
                 "hidden_tokens", "random_seed", "max_shard_bytes"})) {
    return s;
  }
  s.method = r.Enum(v, path, "method", s.method, {"btx", "upcycle", "btm"});
  s.seed = r.PathField(v, path, "seed", false);
  s.keep_seed_expert = r.Bool(v, path, "keep_seed_expert", s.keep_seed_expert);
  s.router_init = r.Enum(v, path, "router_init", s.router_init, {"random", "hidden"});
  s.num_experts = r.Int(v, path, "num_experts", s.num_experts, 0, 1024);
  s.hidden_tokens = r.Int(v, path, "hidden_tokens", s.hidden_tokens, 1, int64_t{1} << 30);
  s.random_seed = static_cast<uint64_t>(r.Int(v, path, "random_seed", static_cast<int64_t>(s.random_seed), 0, int64_t{1} << 62));
  s.max_shard_bytes = static_cast<uint64_t>(
      r.Int(v, path, "max_shard_bytes", static_cast<int64_t>(s.max_shard_bytes), int64_t{1} << 20, int64_t{1} << 40));
  const std::string experts_path = JoinPath(path, "experts");
  if (v.contains("experts") && !v["experts"].is_null()) {
    if (!v["experts"].is_array() || v["experts"].size() > kMaxListEntries) {
      r.Fail(experts_path, v["experts"], "a list of at most " + std::to_string(kMaxListEntries) + " {name, model}");
    } else {
      for (size_t i = 0; i < v["experts"].size(); ++i) {
        const std::string p = IndexPath(experts_path, i);
        const json& e = v["experts"][i];
        if (!r.Object(p, e, {"name", "model"})) continue;
        std::string name = r.Name(e, p, "name");
        for (const auto& [other, _] : s.experts) {
          if (!name.empty() && other == name) r.Fail(JoinPath(p, "name"), e["name"], "a name no other expert has");
        }
        s.experts.emplace_back(name, r.PathField(e, p, "model", true));
      }
    }
  }
  if (s.method != "upcycle" && s.experts.empty() && r.ok()) r.FailMissing(experts_path, "at least one expert for this method");
  const int64_t experts = static_cast<int64_t>(s.experts.size()) + (s.keep_seed_expert ? 1 : 0);
  const int64_t total = s.method == "upcycle" ? (s.num_experts > 0 ? s.num_experts : experts > 0 ? experts : 4) : experts;
  s.top_k = r.Int(v, path, "top_k", std::min<int64_t>(s.top_k, std::max<int64_t>(total, 1)), 1, std::max<int64_t>(total, 1));
  if ((s.method == "upcycle" || s.keep_seed_expert || s.router_init == "hidden") && s.seed.empty()) {
    r.FailMissing(JoinPath(path, "seed"), "a seed model dir (upcycle, keep_seed_expert and router_init: hidden need it)");
  }
  // Prompts for router_init: hidden, one list of paths per expert: [{name, train | valid}].
  const std::string data_path = JoinPath(path, "data");
  bool data_ok = true;
  if (v.contains("data") && !v["data"].is_null()) {
    if (!v["data"].is_array()) {
      r.Fail(data_path, v["data"], "a list of {name, train, valid}");
      data_ok = false;
    } else {
      for (size_t i = 0; i < v["data"].size(); ++i) {
        const std::string p = IndexPath(data_path, i);
        const json& d = v["data"][i];
        if (!r.Object(p, d, {"name", "train", "valid"})) continue;
        const std::string name = r.Name(d, p, "name");
        const char* key = d.contains("valid") && !d["valid"].is_null() ? "valid" : "train";
        s.prompts[name] = r.Paths(d.contains(key) ? d[key] : json(), JoinPath(p, key));
      }
    }
  }
  if (s.router_init == "hidden" && s.method == "btx" && data_ok) {
    for (const auto& [name, _] : s.experts) {
      if (!name.empty() && !s.prompts.count(name)) {
        r.FailMissing(data_path, "prompts for expert '" + name + "' (router_init: hidden)");
      }
    }
  }
  return s;
}

FinetuneSpec ParseFinetune(Reader& r, const json& v, const std::string& path) {
  FinetuneSpec s;
  if (!r.Object(path, v,
                {"model", "mixture", "train", "steps", "top_k", "load_balance", "z_loss", "router", "freeze",
                 "tokenizer"})) {
    return s;
  }
  s.model = r.PathField(v, path, "model", true);
  s.train = ParseTrain(r, v.contains("train") ? v["train"] : json(), JoinPath(path, "train"));
  s.steps = Steps(r, v, path);
  if (v.contains("top_k") && !v["top_k"].is_null()) s.top_k = r.Int(v, path, "top_k", 2, 1, 1024);
  if (v.contains("load_balance") && !v["load_balance"].is_null()) s.load_balance = r.Num(v, path, "load_balance", 0, {0, 100});
  if (v.contains("z_loss") && !v["z_loss"].is_null()) s.z_loss = r.Num(v, path, "z_loss", 0, {0, 100});
  if (v.contains("router") && !v["router"].is_null()) {
    s.router = r.Enum(v, path, "router", "softmax_topk", {"softmax_topk", "sparsemixer"});
  }
  s.freeze = r.EnumList(v, path, "freeze", kFreezeGroups);
  s.tokenizer = OptionalTokenizer(r, v, path);
  const std::string mix_path = JoinPath(path, "mixture");
  const json mix = v.contains("mixture") ? v["mixture"] : json();
  if (!mix.is_array() || mix.empty() || mix.size() > kMaxListEntries) {
    if (mix.is_null()) r.FailMissing(mix_path, "a list of 1.." + std::to_string(kMaxListEntries) + " {name, weight, train, valid}");
    else r.Fail(mix_path, mix, "a list of 1.." + std::to_string(kMaxListEntries) + " {name, weight, train, valid}");
    return s;
  }
  for (size_t i = 0; i < mix.size(); ++i) {
    const std::string p = IndexPath(mix_path, i);
    if (!r.Object(p, mix[i], {"name", "weight", "train", "valid", "format", "text_field"})) continue;
    MixtureEntry e;
    e.name = r.Name(mix[i], p, "name");
    e.weight = r.Num(mix[i], p, "weight", 1.0, {0, 1e6, true, false});
    json data = {{"train", mix[i].contains("train") ? mix[i]["train"] : json()}};
    for (const char* k : {"valid", "format", "text_field"})
      if (mix[i].contains(k)) data[k] = mix[i][k];
    e.data = ParseData(r, data, p);
    s.mixture.push_back(std::move(e));
  }
  return s;
}

EvalSpec ParseEval(Reader& r, const json& v, const std::string& path) {
  EvalSpec s;
  if (!r.Object(path, v, {"models", "domains", "max_tokens", "seq_len", "top_tokens", "min_token_count"})) return s;
  s.max_tokens = r.Int(v, path, "max_tokens", s.max_tokens, 1, int64_t{1} << 40);
  s.seq_len = r.Int(v, path, "seq_len", s.seq_len, 8, 131072);
  s.top_tokens = r.Int(v, path, "top_tokens", s.top_tokens, 0, 1024);
  s.min_token_count = r.Int(v, path, "min_token_count", s.min_token_count, 1, int64_t{1} << 40);
  const std::string models_path = JoinPath(path, "models");
  const json models = v.contains("models") ? v["models"] : json();
  if (!models.is_array() || models.empty() || models.size() > kMaxListEntries) {
    if (models.is_null()) r.FailMissing(models_path, "a list of 1.." + std::to_string(kMaxListEntries) + " {name, model} or {name, ensemble}");
    else r.Fail(models_path, models, "a list of 1.." + std::to_string(kMaxListEntries) + " {name, model} or {name, ensemble}");
  } else {
    for (size_t i = 0; i < models.size(); ++i) {
      const std::string p = IndexPath(models_path, i);
      const json& m = models[i];
      if (!r.Object(p, m, {"name", "model", "ensemble", "expert_names"})) continue;
      EvalModelSpec e;
      e.name = r.String(m, p, "name", 128);
      const bool has_model = m.contains("model"), has_ensemble = m.contains("ensemble");
      if (has_model == has_ensemble) {
        r.Fail(p, m, "exactly one of model or ensemble");
      } else if (has_model) {
        e.dirs.push_back(r.PathField(m, p, "model", true));
      } else {
        e.ensemble = true;
        e.dirs = r.Paths(m["ensemble"], JoinPath(p, "ensemble"), kMaxEnsemble);
      }
      if (m.contains("expert_names") && !m["expert_names"].is_null()) {
        const json& names = m["expert_names"];
        if (!names.is_array()) {
          r.Fail(JoinPath(p, "expert_names"), names, "a list of names");
        } else {
          for (size_t k = 0; k < names.size(); ++k) {
            if (names[k].is_string() && !names[k].get<std::string>().empty() && names[k].get<std::string>().size() <= 128) {
              e.expert_names.push_back(names[k].get<std::string>());
            } else {
              r.Fail(IndexPath(JoinPath(p, "expert_names"), k), names[k], "a name of 1-128 bytes");
            }
          }
        }
      }
      s.models.push_back(std::move(e));
    }
  }
  const std::string domains_path = JoinPath(path, "domains");
  const json domains = v.contains("domains") ? v["domains"] : json();
  if (!domains.is_array() || domains.empty() || domains.size() > kMaxListEntries) {
    if (domains.is_null()) r.FailMissing(domains_path, "a list of 1.." + std::to_string(kMaxListEntries) + " {name, valid}");
    else r.Fail(domains_path, domains, "a list of 1.." + std::to_string(kMaxListEntries) + " {name, valid}");
  } else {
    for (size_t i = 0; i < domains.size(); ++i) {
      const std::string p = IndexPath(domains_path, i);
      if (!r.Object(p, domains[i], {"name", "valid"})) continue;
      EvalDomainSpec d;
      d.name = r.String(domains[i], p, "name", 128);  // a label in reports only (escaped there), not a path
      d.valid = r.Paths(domains[i].contains("valid") ? domains[i]["valid"] : json(), JoinPath(p, "valid"));
      s.domains.push_back(std::move(d));
    }
  }
  return s;
}

}  // namespace btx::contract
