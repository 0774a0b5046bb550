// Supervises one attempt of one job: its `btx-train` child, or its rank group (a rendezvous store and
// one btx-train per rank, supervised as one: docs/btx-train-protocol.md, "Several ranks"), their log and
// progress pipes, and the translation of how it ended into what the scheduler must be told. A gang job
// (resources.nodes > 1) spans several workers: each runs a JobRunner for its own member of the gang
// (docs/btx-train-protocol.md, "Gangs").
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "btx/common/clock.h"
#include "btx/common/process.h"
#include "btx/v1/worker_service.pb.h"

namespace btx::worker {

struct JobRunnerConfig {
  std::string train_binary;
  std::string attempt_dir;     // JOB.json and a copy of the log live here
  int threads = 0;
  // The job's GPUs as CUDA_VISIBLE_DEVICES names them, all of them its own; empty: a CPU job, which is shown
  // no GPU at all.
  std::vector<std::string> gpus;
  // Processes of the job's rank group (resources.ranks). With more than one, `threads` is split evenly
  // across them (at least 1 each), and a GPU job must have one GPU per rank: rank r sees gpus[r] only.
  int ranks = 1;
  // BTX_DIST_TIMEOUT_S for the ranks: how long a collective waits on a dead or stuck peer before the
  // rank exits 1 (and the group is stopped). 0: btx-train's default.
  std::chrono::seconds dist_timeout{0};
  // How long the rendezvous store may take to print its port before the attempt fails (retryable); on a
  // gang member (node_rank > 0), how long Start waits for node 0's rendezvous before it fails (retryable).
  Duration rendezvous_timeout = std::chrono::seconds(60);
  // A gang (nodes > 1): this worker is member node_rank of `nodes`, each running `ranks` ranks; the job's
  // world is nodes * ranks and this member's ranks are node_rank * ranks ... + ranks - 1 of it. Node 0
  // always starts the store (even with one rank of its own), reports its "<advertise_host>:<port>"
  // (TakeReport) and alone reports progress and publishes; a member k > 0 starts no store and launches its
  // ranks once it has node 0's rendezvous (the assignment's, or SetRendezvous).
  int node_rank = 0;
  int nodes = 1;
  // Where the other members' ranks reach node 0's store (and Gloo its ranks): its host in the rendezvous
  // node 0 reports. 127.0.0.1 when every member runs on this machine. A one-worker group always uses
  // 127.0.0.1.
  std::string advertise_host = "127.0.0.1";
  Duration stop_grace = std::chrono::seconds(60);
  size_t max_pending_log_lines = 20000;  // kept while the scheduler is unreachable; oldest dropped
  // The manifest check of an output directory; empty = the contract's VerifyManifest.
  std::function<absl::Status(const std::string& dir)> verify_artifact;
};

// "node 1 of 2, ranks 2-3 of 4" (or "rank 1 of 2" with one rank per node): where a gang member's ranks
// stand in the job's world.
std::string GangPlace(int node_rank, int nodes, int ranks);

enum class StopReason { kNone, kCancel, kDrain, kLeaseLost, kKill };

struct Outcome {
  // kMemberDone: a gang member (node_rank > 0) whose ranks all exited 0; node 0 reports the job, this
  // member nothing.
  enum Kind { kSucceeded, kInvalidInput, kRetryable, kCancelled, kLeaseLost, kMemberDone };
  Kind kind = kRetryable;
  int exit_code = -1;
  std::string artifact_uri;   // kSucceeded
  std::string result_json;    // kSucceeded: the `done` metrics
  std::string error;          // otherwise: one line for the user
  std::string checkpoint_uri;  // newest checkpoint seen, for Fail
};

class JobRunner {
 public:
  JobRunner(v1::JobAssignment job, JobRunnerConfig config, ProcessLauncher& launcher, const Clock& clock);
  ~JobRunner();
  JobRunner(const JobRunner&) = delete;
  JobRunner& operator=(const JobRunner&) = delete;

