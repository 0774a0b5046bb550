#include "job_runner.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <google/protobuf/util/time_util.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_join.h"
#include "btx/common/fs.h"
#include "btx/common/secrets.h"
#include "btx/common/status.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/common/utf8.h"
#include "btx/contract/files.h"
#include "btx/contract/job.h"

namespace btx::worker {
namespace fs = std::filesystem;
using json = nlohmann::json;
using google::protobuf::util::TimeUtil;

namespace {

google::protobuf::Timestamp ToProto(TimePoint t) {
  return TimeUtil::MicrosecondsToTimestamp(ToUnixMicros(t));
}

// Keeps a log line printable, bounded and UTF-8: a runaway line must not blow up a heartbeat, and one
// byte that is not UTF-8 would make protobuf refuse the whole heartbeat carrying it.
std::string CleanLine(std::string_view raw) {
  constexpr size_t kMaxLine = 4096;
  if (!raw.empty() && raw.back() == '\r') raw.remove_suffix(1);
  // Only what can be kept is decoded. Replacing never shortens, so a partial character at the end of
  // these bytes lands past kMaxLine and is cut below.
  std::string s = SanitizeUtf8(raw.substr(0, kMaxLine + 4));
  if (raw.size() > kMaxLine || s.size() > kMaxLine) s = Cat(Utf8Prefix(s, kMaxLine), " …[truncated]");
  for (char& c : s) {
    if (static_cast<unsigned char>(c) < 0x20 && c != '\t') c = ' ';
  }
  return s;
}

std::string Seconds(std::chrono::steady_clock::duration d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", std::chrono::duration<double>(d).count());
  return buf;
}

}  // namespace

JobRunner::JobRunner(v1::JobAssignment job, JobRunnerConfig config, ProcessLauncher& launcher, const Clock& clock)
    : job_(std::move(job)), config_(std::move(config)), launcher_(launcher), clock_(clock) {
  if (!config_.verify_artifact) {
    config_.verify_artifact = [](const std::string& dir) { return ToAbsl(VerifyManifest(dir)); };
  }
  lease_deadline_ = job_.has_lease_deadline()
                        ? FromUnixMicros(TimeUtil::TimestampToMicroseconds(job_.lease_deadline()))
                        : clock_.Now();
}

JobRunner::~JobRunner() {
  if (reader_.joinable()) {
    RequestStop(StopReason::kKill);
    reader_.join();
  }
  if (log_fd_ >= 0) ::close(log_fd_);
}

absl::Status JobRunner::Start() {
  auto output_dir = FileUriToPath(job_.output_uri());
  if (!output_dir.ok()) return output_dir.status();
  auto checkpoint_dir = FileUriToPath(job_.checkpoint_uri());
  if (!checkpoint_dir.ok()) return checkpoint_dir.status();
  contract::JobFile job_file;
  try {
    job_file.spec = json::parse(job_.spec_json());
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(Cat("spec_json of job ", job_.job_id(), " is not JSON: ", e.what()));
  }
  const contract::JobKindInfo* kind = contract::FindJobKind(static_cast<int>(job_.kind()));
  if (kind == nullptr) return absl::InvalidArgumentError(Cat("job ", job_.job_id(), ": unknown kind ", job_.kind()));

  if (auto s = CheckLeftoverOutput(*output_dir); !s.ok()) return s;
  if (stop_reason_.load() != StopReason::kNone) return absl::AbortedError("stopped before btx-train started");

  std::error_code ec;
  fs::create_directories(config_.attempt_dir, ec);
  if (ec) return absl::InternalError(Cat("cannot create ", config_.attempt_dir, ": ", ec.message()));
  job_file.job_id = job_.job_id();
  job_file.attempt = job_.attempt();
  job_file.pipeline = job_.pipeline_name();
  job_file.name = job_.name();
  job_file.kind = kind->kind;
  job_file.output_dir = *output_dir;
  job_file.checkpoint_dir = *checkpoint_dir;
  job_file.threads = config_.threads;
  // "cuda" is every device CUDA_VISIBLE_DEVICES shows the child, and that is exactly the job's own.
  job_file.device = config_.gpus.empty() ? "cpu" : "cuda";
  const std::string job_path = config_.attempt_dir + "/JOB.json";
  if (auto s = WriteFileAtomic(job_path, contract::ToJson(job_file).dump(2)); !s.ok()) return s;
  log_fd_ = ::open((config_.attempt_dir + "/log.txt").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

  ProcessSpec ps;
  ps.argv = {config_.train_binary, "--job", job_path, "--progress-fd", "3"};
  ps.capture_stdout = ps.capture_stderr = ps.progress_pipe = true;
  ps.kill_with_parent = true;
  ps.working_dir = config_.attempt_dir;
  // Set even when empty: a CPU job must not see (and initialise a context on) any GPU, and a GPU job
  // must not see another job's.
  const std::string visible = absl::StrJoin(config_.gpus, ",");
  ps.env = {{"CUDA_VISIBLE_DEVICES", visible}};
  // The job runs whatever its spec says: it must not get the worker's credentials (docs/security.md).
  ps.unset_env = CredentialEnvironmentVariables();
  auto child = launcher_.Launch(ps);
  if (!child.ok()) return child.status();
  child_ = std::move(*child);
  AddLog("worker", Cat("started ", config_.train_binary, " (pid ", child_->pid(), ") for ", job_.name(), " attempt ",
                       job_.attempt(), " on ", config_.gpus.empty() ? "cpu" : Cat("cuda (CUDA_VISIBLE_DEVICES=", visible, ")"),
                       " with ", config_.threads, " threads"));
  reader_ = std::thread([this] { ReadLoop(); });
  return absl::OkStatus();
}

// An output dir that exists but does not verify is a torn publish by an earlier attempt (or tampering):
// btx-train refuses it, so it goes, but only on proof: a file that cannot be read now (EIO, ESTALE,
// EACCES on a shared filesystem) says nothing about the output, which may be a good one that dependents
// already use. One that verifies is reused by btx-train as is.
absl::Status JobRunner::CheckLeftoverOutput(const std::string& output_dir) {
  struct stat st {};
  if (::lstat(output_dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return absl::UnavailableError(Cat("cannot look at the existing output ", output_dir, ": ", std::strerror(errno)));
  }
  // DataLoss is proof of corruption; Unavailable (a read error) says nothing about the content.
  const absl::Status verdict = config_.verify_artifact(output_dir);
  if (verdict.ok() || absl::IsNotFound(verdict)) return absl::OkStatus();  // NotFound: gone meanwhile
  if (!absl::IsDataLoss(verdict)) {
    return absl::UnavailableError(Cat("cannot verify the existing output ", output_dir,
                                      " (kept; the attempt is retried): ", verdict.message()));
  }
  std::error_code ec;
  fs::remove_all(output_dir, ec);
  if (ec) return absl::InternalError(Cat("cannot remove unverifiable ", output_dir, ": ", ec.message()));
  AddLog("worker", Cat("removed unverifiable leftover output ", output_dir, ": ", verdict.message()));
  return absl::OkStatus();
}

void JobRunner::RequestStop(StopReason reason) {
  StopReason expected = StopReason::kNone;
  // The first reason wins, except that a harder stop (lease lost, kill) overrides a soft one.
  if (!stop_reason_.compare_exchange_strong(expected, reason)) {
    if (reason == StopReason::kLeaseLost || reason == StopReason::kKill) stop_reason_.store(reason);
  }
}

// All signalling happens on the reader thread, the only one touching child_ after Start.
void JobRunner::EscalateIfOverdue() {
  const StopReason reason = stop_reason_.load();
  if (reason == StopReason::kNone) return;
  std::lock_guard lock(mu_);
  const TimePoint now = clock_.Now();
  if (reason == StopReason::kLeaseLost || reason == StopReason::kKill) {
    if (!kill_at_ || *kill_at_ > now) {
      child_->Signal(SIGKILL);
      kill_at_ = now;
    }
    return;
  }
  if (!kill_at_) {
    child_->Signal(SIGTERM);
    kill_at_ = now + config_.stop_grace;
  } else if (now >= *kill_at_) {
    child_->Signal(SIGKILL);
    kill_at_ = TimePoint::max();
  }
}

void JobRunner::ReadLoop() {
  struct Stream {
    int fd;
    std::string name, partial;
  };
  std::vector<Stream> streams = {{child_->stdout_fd(), "stdout", ""},
                                 {child_->stderr_fd(), "stderr", ""},
                                 {child_->progress_fd(), "progress", ""}};
  char buf[65536];
  for (;;) {
    EscalateIfOverdue();
    std::vector<pollfd> pfds;
    std::vector<Stream*> live;
    for (auto& s : streams) {
      if (s.fd >= 0) {
        pfds.push_back({s.fd, POLLIN, 0});
        live.push_back(&s);
      }
    }
    if (pfds.empty()) break;
    const int r = ::poll(pfds.data(), pfds.size(), 100);
    if (r < 0 && errno != EINTR) break;
    for (size_t i = 0; r > 0 && i < pfds.size(); ++i) {
      if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      Stream& s = *live[i];
      const ssize_t n = ::read(s.fd, buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (!s.partial.empty()) OnLine(s.name, s.partial);
        s.partial.clear();
        s.fd = -1;  // owned (and closed) by the Process
        continue;
      }
      s.partial.append(buf, static_cast<size_t>(n));
      size_t start = 0;
      for (size_t nl; (nl = s.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        OnLine(s.name, s.partial.substr(start, nl - start));
      }
      s.partial.erase(0, start);
    }
  }
  // Pipes closed; the child may still be exiting (or have handed its pipes to nobody and kept running).
  std::optional<int> code;
  while (!(code = child_->Poll())) {
    EscalateIfOverdue();
    ::poll(nullptr, 0, 20);
  }
  {
    std::lock_guard lock(mu_);
    exit_code_ = *code;
  }
  finished_.store(true);
}

void JobRunner::OnLine(const std::string& stream, const std::string& text) {
  if (stream == "progress") {
    OnProgressEvent(text);
    return;
  }
  std::string line = CleanLine(text);
  std::lock_guard lock(mu_);
  if (stream == "stderr" && !line.empty()) last_stderr_line_ = line;
  AddLogLocked(stream, std::move(line));
}

void JobRunner::AddLog(const std::string& stream, const std::string& text) {
  std::lock_guard lock(mu_);
  AddLogLocked(stream, text);
}

void JobRunner::AddLogLocked(const std::string& stream, std::string text) {
  // Lines from the child are clean already (CleanLine); the worker's own quote paths and messages.
  SanitizeUtf8InPlace(text);
  if (log_fd_ >= 0) {
    const std::string out = Cat("[", stream, "] ", text, "\n");
    (void)!::write(log_fd_, out.data(), out.size());
  }
  if (pending_logs_.size() >= config_.max_pending_log_lines) {
    pending_logs_.pop_front();
    ++dropped_lines_;
  }
  v1::LogLine l;
  l.set_seq(next_seq_++);
  l.set_attempt(job_.attempt());
  l.set_stream(stream);
  l.set_text(std::move(text));
  *l.mutable_time() = ToProto(clock_.Now());
  pending_logs_.push_back(std::move(l));
}

void JobRunner::OnProgressEvent(const std::string& line) {
  json ev;
  try {
    ev = json::parse(line);
  } catch (const std::exception&) {
    AddLog("worker", Cat("ignored malformed progress line: ", CleanLine(line)));
    return;
  }
  if (!ev.is_object()) return;
  const std::string type = ev.value("event", "");
  std::lock_guard lock(mu_);
  try {
    if (type == "progress") {
      const int64_t step = ev.value("step", int64_t{0}), total = ev.value("total_steps", int64_t{0});
      progress_.set_step(step);
      progress_.set_total_steps(total);
      progress_.set_loss(ev.value("loss", 0.0));
      progress_.set_learning_rate(ev.value("lr", 0.0));
      progress_.set_tokens_per_second(ev.value("tokens_per_s", 0.0));
      progress_.set_tokens(ev.value("tokens", int64_t{0}));
      // ETA from this attempt's own step rate: a resumed attempt starts mid-way.
      const TimePoint now = clock_.Now();
      if (!first_progress_) {
        first_progress_ = {now, step};
      } else if (step > first_progress_->second && total >= step) {
        const double secs = std::chrono::duration<double>(now - first_progress_->first).count();
        progress_.set_eta_seconds(secs / static_cast<double>(step - first_progress_->second) *
                                  static_cast<double>(total - step));
      }
    } else if (type == "checkpoint") {
      const std::string path = ev.value("path", "");
      if (!path.empty() && path.front() == '/') checkpoint_uri_ = PathToFileUri(path);
    } else if (type == "done") {
      done_artifact_ = ev.value("artifact", "");
      done_metrics_json_ = ev.contains("metrics") ? ev["metrics"].dump() : "{}";
      if (progress_.total_steps() > 0) progress_.set_step(progress_.total_steps());
      progress_.set_eta_seconds(0);
    }
  } catch (const json::exception& e) {
    AddLogLocked("worker", Cat("ignored progress event with bad field types: ", e.what()));
  }
}

v1::JobReport JobRunner::TakeReport(size_t max_log_lines) {
  std::lock_guard lock(mu_);
  v1::JobReport r;
  r.set_job_id(job_.job_id());
  r.set_attempt(job_.attempt());
  *r.mutable_progress() = progress_;
  if (checkpoint_uri_ != reported_checkpoint_uri_) {
    r.set_checkpoint_uri(SanitizeUtf8(checkpoint_uri_));
    reported_checkpoint_uri_ = checkpoint_uri_;
  }
  if (dropped_lines_ > 0) {
    v1::LogLine l;
    l.set_seq(0);
    l.set_attempt(job_.attempt());
    l.set_stream("worker");
    l.set_text(Cat("[", dropped_lines_, " log lines dropped while the scheduler was unreachable]"));
    *l.mutable_time() = ToProto(clock_.Now());
    *r.add_logs() = std::move(l);
    dropped_lines_ = 0;
  }
  while (!pending_logs_.empty() && static_cast<size_t>(r.logs_size()) < max_log_lines) {
    *r.add_logs() = std::move(pending_logs_.front());
    pending_logs_.pop_front();
  }
  return r;
}

void JobRunner::ReturnReport(v1::JobReport report) {
  std::lock_guard lock(mu_);
  if (!report.checkpoint_uri().empty() && reported_checkpoint_uri_ == report.checkpoint_uri()) {
    reported_checkpoint_uri_.clear();  // resend it
  }
  for (int i = report.logs_size() - 1; i >= 0; --i) {
    if (report.logs(i).seq() == 0) continue;  // a drop notice; regenerated if still relevant
    pending_logs_.push_front(std::move(*report.mutable_logs(i)));
  }
  while (pending_logs_.size() > config_.max_pending_log_lines) {
    pending_logs_.pop_front();
    ++dropped_lines_;
  }
}

TimePoint JobRunner::lease_deadline() const {
  std::lock_guard lock(mu_);
  return lease_deadline_;
}

void JobRunner::set_lease_deadline(TimePoint t) {
  std::lock_guard lock(mu_);
  lease_deadline_ = t;
}

Outcome JobRunner::Wait() {
  if (reader_.joinable()) reader_.join();
  return Classify();
}

Outcome JobRunner::NotStarted(const absl::Status& why) const {
  Outcome o;
  o.checkpoint_uri = checkpoint_uri_;
  switch (stop_reason_.load()) {
    case StopReason::kLeaseLost:
      o.kind = Outcome::kLeaseLost;
      o.error = "lease lost";
      return o;
    case StopReason::kCancel:
      o.kind = Outcome::kCancelled;
      o.error = "cancelled before btx-train started";
      return o;
    case StopReason::kDrain:
      o.kind = Outcome::kRetryable;
      o.error = "interrupted: the worker is draining (btx-train had not started)";
      return o;
    case StopReason::kKill:
    case StopReason::kNone:
      break;
  }
  o.kind = why.code() == absl::StatusCode::kInvalidArgument ? Outcome::kInvalidInput : Outcome::kRetryable;
  o.error = Cat("worker could not start the job: ", why.message());
  return o;
}

// After the reader thread has been joined: what it wrote is read without the lock (see mu_), which the
// heartbeat thread's TakeReport needs while the output is being verified.
Outcome JobRunner::Classify() {
  Outcome o;
  const int exit_code = exit_code_;
  o.exit_code = exit_code;
  o.checkpoint_uri = checkpoint_uri_;
  const StopReason reason = stop_reason_.load();
  const std::string tail = last_stderr_line_.empty() ? "" : Cat(": ", last_stderr_line_);
  if (reason == StopReason::kLeaseLost) {
    o.kind = Outcome::kLeaseLost;
    o.error = "lease lost";
    return o;
  }
  if (exit_code == contract::kExitOk && done_artifact_) {
    // The artifact is what later jobs build on: report it only if it verifies here and now. Hashing a
    // large model takes minutes; the job stays in heartbeats meanwhile, so its lease is renewed.
    AddLog("worker", Cat("verifying ", *done_artifact_, " against its manifest"));
    const auto started = std::chrono::steady_clock::now();
    const absl::Status verified = config_.verify_artifact(*done_artifact_);
    const std::string took = Seconds(std::chrono::steady_clock::now() - started);
    if (!verified.ok()) {
      AddLog("worker", Cat("output ", *done_artifact_, " does not verify (", took, "): ", verified.message()));
      o.kind = Outcome::kRetryable;
      o.error = Cat("btx-train reported ", *done_artifact_, " but it does not verify: ", verified.message());
      return o;
    }
    AddLog("worker", Cat("verified ", *done_artifact_, " in ", took));
    o.kind = Outcome::kSucceeded;
    o.artifact_uri = PathToFileUri(*done_artifact_);
    o.result_json = done_metrics_json_;
    return o;
  }
  if (reason == StopReason::kCancel) {
    o.kind = Outcome::kCancelled;
    o.error = Cat("cancelled (btx-train exit code ", exit_code, ")");
    return o;
  }
  if (exit_code == contract::kExitInvalidJob) {
    o.kind = Outcome::kInvalidInput;
    o.error = last_stderr_line_.empty() ? Cat("btx-train: invalid job (exit ", exit_code, ")") : last_stderr_line_;
    return o;
  }
  o.kind = Outcome::kRetryable;
  if (exit_code == contract::kExitInterrupted) {
    o.error = reason == StopReason::kDrain ? Cat("interrupted: the worker is draining (exit ", exit_code, ")")
                                           : Cat("interrupted (exit ", exit_code, ")", tail);
  } else if (exit_code == contract::kExitOk) {
    o.error = "btx-train exited 0 without a done event";
  } else if (exit_code > 128) {
    o.error = Cat("btx-train killed by signal ", exit_code - 128, tail);
  } else {
    o.error = Cat("btx-train exited with code ", exit_code, tail);
  }
  return o;
}

}  // namespace btx::worker
