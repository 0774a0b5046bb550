// A btx deployment made of real processes for end-to-end tests: PostgreSQL (the shared test
// server, a fresh database), a btx-scheduler and N btx-workers, each started from the built
// binaries, killable with any signal and restartable against the same state.
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

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

// Every btx-train process of one attempt of a job on this machine, found through /proc: global rank
// (BTX_RANK) -> pid, and its rendezvous store as -1 (run in the attempt dir). Node 0 of a gang (and a
// single worker's job) runs in <job>-attempt-N, member k in <job>-attempt-N-node-k.
std::map<int, pid_t> AttemptProcesses(const std::string& job_id, int attempt);
// The process has exited and been reaped.
bool Gone(pid_t pid);
// A job's stored log lines, one per line: "<attempt> [<stream>] <text>".
std::string JobLogs(storage::Store& store, const std::string& job_id);

// The suites' tiny BTX pipeline over MakeCorpora's code and math domains (pretrain 4 steps, two experts,
// btx merge, finetune, eval), with `resources` (a YAML flow map) deciding how its training jobs run.
std::string TinySpec(const std::string& name, const std::string& data, int branch_steps, int checkpoint_every,
                     const std::string& resources);

// Small text corpora for three domains (code, math, prose), generated deterministically:
// <dir>/<domain>/{train,valid}.txt. Returns the domain names.
std::vector<std::string> MakeCorpora(const std::string& dir, size_t train_bytes);

// A test with its own cluster, started with corpora in data_; the daemons' logs are printed when it fails.
class ClusterTest : public ::testing::Test {
 protected:
  explicit ClusterTest(ClusterOptions options = {}) : cluster_(std::move(options)) {}
  void SetUp() override {
    data_ = cluster_.dir() + "/data";
    MakeCorpora(data_, 60000);
    auto s = cluster_.Start();
    ASSERT_TRUE(s.ok()) << s;
  }
  void TearDown() override {
    if (HasFailure()) std::cerr << cluster_.DaemonLogs() << "\n";
  }
  Cluster cluster_;
  std::string data_;
};

}  // namespace btx::e2e