  // Checks an output dir left by an earlier attempt (removed only when it is positively corrupt; one that
  // cannot be read fails the start, Unavailable), writes JOB.json, launches the child (a rank group: the
  // store, then every rank) and the pipe reader. On error nothing is running. A stop requested before the
  // children are launched ends it here (Aborted).
  // A gang member (node_rank > 0) checks no output; it waits (on a condition variable) for node 0's
  // rendezvous, at most rendezvous_timeout (then Unavailable, retryable) and only until a stop is
  // requested (Aborted), then launches its ranks.
  // Runs on the supervisor thread, with the job in heartbeats: the check may take as long as hashing
  // the output does, and the children must be launched by the thread that outlives them (PDEATHSIG).
  absl::Status Start();
  // Progress, a checkpoint new since the last report, and the log lines not yet acknowledged. Node 0 of
  // a gang adds its rendezvous until SetRendezvous has acknowledged it; a member reports no progress.
  v1::JobReport TakeReport(size_t max_log_lines);
  // The heartbeat carrying `report` failed: keep its lines (and checkpoint) for the next one.
  void ReturnReport(v1::JobReport report);
  void RequestStop(StopReason reason);
  // A JobStatus of this attempt carried `rendezvous` (non-empty): to a member, node 0's store (ends the
  // wait in Start; the first one it gets stands); to node 0, the acknowledgement of its own.
  void SetRendezvous(const std::string& rendezvous);
  // Node 0: its store's "<advertise_host>:<port>" once listening; a member: node 0's, once known. Else "".
  std::string rendezvous() const;
  bool gang_member() const { return config_.nodes > 1 && config_.node_rank > 0; }
  StopReason stop_reason() const { return stop_reason_.load(); }
  bool finished() const { return finished_.load(); }
  // Blocks until every child has exited and its pipes are drained, then verifies the output it reported
  // (without holding the lock TakeReport needs: heartbeats go on meanwhile).
  Outcome Wait();
  // The outcome of an attempt whose child never ran, Start having returned `why`.
  Outcome NotStarted(const absl::Status& why) const;

  const v1::JobAssignment& job() const { return job_; }
  TimePoint lease_deadline() const;
  void set_lease_deadline(TimePoint t);

 private:
  // One process of the attempt: a rank, or the group's rendezvous store. Touched by the thread that
  // launches it (Start) and then by the reader thread only.
  struct Member {
    int rank = -1;  // this worker's index of the rank (its place in members_); -1: the rendezvous store
    int global_rank = -1;  // BTX_RANK: node_rank * ranks + rank
    std::unique_ptr<Process> proc{};
    std::string prefix{};  // put before each of its log lines: "" for rank 0, "[rank 1] ", "[rendezvous] "
    std::optional<int> exit_code{};
    std::string last_stderr_line{};
  };

  absl::Status LaunchGroup(const std::string& job_path, std::string member_rendezvous, std::string* described);
  absl::StatusOr<int> WaitForStorePort(Member& store);
  absl::StatusOr<std::string> AwaitRendezvous();
  std::string RankName(int global_rank) const;
  void KillLaunched();
  void ReadLoop();
  void CheckExits();
  void OnLine(Member& m, const std::string& stream, const std::string& text);
  void OnProgressEvent(const std::string& line);
  void AddLog(const std::string& stream, const std::string& text);
  void AddLogLocked(const std::string& stream, std::string text);
  void SignalRanks(int sig);
  void EscalateIfOverdue();
  void SettleGroupExit();
  absl::Status CheckLeftoverOutput(const std::string& output_dir);
  Outcome Classify();

  v1::JobAssignment job_;
  JobRunnerConfig config_;
  ProcessLauncher& launcher_;
  const Clock& clock_;
  int ranks_ = 1;
  int world_ = 1;       // nodes * ranks_
  int first_rank_ = 0;  // the global rank of this worker's rank 0
  std::vector<Member> members_;  // ranks 0..ranks_-1 in order, then the store when there is one
  std::string store_stdout_rest_;  // what the store printed after its port line, before the reader began
  // Reader-thread state of the group's end: the first rank that failed on its own (not after a stop
  // the worker asked for), whether the ranks were told to stop (SIGTERM) or killed, and the deadlines.
  std::optional<int> first_failed_rank_;
  bool ranks_termed_ = false, ranks_killed_ = false, store_termed_ = false, store_killed_ = false;
  std::optional<TimePoint> kill_at_, store_kill_at_;  // SIGKILL what is still alive then
  std::string who_ = "btx-train";  // how errors name the process whose exit decided the outcome
  std::thread reader_;
  std::atomic<bool> finished_{false};
  std::atomic<StopReason> stop_reason_{StopReason::kNone};

  // Guards what the reader thread and the heartbeat thread share. exit_code_, done_artifact_,
  // done_metrics_json_, last_stderr_line_, who_ and checkpoint_uri_ are written by the reader thread only:
  // once it has been joined (Wait), they are read without the lock.
  mutable std::mutex mu_;
  TimePoint lease_deadline_;
  v1::Progress progress_;
  std::optional<std::pair<TimePoint, int64_t>> first_progress_;  // for the ETA
  std::string checkpoint_uri_, reported_checkpoint_uri_;
  std::deque<v1::LogLine> pending_logs_;
  int64_t next_seq_ = 1;
  size_t dropped_lines_ = 0;
  std::string last_stderr_line_;
  std::optional<std::string> done_artifact_;
  std::string done_metrics_json_;
  // Node 0 of a gang: its store's address, and whether a JobStatus has carried it back. A member: node
  // 0's, set once (Start waits on rendezvous_cv_ for it, or for a stop).
  std::string rendezvous_;
  bool rendezvous_acked_ = false;
  std::string rejected_rendezvous_;  // a member's last malformed one, logged once
  std::condition_variable rendezvous_cv_;
  int log_fd_ = -1;
  int exit_code_ = -1;
};

}  // namespace btx::worker
