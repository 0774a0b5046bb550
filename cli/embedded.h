// The embedded default: with no --server, btxctl brings up the whole system in its own process —
// a private PostgreSQL under the state dir, the scheduler on loopback, and (for `run`) local
// workers — and talks to it over gRPC exactly as it would to a remote scheduler. All state is in
// PostgreSQL under the state dir, so a later btxctl finds every pipeline again.
#pragma once

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/common/clock.h"
#include "btx/common/process.h"

namespace btx::storage {
struct Database;
}  // namespace btx::storage
namespace btx::scheduler {
class Scheduler;
}
namespace btx::worker {
class Worker;
}

namespace btx::cli {

// `--state-dir` in use by another `btxctl run`'s local worker.
inline constexpr char kStateDirBusy[] = "another btxctl run is running jobs in state dir ";

struct EmbeddedConfig {
  std::string state_dir = ".btx";   // PostgreSQL in <dir>/pgdata, artifacts in <dir>/artifacts
  bool require_existing = false;    // read-only commands: refuse to create a fresh state dir
  bool workers = false;             // run local workers (btxctl run)
  // Local workers for `run` (a gang job of resources.nodes_per_job K needs K of them). Each has its own
  // name (LocalWorkerNames), work dir, an equal disjoint share of the GPUs and of the CPU threads.
  int local_workers = 1;
  int slots = 0;                    // jobs at once per local worker; 0 = one per GPU of its share, or 1
  int threads_per_job = 0;          // 0 = hardware threads / (local workers x slots)
  std::string train_binary;         // empty: btx-train next to btxctl, else on PATH
  // Progress reaches the display through heartbeats, so the embedded stack beats often.
  Duration heartbeat = std::chrono::seconds(1);
  Duration lease = std::chrono::seconds(30);
  Duration stop_grace = std::chrono::seconds(60);  // SIGTERM -> SIGKILL for a draining child
};

// The names of `count` local workers of this host: "btxctl@HOST" (what a single local worker has always
// been called, so that earlier state dirs keep working), then "btxctl@HOST-2", "btxctl@HOST-3", ...
std::vector<std::string> LocalWorkerNames(int count);

// The disjoint share of `gpus` GPUs that local worker `index` of `count` gets: floor(gpus / count)
// consecutive devices; the remainder stays unused so that every worker can run the same jobs.
struct GpuShare {
  int first = 0, count = 0;
};
GpuShare LocalWorkerGpus(int gpus, int index, int count);

// Where btx-train is: `configured` if set, else next to this executable, else on PATH. An error
// says where it looked and how to fix it.
absl::StatusOr<std::string> FindTrainBinary(const std::string& configured);

class EmbeddedStack {
 public:
  static absl::StatusOr<std::unique_ptr<EmbeddedStack>> Start(EmbeddedConfig config);
  // Drains and joins the workers, stops the scheduler, and stops PostgreSQL unless another btxctl is
  // still using it (whoever started it: a killed btxctl's server is not left running).
  ~EmbeddedStack();

  std::string target() const;  // "127.0.0.1:<port>"
  const std::string& state_dir() const { return config_.state_dir; }
  const std::string& artifact_root() const { return artifact_root_; }
  const std::string& log_file() const { return log_file_; }
  int gpus() const { return gpus_; }                        // of the machine
  int gpus_per_worker() const { return gpus_per_worker_; }  // each local worker's share
  int local_workers() const { return static_cast<int>(workers_.size()); }
  int slots() const { return slots_; }                      // per local worker
  int threads_per_job() const { return threads_per_job_; }

  // Running children checkpoint and stop; their jobs are reported as interrupted (or cancelled).
  void DrainWorkers();
  // Running children are killed at once.
  void StopWorkers();
  // Blocks until every worker has reported its last job and returned.
  void WaitWorkers();

 private:
  explicit EmbeddedStack(EmbeddedConfig config);

  EmbeddedConfig config_;
  std::string artifact_root_, log_file_;
  int port_ = 0, gpus_ = 0, gpus_per_worker_ = 0, slots_ = 1, threads_per_job_ = 1;
  PosixProcessLauncher launcher_;
  SystemClock clock_;
  std::unique_ptr<storage::Database> db_;
  std::unique_ptr<scheduler::Scheduler> scheduler_;
  std::vector<std::unique_ptr<worker::Worker>> workers_;
  std::vector<std::thread> worker_threads_;
  // flock(2)s on files in the state dir, released by the kernel however btxctl ends:
  // every btxctl holds `.db.lock` shared while it uses the database (the last one out stops PostgreSQL,
  // holding it exclusively); the one running the local workers holds `.worker.lock` exclusively.
  int db_lock_fd_ = -1, worker_lock_fd_ = -1;
  // Requeues the jobs still leased to any local worker of this host ("btxctl@HOST" or "btxctl@HOST-N",
  // however many an earlier btxctl ran).
  absl::Status AdoptOrphanedLeases();
};

}  // namespace btx::cli
