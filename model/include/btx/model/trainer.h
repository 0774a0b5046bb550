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
#include "btx/model/zero3.h"

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
  // `train.zero` 1 each rank holds and checkpoints its shard of the optimizer state, rank 0 the rest. With
  // `train.zero` 3 each rank holds only its shard of the trainable parameters too (zero3.h): the model's trainable
  // tensors are then shape-only placeholders (device meta) until Run() completes, when rank 0's model gets the
  // full trained weights back (the other ranks' keep the placeholders).
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
  // ZeRO-3: the elements are also [unit_off, unit_off + len) of unit_shard_[unit].
  struct Segment {
    size_t k;
    int64_t param_off, state_off, len;
    size_t unit = 0;
    int64_t unit_off = 0;
  };
  // Elements [begin, end) of the flat trainable parameters, at state_off in a rank's optimizer state.
  struct Range {
    int64_t begin, end, state_off;
  };
  std::vector<Segment> SegmentsOf(int64_t begin, int64_t end) const;
  Status GatherParams();  // ZeRO-1: every rank's updated shard to every rank
  std::vector<Segment> Zero3SegmentsOf(int rank) const;  // rank's shards of every unit, in unit order
  std::vector<Range> OwnedRanges(int rank) const;          // what rank's optimizer state holds, in its order
  // ZeRO-3: the outer unit (embeddings, final norm, lm_head) gathered into the model for one step, and its
  // gradients reduce-scattered into unit_shard_[0]'s after the step's backward passes.
  Status GatherOuterUnit();
  Status ReduceOuterUnit();
  // ZeRO-3, collective: every trainable parameter gathered whole, unit by unit; written into `dst` (the model's
  // parameter list or a copy of it) when not null, on `device`.
  Status GatherFullParams(std::vector<std::pair<std::string, at::Tensor>>* dst, c10::Device device);
  void ToPlaceholders(const std::vector<size_t>& ks);  // the model's tensors of trainable parameters ks
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
  bool zero_ = false;   // optimizer state sharded: ZeRO-1 or ZeRO-3 with several ranks
  bool zero3_ = false;  // parameters and gradients sharded too
  c10::Device device_{c10::kCPU};
  std::unique_ptr<ShardComm> comm_;
  // ZeRO-3 units: 0 = trainable parameters outside the decoder layers, 1 + l = layer l's; their members (indices
  // into trainable_) and this rank's float32 master shard of each ([S], a leaf whose .grad is the gradient shard).
  std::vector<std::shared_ptr<ShardedUnit>> units_;
  std::vector<std::vector<size_t>> unit_members_;
  std::vector<at::Tensor> unit_shard_;
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
