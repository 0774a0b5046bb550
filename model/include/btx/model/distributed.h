// Data-parallel training over torch c10d (Gloo on CPU, NCCL on CUDA when LibTorch has it): a job run as R ranks,
// each a btx-train process, that see the same global batch per optimizer step as one rank would (each takes its
// slice of every micro-batch) and sum their gradients before the optimizer step (replicated, or ZeRO-1: each rank
// updates its shard of the flat parameters and the shards are all-gathered).
//
// The ranks meet at a TCP store that the launcher starts (`btx-train --store-server`, which prints the port it
// bound) and find it, their rank and the world size in the environment:
//   BTX_RANK, BTX_WORLD_SIZE, BTX_RENDEZVOUS=host:port, BTX_DIST_TIMEOUT_S (collectives; default 300),
//   BTX_DIST_BUCKET_BYTES (gradient bucket size; default 25 MiB), BTX_DIST_OVERLAP (1: all-reduce buckets during
//   the backward pass, the default; 0: after it).
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

struct DistConfig {
  int rank = 0;
  int world_size = 1;
  std::string host = "127.0.0.1";
  int port = 0;
  std::chrono::seconds timeout{300};
  int64_t bucket_bytes = int64_t{25} << 20;
  bool overlap = true;
  // "cpu" or "cuda:N": CUDA ranks use NCCL when this build has it (DataParallel::backend()), else Gloo.
  std::string device = "cpu";
};
// The environment's setting; world_size 1 (no variables) means a single process.
StatusOr<DistConfig> DistConfigFromEnv();

// Whether this build can form NCCL groups (LibTorch with ProcessGroupNCCL, compiled with USE_C10D_NCCL).
bool HaveNccl();

class DataParallel {
 public:
  // Connects to the store and forms the group (blocks until every rank has joined, or the timeout).
  static StatusOr<std::unique_ptr<DataParallel>> Join(const DistConfig& cfg);
  ~DataParallel();

  int rank() const { return cfg_.rank; }
  int world_size() const { return cfg_.world_size; }
  const DistConfig& config() const { return cfg_; }
  const char* backend() const;  // "gloo" | "nccl"
  // Rows [begin, end) of a micro-batch of `rows` sequences that this rank computes.
  std::pair<int64_t, int64_t> Slice(int64_t rows) const;
  // Sum of a double over ranks.
  StatusOr<double> Sum(double value);
  // Every rank's `mine` (same size and dtype on every rank), in rank order; CPU tensors in and out.
  StatusOr<std::vector<at::Tensor>> AllGather(const at::Tensor& mine);
  // In place into `outs` (each of mine's size, on the group's device): the c10d call without copies.
  Status AllGatherInto(const at::Tensor& mine, std::vector<at::Tensor>& outs);
  Status Barrier();
  // The sum over ranks of `full` ([world * S], on the group's device): this rank's S elements [rank * S, ...).
  // NCCL reduce-scatters; Gloo (no reduce-scatter in LibTorch 1.13) all-reduces `full` in place and slices it.
  StatusOr<at::Tensor> ReduceScatter(at::Tensor& full);

  // Asynchronous in-place sum of one contiguous tensor; Wait() returns once every launched one finished.
  void LaunchAllReduce(const at::Tensor& t);
  Status WaitAll();

 private:
  struct Impl;  // the c10d store and process group, pending work
  explicit DataParallel(DistConfig cfg);
  DistConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

// Sums the gradients of `params` (the trainable parameters, in model order) over the ranks in flat buckets of
// about `bucket_bytes`, laid out in reverse parameter order (the order backward produces them). With `overlap`
// (and more than one bucket: with one there is nothing to overlap),
// hooks on the parameters copy each final gradient into its bucket as autograd produces it during an Arm()ed
// backward pass, and a bucket's all-reduce starts once it is full (buckets start in index order on every rank,
// so the collectives match). Finish() completes what the hooks did not see (parameters without a gradient in the
// last backward, a rank with no rows), waits for every bucket and writes the sums into the `.grad`s. Without
// overlap, Finish() does all of it after the backward pass. Both paths sum the same buffers in the same
// collectives, so their results are bitwise equal.
class GradReducer {
 public:
  GradReducer(DataParallel* dp, std::vector<at::Tensor> params, int64_t bucket_bytes, bool overlap);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  size_t num_buckets() const;
  // The next backward pass is the last one before the optimizer step: its hooks feed the buckets.
  void Arm();
  Status Finish();
  // Buckets whose all-reduce the last Finish() found already started by the hooks (0 without overlap).
  size_t launched_during_backward() const;

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with the hooks, which may outlive a failed step
  std::vector<unsigned> hook_ids_;
};

// The rendezvous store a launcher runs: binds `port` (0: any free one) on all interfaces, calls `on_bound` with
// the port, and serves until `stop` returns true (polled).
Status ServeStore(int port, const std::function<void(int)>& on_bound, const std::function<bool()>& stop);

}  // namespace btx::model
