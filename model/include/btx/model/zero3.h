// ZeRO-3 (`train.zero: 3`, FSDP style): each rank keeps at rest only its shard of the float32 master weights of
// every *unit* (one decoder layer's trainable parameters, or the rest of the model's: embeddings, final norm,
// lm_head). A layer's full parameters exist only while it runs: RunShardedUnit all-gathers them around the
// layer's forward and frees them; its backward gathers them again, recomputes the layer (as activation
// checkpointing does), backpropagates and reduce-scatters the parameters' gradient into the rank's gradient shard.
// docs/btx-train-protocol.md, "ZeRO-3", has the memory math and the communication cost.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "btx/contract/status.h"
#include "btx/model/distributed.h"
#include "btx/model/llama.h"

namespace btx::model {

// The collectives ZeRO-3 needs: DataParallel's (MakeShardComm) or, in tests, a fake in one process.
class ShardComm {
 public:
  virtual ~ShardComm() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // `full` ([world * S], contiguous, on the group's device) receives every rank's `mine` ([S]) at r * S.
  virtual Status AllGather(const at::Tensor& mine, at::Tensor& full) = 0;
  // The sum over ranks of `full` ([world * S]); returns this rank's S elements of it. May overwrite `full`.
  virtual StatusOr<at::Tensor> ReduceScatter(at::Tensor& full) = 0;
};
std::unique_ptr<ShardComm> MakeShardComm(DataParallel* dp);

// A unit's layout: its trainable parameters flattened in model order (N elements), padded to world * S with
// S = ceil(N / world); rank r owns the unit's elements [r * S, min((r + 1) * S, N)).
struct ShardedUnit {
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<int64_t> offsets;  // of each parameter in the unit's flat
  int64_t numel = 0, shard = 0;  // N, S

  void Add(const std::string& name, std::vector<int64_t> shape);
  void Finish(int world);  // sets shard
  // The parameters as views of `full` ([world * S] or longer than N), by name.
  std::unordered_map<std::string, at::Tensor> Views(const at::Tensor& full) const;
};

// fn(x, parameters) with the unit's parameters gathered from every rank's `shard` ([S] float32, the rank's
// master weights: a leaf that requires grad) and freed after fn returns. Differentiable in x and shard: the
// backward gathers the parameters again, reruns fn under the forward's RNG and autocast state, backpropagates
// through the rerun and reduce-scatters the parameters' gradient, summed over ranks, into shard's gradient ([S]).
// Every rank must call it for the same units in the same order (forward and backward): it is collective. A failed
// collective throws (std::runtime_error with the Status message). Under no-grad mode: gather, fn, free.
std::vector<at::Tensor> RunShardedUnit(std::shared_ptr<const ShardedUnit> unit, ShardComm* comm, const LayerFn& fn,
                                       const at::Tensor& x, const at::Tensor& shard);

}  // namespace btx::model
