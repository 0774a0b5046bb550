// What each job kind reads from its `spec` (docs/btx-train-protocol.md): one struct per kind with its
// defaults and bounds, and one parser per struct. The scheduler runs these parsers on every job it plans
// at submit; btx-train runs the same ones on JOB.json. What submit accepts, the trainer runs as written.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "btx/contract/fields.h"

namespace btx::contract {

// Hard bounds of the contract itself. An operator may set tighter ones at submit (scheduler SpecLimits).
inline constexpr int64_t kMaxSteps = 1'000'000'000;
inline constexpr size_t kMaxPaths = 4096;
inline constexpr size_t kMaxListEntries = 1024;  // experts, mixture entries, eval models and domains
inline constexpr size_t kMaxEnsemble = 64;       // models in one eval ensemble

// Training hyper-parameters (`train`). Defaults are the ones documented in docs/btx-train-protocol.md.
struct TrainConfig {
  int64_t batch_tokens = 8192;  // tokens per optimizer step = sequences * seq_len (split over grad_accum)
  int64_t seq_len = 256;
  double lr = 3e-4;
  double min_lr_ratio = 0.1;  // cosine and linear end at lr * min_lr_ratio
  int64_t warmup = 30;
  std::string schedule = "cosine";  // cosine | linear | constant
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // 0 disables
  int64_t grad_accum = 1;
  uint64_t seed = 1234;
  int64_t checkpoint_every = 50;  // 0: only at the end and on SIGTERM
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  int64_t log_every = 10;
  int64_t valid_tokens = 65536;  // validation budget per domain at the end
  int64_t keep_checkpoints = 2;
  int64_t threads = 0;  // CPU threads of the trainer; 0 = what the worker gives the job
  // Memory at long sequences / large vocabularies (docs/btx-train-protocol.md): the attention kernel
  // (auto | naive | chunked), per-layer activation recomputation, and the cross-entropy over chunks of this many
  // tokens without the full [tokens, vocab] logits (0: off).
  std::string attention = "auto";
  bool activation_checkpointing = false;
  int64_t loss_chunk_tokens = 0;
  // With several ranks: 1 shards the optimizer state (ZeRO-1), 3 the parameters and gradients too (ZeRO-3),
  // 0 replicates everything. 2 is refused.
  int64_t zero = 1;
  std::string precision = "fp32";     // fp32 | bf16 (autocast forward, fp32 weights and optimizer state)

