// Supervises one attempt of one job: a `btx-train` child, its log and progress pipes, and the
// translation of how it ended into what the scheduler must be told (docs/btx-train-protocol.md).
#pragma once

#include <atomic>
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
  Duration stop_grace = std::chrono::seconds(60);
  size_t max_pending_log_lines = 20000;  // kept while the scheduler is unreachable; oldest dropped
  // The manifest check of an output directory; empty = the contract's VerifyManifest.
  std::function<absl::Status(const std::string& dir)> verify_artifact;
};

enum class StopReason { kNone, kCancel, kDrain, kLeaseLost, kKill };

struct Outcome {
  enum Kind { kSucceeded, kInvalidInput, kRetryable, kCancelled, kLeaseLost };
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
  // cannot be read fails the start, Unavailable), writes JOB.json, launches the child and the pipe reader.
  // On error nothing is running. A stop requested before the child is launched ends it here (Aborted).
  // Runs on the supervisor thread, with the job in heartbeats: the check may take as long as hashing
  // the output does.
  absl::Status Start();
  // Progress, a checkpoint new since the last report, and the log lines not yet acknowledged.
  v1::JobReport TakeReport(size_t max_log_lines);
  // The heartbeat carrying `report` failed: keep its lines (and checkpoint) for the next one.
  void ReturnReport(v1::JobReport report);
  void RequestStop(StopReason reason);
  StopReason stop_reason() const { return stop_reason_.load(); }
  bool finished() const { return finished_.load(); }
  // Blocks until the child has exited and its pipes are drained, then verifies the output it reported
  // (without holding the lock TakeReport needs: heartbeats go on meanwhile).
  Outcome Wait();
  // The outcome of an attempt whose child never ran, Start having returned `why`.
  Outcome NotStarted(const absl::Status& why) const;

  const v1::JobAssignment& job() const { return job_; }
  TimePoint lease_deadline() const;
  void set_lease_deadline(TimePoint t);

 private:
  void ReadLoop();
  void OnLine(const std::string& stream, const std::string& text);
  void OnProgressEvent(const std::string& line);
  void AddLog(const std::string& stream, const std::string& text);
  void AddLogLocked(const std::string& stream, std::string text);
  void EscalateIfOverdue();
  absl::Status CheckLeftoverOutput(const std::string& output_dir);
  Outcome Classify();

  v1::JobAssignment job_;
  JobRunnerConfig config_;
  ProcessLauncher& launcher_;
  const Clock& clock_;
  std::unique_ptr<Process> child_;
  std::thread reader_;
  std::atomic<bool> finished_{false};
  std::atomic<StopReason> stop_reason_{StopReason::kNone};

  // Guards what the reader thread and the heartbeat thread share. exit_code_, done_artifact_,
  // done_metrics_json_, last_stderr_line_ and checkpoint_uri_ are written by the reader thread only: once it
  // has been joined (Wait), they are read without the lock.
  mutable std::mutex mu_;
  TimePoint lease_deadline_;
  std::optional<TimePoint> kill_at_;  // SIGKILL if still alive then
  v1::Progress progress_;
  std::optional<std::pair<TimePoint, int64_t>> first_progress_;  // for the ETA
  std::string checkpoint_uri_, reported_checkpoint_uri_;
  std::deque<v1::LogLine> pending_logs_;
  int64_t next_seq_ = 1;
  size_t dropped_lines_ = 0;
  std::string last_stderr_line_;
  std::optional<std::string> done_artifact_;
  std::string done_metrics_json_;
  int log_fd_ = -1;
  int exit_code_ = -1;
};

}  // namespace btx::worker
