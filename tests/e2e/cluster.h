// A btx deployment made of real processes for end-to-end tests: PostgreSQL (the shared test
// server, a fresh database), a btx-scheduler and N btx-workers, each started from the built
// binaries, killable with any signal and restartable against the same state.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "btx/common/process.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/pipeline_service.grpc.pb.h"

namespace btx::e2e {

// One row per attempt of a pipeline's jobs, ordered by job name and attempt: what the suites check
// after faults (who ran what, how it ended).
struct AttemptRow {
  std::string job, job_id, worker, outcome;
  int attempt = 0;
};
std::vector<AttemptRow> Attempts(const std::string& conninfo, const std::string& pipeline_id);

// Mutual TLS between the daemons, tokens for the test's own client.
struct ClusterTls {
  std::string ca_file;                   // signed the scheduler's and the workers' certificates
  std::string server_cert, server_key;   // the scheduler's, valid for 127.0.0.1
  std::string worker_cert, worker_key;   // every worker presents this one
  std::string tokens_file;               // the scheduler's --tokens-file
  std::string client_token;              // sent by Submit (a user or admin token in tokens_file)
};

struct ClusterOptions {
  int workers = 2;
  int lease_seconds = 3;
  int heartbeat_seconds = 1;
  int threads_per_job = 1;
  std::optional<ClusterTls> tls{};  // plaintext on loopback without
  std::vector<std::string> worker_args{};  // more btx-worker flags
};

class Cluster {
 public:
  explicit Cluster(ClusterOptions options = {});
  ~Cluster();

  absl::Status Start();
  absl::Status StartScheduler();
  absl::Status StartWorker(int index);
  // Signals a daemon's process (not its group: a -9 must look like the daemon dying alone).
  void SignalScheduler(int sig);
  void SignalWorker(int index, int sig);
  int WaitWorker(int index);
  int WaitScheduler();
  // The exit code if the daemon has exited, without waiting (nullopt while it runs, or is stopped).
  std::optional<int> PollWorker(int index);
  std::optional<int> PollScheduler();

  const std::string& dir() const { return dir_; }
  const std::string& artifact_root() const { return artifact_root_; }
  std::string scheduler_address() const { return "127.0.0.1:" + std::to_string(scheduler_port_); }
  int scheduler_metrics_port() const { return scheduler_metrics_port_; }
  int worker_metrics_port(int index) const { return worker_metrics_ports_.at(index); }
  storage::Store& store() { return *store_; }
  const std::string& conninfo() const { return conninfo_; }
  // With TLS, calls on it need the client token (AddAuth).
  v1::PipelineService::Stub& pipelines() { return *pipelines_; }
  void AddAuth(grpc::ClientContext& ctx) const;
  // Last lines of every daemon's log, for failure messages.
  std::string DaemonLogs(size_t tail_bytes = 4000) const;

  // Submits a spec (YAML) and returns the pipeline id, or an error status.
  absl::StatusOr<std::string> Submit(const std::string& spec);
  // Polls the database until the pipeline is terminal (or the deadline passes) and returns its state.
  std::string WaitForPipeline(const std::string& id, std::chrono::seconds limit);

 private:
  absl::StatusOr<int> ReadPortFile(const std::string& path, Process& proc);

  ClusterOptions options_;
  std::string dir_, artifact_root_, conninfo_;
  PosixProcessLauncher launcher_;
  std::unique_ptr<Process> scheduler_;
  std::map<int, std::unique_ptr<Process>> workers_;
  int scheduler_port_ = 0, scheduler_metrics_port_ = 0;
  std::map<int, int> worker_metrics_ports_;
  std::unique_ptr<storage::ConnectionPool> pool_;
  std::unique_ptr<storage::Store> store_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PipelineService::Stub> pipelines_;
};

// Small text corpora for three domains (code, math, prose), generated deterministically:
// <dir>/<domain>/{train,valid}.txt. Returns the domain names.
std::vector<std::string> MakeCorpora(const std::string& dir, size_t train_bytes);

}  // namespace btx::e2e
