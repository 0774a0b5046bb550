// Trainer: AdamW, warmup + cosine to a floor, clipping, accumulation, checkpoints, exact resume.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "btx/contract/specs.h"
#include "btx/model/data.h"
#include "btx/model/distributed.h"
#include "btx/model/llama.h"

namespace btx::model {

// The `train` hyper-parameters: the job contract's struct, with its defaults and bounds (contract/specs.h).
using contract::TrainConfig;

double LearningRate(const TrainConfig& c, int64_t step, int64_t total_steps);  // step is 0-based

struct DomainData {
  std::string name;
  double weight = 1.0;
  TokenStream train, valid;
  LossMask train_loss{}, valid_loss{};  // chat data: which targets count (null: all)
};

struct TrainOptions {
  int64_t steps = 100;
  std::string checkpoint_dir;          // empty: no checkpoints
  std::vector<std::string> freeze;     // experts | attention | embeddings | norms | all_but_router
  int64_t top_k = 0;                   // MoE override, 0 = config
  MoeBackend backend = MoeBackend::kKernels;
  std::string device = "cpu";
  // Data parallel over several ranks (distributed.h); null: one process. Rank 0 alone emits events; with
  // `train.zero` 1 each rank holds and checkpoints its shard of the optimizer state, rank 0 the rest.
  DataParallel* dp = nullptr;
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
  StatusOr<double> TrainStep();
  void Emit(const nlohmann::json& j);
  // A piece of one trainable parameter inside an optimizer shard: elements [param_off, param_off + len) of
  // trainable parameter k (flattened) are elements [state_off, state_off + len) of the shard.
  struct Segment {
    size_t k;
    int64_t param_off, state_off, len;
  };
  std::vector<Segment> SegmentsOf(int64_t begin, int64_t end) const;
  Status GatherParams();  // ZeRO-1: every rank's updated shard to every rank
  Status WriteOptimizerShard(const std::string& path, std::string* sha256) const;
  Status LoadOptimizerState(const std::string& dir, const nlohmann::json& state);

  LlamaModel* model_;
  TrainConfig cfg_;
  TrainOptions opts_;
  std::vector<DomainData> data_;
  TrainHooks hooks_;
  std::unique_ptr<MixtureSampler> sampler_;
  std::vector<size_t> trainable_;  // indices into model params
  // AdamW's moments over this rank's shard [shard_begin_, shard_end_) of the trainable parameters flattened in
  // model order (the whole of them unless ZeRO-1), float32 whatever the precision.
  std::vector<int64_t> flat_offsets_;
  int64_t flat_numel_ = 0, shard_size_ = 0, shard_begin_ = 0, shard_end_ = 0;
  bool zero_ = false;
  std::vector<Segment> segments_;
  std::vector<std::vector<Segment>> rank_segments_;  // ZeRO-1: every rank's, for the all-gather
  at::Tensor exp_avg_, exp_avg_sq_;
  std::unique_ptr<GradReducer> reducer_;
  int64_t step_ = 0;
  double last_loss_ = 0;
  std::string last_checkpoint_;
};

// Frozen-parameter rule shared with tests: does `freeze` exclude parameter `name`?
bool IsFrozen(const std::string& name, const std::vector<std::string>& freeze);

}  // namespace btx::model
