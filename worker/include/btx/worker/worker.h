// The worker: registers with a scheduler, long-polls for jobs, runs each in a supervised `btx-train`
// child (docs/btx-train-protocol.md), heartbeats progress/checkpoints/logs, and reports the outcome
// fenced by (job_id, attempt). Used by the btx-worker daemon and embedded by `btxctl run`.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "btx/common/clock.h"
#include "btx/common/process.h"

namespace btx::metrics {
class Registry;
}

namespace btx::worker {

struct Capabilities {
  std::vector<int64_t> gpu_memory_bytes;  // one entry per visible CUDA device
  std::vector<std::string> gpu_names;
  // "0000:3b:00.0" per device in the same order, or empty when the driver did not say: how NVML
  // (GPU memory metrics) finds the device a CUDA index names.
  std::vector<std::string> gpu_pci_bus_ids;
  // What a child's CUDA_VISIBLE_DEVICES calls each device, in the same order: its CUDA ordinal, or the
  // worker's own CUDA_VISIBLE_DEVICES entry when it was started with one (its device 0 may be GPU 4).
  // An entry that is missing or empty stands for the device's index here.
  std::vector<std::string> gpu_cuda_ids;
  int gpus() const { return static_cast<int>(gpu_memory_bytes.size()); }
  int cpu_threads = 1;
  int64_t memory_bytes = 0;
};
// Through the CUDA runtime when the build has it (and a driver is present), else CPU only.
Capabilities DiscoverCapabilities();

struct WorkerConfig {
  std::string name;               // stable identity; default "<hostname>"
  std::string train_binary;       // default: btx-train next to this executable, else on PATH
  std::string work_dir;           // JOB.json files and per-attempt logs; default $TMPDIR/btx-worker-<name>
  // Concurrent jobs; 0 = one per GPU, or 1 without GPUs. A GPU job also needs its GPUs free: each job
  // holds exactly resources.gpus devices of its own, and a CPU job none. A job of several ranks holds one
  // slot: a GPU job one rank per device, a CPU job its resources.ranks ranks sharing the slot's threads.
  // A gang job (resources.nodes > 1) spans several workers, each running its own resources.ranks ranks.
  int slots = 0;
  int threads_per_job = 0;        // CPU threads given to each child; 0 = cpu_threads / slots
  Duration poll_wait = std::chrono::seconds(20);    // AcquireJob long-poll timeout
  Duration stop_grace = std::chrono::seconds(60);   // SIGTERM → SIGKILL for a child (or rank group) told to stop
  // BTX_DIST_TIMEOUT_S for multi-rank jobs: how long a rank waits in a collective for a dead or stuck
  // peer before it exits (and its group is stopped); 0 = btx-train's default (300 s).
  std::chrono::seconds dist_timeout{0};
  Duration backoff_min = std::chrono::milliseconds(100);  // reconnect backoff (doubles, capped)
  Duration backoff_max = std::chrono::seconds(5);
  Duration rpc_timeout = std::chrono::seconds(10);  // per unary call (AcquireJob adds poll_wait)
  int max_log_lines_per_heartbeat = 2000;
  // How often GPU memory is read for btx_worker_gpu_memory_*_bytes (with a metrics registry and
  // an NVIDIA driver); a few per Prometheus scrape interval.
  Duration gpu_metrics_interval = std::chrono::seconds(5);
  std::string bearer_token;       // sent as "authorization: Bearer …" when set
  // Gang jobs (resources.nodes > 1): the address at which the other members' ranks reach this worker's
  // rendezvous store and Gloo when it is node 0; empty = this host's hostname. 127.0.0.1 when every
  // member of a gang runs on this one machine.
  std::string advertise_host;
  // How long a gang member (node k > 0) waits for node 0 to report its rendezvous store before its attempt
  // fails (retryable). Node 0 starts the store after checking a leftover output (as long as hashing it
  // takes), and the address travels through two heartbeats.
  Duration gang_rendezvous_timeout = std::chrono::minutes(10);
  // What the host has, asked once at construction; empty = DiscoverCapabilities (tests fake a GPU host).
  std::function<Capabilities()> discover_capabilities;
  // Checks a job's output directory against its manifest.sha256; empty = the contract's VerifyManifest
  // (tests slow it down). Runs on the job's supervisor thread.
  std::function<absl::Status(const std::string& dir)> verify_artifact;
};

class Worker {
 public:
  // `registry` may be null (no metrics). Clock drives heartbeat/lease bookkeeping; waits use it too.
  Worker(WorkerConfig config, std::shared_ptr<grpc::Channel> channel, ProcessLauncher& launcher,
         const Clock& clock, metrics::Registry* registry = nullptr);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Blocks: register (retrying with backoff), then acquire and supervise jobs until Drain() or Stop()
  // has taken effect and every child has exited and been reported.
  void Run();
  // Stop taking work; running children get SIGTERM (they checkpoint and exit 75) and are reported as
  // interrupted, so their jobs resume elsewhere. Returns at once; Run() returns when done.
  void Drain();
  // Like Drain, but children are killed at once.
  void Stop();

  // The id the scheduler assigned (empty before registration).
  std::string worker_id() const;
  int running_jobs() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace btx::worker