  int64_t sequences_per_step() const { return std::max<int64_t>(1, batch_tokens / seq_len); }
  int64_t micro_batch() const { return (sequences_per_step() + grad_accum - 1) / grad_accum; }
};
TrainConfig ParseTrain(Reader& r, const nlohmann::json& v, const std::string& path);
nlohmann::json ToJson(const TrainConfig& c);

// The tokenizer of a seed trained from scratch, or of a seed directory that carries none.
struct TokenizerSpec {
  enum class Kind { kByte, kSentencePiece, kTrainSentencePiece };
  Kind kind = Kind::kByte;
  std::string path;        // kSentencePiece: the .model file
  int64_t vocab_size = 0;  // kTrainSentencePiece
};
// "byte" | "<path to a sentencepiece .model>" | {type: byte} | {sentencepiece: PATH} |
// {type: sentencepiece, vocab_size: N} (trains one on the data: pretrain only, `allow_train`).
TokenizerSpec ParseTokenizer(Reader& r, const nlohmann::json& v, const std::string& path, bool allow_train);
nlohmann::json ToJson(const TokenizerSpec& t);

// A Llama model initialised from scratch (`seed.init`): a preset, and Hugging Face config names that
// override it. Every field is resolved here, so that what submit shows is what the model gets.
struct ModelInit {
  std::string preset = "tiny";  // tiny (D 64, 2 layers) | small (D 256, 4 layers)
  int64_t hidden_size = 64;
  int64_t intermediate_size = 176;
  int64_t num_hidden_layers = 2;
  int64_t num_attention_heads = 4;
  int64_t num_key_value_heads = 2;
  int64_t max_position_embeddings = 2048;
  int64_t vocab_size = 0;  // 0: the tokenizer's
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  double initializer_range = 0.02;
  bool tie_word_embeddings = false;
};
// The preset's sizes; false for an unknown name.
bool ApplyPreset(const std::string& name, ModelInit& init);
ModelInit ParseModelInit(Reader& r, const nlohmann::json& v, const std::string& path);
nlohmann::json ToJson(const ModelInit& m);

struct DataSpec {
  std::vector<std::string> train;
  std::vector<std::string> valid;  // may be empty
  // text | jsonl | chat; empty: each file's from its extension (*.jsonl: chat when records have "messages").
  std::string format;
  std::string text_field = "text";  // format jsonl: the field holding each record's text
};
inline const std::vector<std::string> kDataFormats = {"text", "jsonl", "chat"};
DataSpec ParseData(Reader& r, const nlohmann::json& v, const std::string& path, size_t max_paths = kMaxPaths);
// `format` and `text_field` of an object that passed Object() with them allowed (a data entry, a mixture entry).
void ParseDataFormat(Reader& r, const nlohmann::json& v, const std::string& path, DataSpec& d);
nlohmann::json ToJson(const DataSpec& d);

struct PretrainSpec {
  ModelInit init;
  TokenizerSpec tokenizer;
  DataSpec data;
  TrainConfig train;
  int64_t steps = 0;
};

struct BranchSpec {
  std::string seed;           // model dir
  std::string name = "train";  // the domain's name in metric keys
  std::optional<TokenizerSpec> tokenizer;  // only for a seed dir without one
  DataSpec data;
  TrainConfig train;
  int64_t steps = 0;
};

// Mixes dense models into one MoE (btx, upcycle) or averages them (btm).
struct MergeSpec {
  std::string method = "btx";  // btx | upcycle | btm
  std::string seed;            // seed model dir (required for upcycle, keep_seed_expert, router_init=hidden)
  std::vector<std::pair<std::string, std::string>> experts;  // (name, model dir)
  bool keep_seed_expert = false;  // btx: the seed FFN becomes one more expert (last slot)
  std::string router_init = "random";  // random | hidden
  int64_t top_k = 2;
  int64_t num_experts = 0;  // upcycle: number of copies; 0 = number of listed experts (or 4 without any)
  // router_init=hidden: per expert name, data whose mean FFN input (seed model) becomes the router row.
  std::map<std::string, std::vector<std::string>> prompts;
  int64_t hidden_tokens = 4096;
  uint64_t random_seed = 1234;
  uint64_t max_shard_bytes = 2ull << 30;
};

struct MixtureEntry {
  std::string name;
  double weight = 1.0;
  DataSpec data;
};

struct FinetuneSpec {
  std::string model;  // MoE dir
  std::vector<MixtureEntry> mixture;
  TrainConfig train;
  int64_t steps = 0;
  // Unset: the model's config.json decides.
  std::optional<int64_t> top_k;
  std::optional<double> load_balance, z_loss;
  std::optional<std::string> router;  // softmax_topk | sparsemixer
  std::vector<std::string> freeze;    // experts | attention | embeddings | norms | all_but_router
  std::optional<TokenizerSpec> tokenizer;
};
inline const std::vector<std::string> kFreezeGroups = {"experts", "attention", "embeddings", "norms", "all_but_router"};

struct EvalModelSpec {
  std::string name;
  std::vector<std::string> dirs;  // one dir: a model; several: an ensemble (mean of next-token probabilities)
  // MoE only: a name per expert for the reports (default: config.json's "btx_expert_names", else "expert N").
  std::vector<std::string> expert_names;
  bool ensemble = false;  // given as `ensemble` (even of one dir)
};
struct EvalDomainSpec {
  std::string name;
  std::vector<std::string> valid;
};
struct EvalSpec {
  std::vector<EvalModelSpec> models;
  std::vector<EvalDomainSpec> domains;
  int64_t max_tokens = 65536;   // per domain
  int64_t seq_len = 256;
  int64_t top_tokens = 8;       // token specialization: tokens listed per expert and layer
  int64_t min_token_count = 4;  // token specialization: token ids seen fewer times are left out of the score
};

PretrainSpec ParsePretrain(Reader& r, const nlohmann::json& v, const std::string& path);
BranchSpec ParseBranch(Reader& r, const nlohmann::json& v, const std::string& path);
MergeSpec ParseMerge(Reader& r, const nlohmann::json& v, const std::string& path);
FinetuneSpec ParseFinetune(Reader& r, const nlohmann::json& v, const std::string& path);
EvalSpec ParseEval(Reader& r, const nlohmann::json& v, const std::string& path);

}  // namespace btx::contract
