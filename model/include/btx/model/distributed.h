// Data-parallel training over torch c10d (Gloo on CPU): a job run as R ranks, each a btx-train process, that
// see the same global batch per optimizer step as one rank would (each takes its slice of every micro-batch)
// and sum their gradients before a replicated optimizer step.
//
// The ranks meet at a TCP store that the launcher starts (`btx-train --store-server`, which prints the port it
// bound) and find it, their rank and the world size in the environment:
//   BTX_RANK, BTX_WORLD_SIZE, BTX_RENDEZVOUS=host:port, BTX_DIST_TIMEOUT_S (collectives; default 300).
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
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
};
// The environment's setting; world_size 1 (no variables) means a single process.
StatusOr<DistConfig> DistConfigFromEnv();

class DataParallel {
 public:
  // Connects to the store and forms the group (blocks until every rank has joined, or the timeout).
  static StatusOr<std::unique_ptr<DataParallel>> Join(const DistConfig& cfg);
  ~DataParallel();

  int rank() const { return cfg_.rank; }
  int world_size() const { return cfg_.world_size; }
  // Rows [begin, end) of a micro-batch of `rows` sequences that this rank computes.
  std::pair<int64_t, int64_t> Slice(int64_t rows) const;
  // Sums the gradients over ranks, in flat buckets of about `bucket_bytes` (one collective per bucket).
  Status AllReduceGradients(const std::vector<at::Tensor>& grads, int64_t bucket_bytes = 25 << 20);
  // Sum of a double over ranks.
  StatusOr<double> Sum(double value);
  Status Barrier();

 private:
  struct Impl;  // the c10d store and process group
  explicit DataParallel(DistConfig cfg);
  DistConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

// The rendezvous store a launcher runs: binds `port` (0: any free one) on all interfaces, calls `on_bound` with
// the port, and serves until `stop` returns true (polled).
Status ServeStore(int port, const std::function<void(int)>& on_bound, const std::function<bool()>& stop);

}  // namespace btx::model
