// Trainer: AdamW, warmup + cosine to a floor, clipping, accumulation, checkpoints, exact resume.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "btx/model/data.h"
#include "btx/model/llama.h"

namespace btx {

struct TrainConfig {
  int64_t batch_tokens = 8192;  // tokens per optimizer step = sequences * seq_len (split over grad_accum)
  int64_t seq_len = 256;
  double lr = 3e-4;
  double min_lr_ratio = 0.1;    // cosine ends at lr * min_lr_ratio
  int64_t warmup = 30;
  std::string schedule = "cosine";  // cosine | constant | linear
  double weight_decay = 0.1;
  double grad_clip = 1.0;       // <= 0 disables
  int64_t grad_accum = 1;
  uint64_t seed = 1234;
  int64_t checkpoint_every = 50;  // <= 0: only at the end
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  int64_t log_every = 10;
  int64_t valid_tokens = 65536;  // validation budget per domain at the end
  int64_t keep_checkpoints = 2;

  int64_t sequences_per_step() const { return std::max<int64_t>(1, batch_tokens / seq_len); }
  int64_t micro_batch() const { return (sequences_per_step() + grad_accum - 1) / grad_accum; }
};

// Parses the protocol's `train` object; errors name the field ("train.lr: must be > 0").
StatusOr<TrainConfig> TrainConfigFromJson(const nlohmann::json& j);
double LearningRate(const TrainConfig& c, int64_t step, int64_t total_steps);  // step is 0-based

struct DomainData {
  std::string name;
  double weight = 1.0;
  TokenStream train, valid;
};

struct TrainOptions {
  int64_t steps = 100;
  std::string checkpoint_dir;          // empty: no checkpoints
  std::vector<std::string> freeze;     // experts | attention | embeddings | norms | all_but_router
  int64_t top_k = 0;                   // MoE override, 0 = config
  MoeBackend backend = MoeBackend::kKernels;
  std::string device = "cpu";
};

struct TrainHooks {
  std::function<void(const nlohmann::json&)> emit;          // protocol events
  std::function<Status(const std::string& dir)> extra_files;  // e.g. tokenizer, written into checkpoints
  const std::atomic<bool>* stop = nullptr;                  // checked after every optimizer step
};

enum class TrainOutcome { kCompleted, kInterrupted };

class Trainer {
 public:
  Trainer(LlamaModel* model, TrainConfig cfg, TrainOptions opts, std::vector<DomainData> data, TrainHooks hooks);
  Status Init();
  // Resumes from the newest checkpoint under checkpoint_dir whose manifest verifies; OK if there is none.
  Status ResumeFromLatest();
  Status ResumeFrom(const std::string& checkpoint);
  StatusOr<TrainOutcome> Run();
  Status SaveCheckpoint();
  // Mean next-token loss per domain over its validation tokens.
  std::map<std::string, double> Validate();
  int64_t step() const { return step_; }
  double last_loss() const { return last_loss_; }
  const std::string& last_checkpoint() const { return last_checkpoint_; }

 private:
  double TrainStep();
  void Emit(const nlohmann::json& j);

  LlamaModel* model_;
  TrainConfig cfg_;
  TrainOptions opts_;
  std::vector<DomainData> data_;
  TrainHooks hooks_;
  std::unique_ptr<MixtureSampler> sampler_;
  std::vector<size_t> trainable_;  // indices into model params
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  int64_t step_ = 0;
  double last_loss_ = 0;
  std::string last_checkpoint_;
};

// Frozen-parameter rule shared with tests: does `freeze` exclude parameter `name`?
bool IsFrozen(const std::string& name, const std::vector<std::string>& freeze);
Status ValidateFreeze(const std::vector<std::string>& freeze);

}  // namespace btx
