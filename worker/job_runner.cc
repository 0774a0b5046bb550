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
  // Known at delivery when node 0 had reported it before this member claimed the job.
  if (gang_member()) SetRendezvous(job_.rendezvous());
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

  if (config_.nodes < 1 || config_.node_rank < 0 || config_.node_rank >= config_.nodes) {
    // The scheduler's assignment is inconsistent, not the job: retryable.
    return absl::FailedPreconditionError(Cat("job ", job_.job_id(), " was assigned as node ", config_.node_rank, " of ",
                                             config_.nodes));
  }
  // Node 0 alone publishes (and so alone looks after a leftover output): a member removing one while node
  // 0 checks or reuses it would race it.
  if (!gang_member()) {
    if (auto s = CheckLeftoverOutput(*output_dir); !s.ok()) return s;
  }
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
  ranks_ = std::max(1, config_.ranks);
  world_ = config_.nodes * ranks_;
  first_rank_ = config_.node_rank * ranks_;
  if (world_ > 1 && !config_.gpus.empty() && static_cast<int>(config_.gpus.size()) != ranks_) {
    return absl::InvalidArgumentError(Cat("job ", job_.job_id(), " has ", ranks_, " ranks and ", config_.gpus.size(),
                                          " GPUs: a GPU job runs one rank per GPU"));
  }
  // The job's threads are the slot's, shared by its ranks: each gets an even share, at least one.
  job_file.threads = config_.threads > 0 ? std::max(1, config_.threads / ranks_) : config_.threads;
  // "cuda" is every device CUDA_VISIBLE_DEVICES shows the child, and that is exactly the job's own.
  job_file.device = config_.gpus.empty() ? "cpu" : "cuda";
  const std::string job_path = config_.attempt_dir + "/JOB.json";
  if (auto s = WriteFileAtomic(job_path, contract::ToJson(job_file).dump(2)); !s.ok()) return s;
  log_fd_ = ::open((config_.attempt_dir + "/log.txt").c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

  std::string member_rendezvous;  // a member's: node 0's store
  if (gang_member()) {
    auto r = AwaitRendezvous();
    if (!r.ok()) return r.status();
    member_rendezvous = *std::move(r);
  }
  std::string described;
  if (auto s = LaunchGroup(job_path, member_rendezvous, &described); !s.ok()) {
    KillLaunched();
    return s;
  }
  AddLog("worker", Cat("started ", config_.train_binary, " ", described, " for ", job_.name(), " attempt ",
                       job_.attempt(), " with ", job_file.threads, " threads", world_ > 1 ? " per rank" : ""));
  reader_ = std::thread([this] { ReadLoop(); });
  return absl::OkStatus();
}

// One rank: btx-train as the protocol's single process. Several: the rendezvous store first (its port
// is every rank's BTX_RENDEZVOUS), then each rank with its own device (GPU jobs) and only rank 0 with
// the progress pipe: rank 0 alone emits events (docs/btx-train-protocol.md). A gang's node 0 starts the
// store even for one rank of its own (the other members' ranks meet there) and names it by advertise_host;
// a member starts none, its ranks meet at node 0's (`member_rendezvous`), and none of them is rank 0.
absl::Status JobRunner::LaunchGroup(const std::string& job_path, std::string member_rendezvous,
                                    std::string* described) {
  auto base_spec = [&] {
    ProcessSpec ps;
    ps.capture_stdout = ps.capture_stderr = true;
    ps.kill_with_parent = true;
    ps.working_dir = config_.attempt_dir;
    // The job runs whatever its spec says: it must not get the worker's credentials (docs/security.md).
    ps.unset_env = CredentialEnvironmentVariables();
    return ps;
  };
  members_.reserve(static_cast<size_t>(ranks_) + 1);
  if (world_ == 1) {
    ProcessSpec ps = base_spec();
    ps.argv = {config_.train_binary, "--job", job_path, "--progress-fd", "3"};
    ps.progress_pipe = true;
    // Set even when empty: a CPU job must not see (and initialise a context on) any GPU, and a GPU job
    // must not see another job's.
    const std::string visible = absl::StrJoin(config_.gpus, ",");
    ps.env = {{"CUDA_VISIBLE_DEVICES", visible}};
    auto child = launcher_.Launch(ps);
    if (!child.ok()) return child.status();
    members_.push_back({.rank = 0, .global_rank = 0, .proc = std::move(*child)});
    *described = Cat("(pid ", members_[0].proc->pid(), ") on ",
                     config_.gpus.empty() ? "cpu" : Cat("cuda (CUDA_VISIBLE_DEVICES=", visible, ")"));
    return absl::OkStatus();
  }
  std::optional<Member> store;
  std::string rendezvous = std::move(member_rendezvous);
  if (!gang_member()) {
    ProcessSpec store_spec = base_spec();
    store_spec.argv = {config_.train_binary, "--store-server", "0"};
    store_spec.env = {{"CUDA_VISIBLE_DEVICES", ""}};
    auto store_proc = launcher_.Launch(store_spec);
    if (!store_proc.ok()) return store_proc.status();
    store = Member{.rank = -1, .proc = std::move(*store_proc), .prefix = "[rendezvous] "};
    auto port = WaitForStorePort(*store);
    if (!port.ok()) {
      store->proc->Signal(SIGKILL);
      store->proc->Wait();
      return port.status();
    }
    // One worker's group stays on loopback (and so does its Gloo transport); a gang's is reached by the
    // other members.
    rendezvous = Cat(config_.nodes > 1 ? config_.advertise_host : "127.0.0.1", ":", *port);
  }
  std::vector<std::string> pids, devices;
  for (int r = 0; r < ranks_; ++r) {
    const int g = first_rank_ + r;
    ProcessSpec ps = base_spec();
    ps.argv = {config_.train_binary, "--job", job_path, "--progress-fd", g == 0 ? "3" : "-1"};
    ps.progress_pipe = g == 0;
    const std::string visible = config_.gpus.empty() ? "" : config_.gpus[static_cast<size_t>(r)];
    ps.env = {{"CUDA_VISIBLE_DEVICES", visible},
              {"BTX_RANK", std::to_string(g)},
              {"BTX_WORLD_SIZE", std::to_string(world_)},
              {"BTX_RENDEZVOUS", rendezvous}};
    if (config_.dist_timeout.count() > 0) ps.env.emplace_back("BTX_DIST_TIMEOUT_S", std::to_string(config_.dist_timeout.count()));
    // A gang's ranks talk across hosts: Gloo binds to the address the other members reach this worker at,
    // not to whatever the hostname resolves to (loopback on many distributions).
    if (config_.nodes > 1) ps.env.emplace_back("BTX_LOCAL_ADDR", config_.advertise_host);
    auto child = launcher_.Launch(ps);
    if (!child.ok()) {
      if (store) members_.push_back(std::move(*store));  // so that KillLaunched ends it too
      return absl::Status(child.status().code(), Cat(RankName(g), ": ", child.status().message()));
    }
    members_.push_back({.rank = r, .global_rank = g, .proc = std::move(*child), .prefix = g == 0 ? "" : Cat("[rank ", g, "] ")});
    pids.push_back(std::to_string(members_.back().proc->pid()));
    if (!visible.empty()) devices.push_back(Cat("rank ", g, ": CUDA_VISIBLE_DEVICES=", visible));
  }
  const std::string on = devices.empty() ? "cpu" : Cat("cuda (", absl::StrJoin(devices, "; "), ")");
  if (config_.nodes == 1) {
    *described = Cat("as ", ranks_, " ranks (pids ", absl::StrJoin(pids, ", "), "; rendezvous store ", rendezvous,
                     ", pid ", store->proc->pid(), ") on ", on);
  } else {
    *described = Cat("as ", GangPlace(config_.node_rank, config_.nodes, ranks_), ", rendezvous ", rendezvous,
                     " (pid", pids.size() == 1 ? " " : "s ", absl::StrJoin(pids, ", "),
                     store ? Cat("; rendezvous store pid ", store->proc->pid()) : "", ") on ", on);
  }
  if (store) members_.push_back(std::move(*store));
  if (config_.nodes > 1 && !gang_member()) {
    // Reported from now on (TakeReport) until a heartbeat's answer carries it back.
    std::lock_guard lock(mu_);
    rendezvous_ = rendezvous;
  }
  return absl::OkStatus();
}

// A member's ranks need node 0's store: it comes with the assignment, or later through a heartbeat's
// answer (SetRendezvous). A stop requested meanwhile ends the wait at once; node 0 never reporting one
// fails the attempt (retryable) after rendezvous_timeout.
absl::StatusOr<std::string> JobRunner::AwaitRendezvous() {
  std::unique_lock lock(mu_);
  const std::string node = Cat("node ", config_.node_rank, " of ", config_.nodes);
  if (rendezvous_.empty() && stop_reason_.load() == StopReason::kNone) {
    AddLogLocked("worker", Cat(node, ": waiting for node 0 to report its rendezvous store (at most ",
                               Seconds(config_.rendezvous_timeout), ")"));
  }
  const TimePoint deadline = clock_.Now() + config_.rendezvous_timeout;
  for (;;) {
    if (stop_reason_.load() != StopReason::kNone) return absl::AbortedError("stopped before btx-train started");
    if (!rendezvous_.empty()) return rendezvous_;
    const TimePoint now = clock_.Now();
    if (now >= deadline) {
      return absl::UnavailableError(Cat(node, " waited ", Seconds(config_.rendezvous_timeout),
                                        " for the rendezvous: node 0 never reported its store"));
    }
    // The deadline is the injected clock's: re-read at least once a second. Woken by SetRendezvous and
    // RequestStop.
    rendezvous_cv_.wait_for(lock, std::min<std::chrono::nanoseconds>(deadline - now, std::chrono::seconds(1)));
  }
}

void JobRunner::SetRendezvous(const std::string& rendezvous) {
  if (rendezvous.empty() || config_.nodes <= 1) return;
  std::lock_guard lock(mu_);
  if (!gang_member()) {
    if (!rendezvous_.empty() && rendezvous == rendezvous_) rendezvous_acked_ = true;
    return;
  }
  if (!rendezvous_.empty()) return;  // the first stands: the ranks may have been started with it
  // One btx-train would refuse would fail the member's ranks as an invalid job (exit 65), which is not the
  // job's fault: it is ignored, and the member waits on.
  if (!IsHostPort(rendezvous)) {
    if (rendezvous != rejected_rendezvous_) {
      AddLogLocked("worker", Cat("ignored the rendezvous '", rendezvous, "' from the scheduler: expected host:port"));
      rejected_rendezvous_ = rendezvous;
    }
    return;
  }
  rendezvous_ = rendezvous;
  rendezvous_cv_.notify_all();
}

std::string JobRunner::rendezvous() const {
  std::lock_guard lock(mu_);
  return rendezvous_;
}

std::string GangPlace(int node_rank, int nodes, int ranks) {
  const int first = node_rank * ranks, world = nodes * ranks;
  return Cat("node ", node_rank, " of ", nodes, ", ",
             ranks == 1 ? Cat("rank ", first, " of ", world) : Cat("ranks ", first, "-", first + ranks - 1, " of ", world));
}

std::string JobRunner::RankName(int global_rank) const { return Cat("rank ", global_rank, " of ", world_); }

// The store prints `port N` once it listens. Until then nothing else runs; a stop request, the store's
// exit or the deadline ends the wait.
absl::StatusOr<int> JobRunner::WaitForStorePort(Member& store) {
  const TimePoint deadline = clock_.Now() + config_.rendezvous_timeout;
  std::string out;
  char buf[4096];
  bool eof = false;
  for (;;) {
    if (const size_t nl = out.find('\n'); nl != std::string::npos) {
      const std::string line = out.substr(0, nl);
      store_stdout_rest_ = out.substr(nl + 1);
      int port = 0;
      if (std::sscanf(line.c_str(), "port %d", &port) == 1 && port > 0 && port <= 65535) return port;
      return absl::UnavailableError(Cat("the rendezvous store (", config_.train_binary,
                                        " --store-server 0) printed '", CleanLine(line), "'; expected 'port N'"));
    }
    if (stop_reason_.load() != StopReason::kNone) return absl::AbortedError("stopped before btx-train started");
    if (auto code = store.proc->Poll()) {
      return absl::UnavailableError(Cat("the rendezvous store exited with code ", *code, " before it listened"));
    }
    if (clock_.Now() >= deadline) {
      return absl::UnavailableError(Cat("the rendezvous store did not print its port within ",
                                        Seconds(config_.rendezvous_timeout)));
    }
    pollfd pfd{eof ? -1 : store.proc->stdout_fd(), POLLIN, 0};  // -1: just wait (for the exit)
    if (::poll(&pfd, 1, 100) <= 0 || eof) continue;
    const ssize_t n = ::read(pfd.fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      if (out.size() > 65536) return absl::UnavailableError("the rendezvous store printed no port line");
    } else if (n == 0) {
      eof = true;
    }
  }
}

// A start that failed half way leaves nothing behind.
void JobRunner::KillLaunched() {
  for (auto& m : members_) m.proc->Signal(SIGKILL);
  for (auto& m : members_) m.proc->Wait();
  members_.clear();
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
  // Ends a member's wait for the rendezvous (AwaitRendezvous checks the reason under mu_).
  { std::lock_guard lock(mu_); }
  rendezvous_cv_.notify_all();
}

void JobRunner::SignalRanks(int sig) {
  for (auto& m : members_) {
    if (m.rank >= 0 && !m.exit_code) m.proc->Signal(sig);
  }
}

// All signalling happens on the reader thread, the only one touching the processes after Start. The
// ranks are one unit: a stop the worker asks for, or one rank failing on its own, sends SIGTERM to every
// rank (each checkpoints if it can) and SIGKILL to those still alive after the grace; a hard stop kills
// at once. The store serves until no rank is left.
void JobRunner::EscalateIfOverdue() {
  const StopReason reason = stop_reason_.load();
  const TimePoint now = clock_.Now();
  Member* store = members_.back().rank < 0 ? &members_.back() : nullptr;
  if (reason == StopReason::kLeaseLost || reason == StopReason::kKill) {
    if (!ranks_killed_) SignalRanks(SIGKILL);
    if (store != nullptr && !store_killed_) store->proc->Signal(SIGKILL);
    ranks_killed_ = store_killed_ = true;
    return;
  }
  bool ranks_alive = false;
  for (const auto& m : members_) ranks_alive |= m.rank >= 0 && !m.exit_code;
  if ((reason != StopReason::kNone || first_failed_rank_) && !ranks_termed_) {
    SignalRanks(SIGTERM);
    ranks_termed_ = true;
    kill_at_ = now + config_.stop_grace;
  }
  // Rank 0 ended well: the others are past their last step and get the grace to exit on their own. (A
  // gang member has no rank 0: its ranks end on their own, or when the attempt ends for the gang.)
  if (!kill_at_ && members_[0].global_rank == 0 && members_[0].exit_code == 0 && ranks_alive) {
    kill_at_ = now + config_.stop_grace;
  }
  if (kill_at_ && now >= *kill_at_ && ranks_alive && !ranks_killed_) {
    if (world_ > 1) AddLog("worker", Cat("ranks still running ", Seconds(config_.stop_grace), " after the group was told to end: SIGKILL"));
    SignalRanks(SIGKILL);
    ranks_killed_ = true;
  }
  if (store != nullptr && !store->exit_code && !ranks_alive) {
    if (!store_termed_) {
      store->proc->Signal(SIGTERM);
      store_termed_ = true;
      store_kill_at_ = now + config_.stop_grace;
    } else if (now >= *store_kill_at_ && !store_killed_) {
      store->proc->Signal(SIGKILL);
      store_killed_ = true;
    }
  }
}

// Reaps whatever has exited. The first rank to fail while no stop was asked for decides the group's
// outcome and stops the others; of ranks seen failing in the same round, one killed by a signal is the
// likelier cause (the others' collectives then fail because it is gone).
void JobRunner::CheckExits() {
  std::vector<Member*> failed_now;
  for (auto& m : members_) {
    if (m.exit_code) continue;
    m.exit_code = m.proc->Poll();
    if (!m.exit_code) continue;
    if (m.rank < 0) {
      if (!store_termed_) AddLog("worker", Cat("the rendezvous store exited with code ", *m.exit_code, " while ranks ran"));
      continue;
    }
    if (world_ > 1) AddLog("worker", Cat(RankName(m.global_rank), " exited with code ", *m.exit_code));
    if (*m.exit_code != 0 && stop_reason_.load() == StopReason::kNone && !first_failed_rank_) failed_now.push_back(&m);
  }
  if (failed_now.empty()) return;
  Member* first = failed_now.front();
  for (Member* m : failed_now) {
    if (*m->exit_code > 128 && *first->exit_code <= 128) first = m;
  }
  first_failed_rank_ = first->rank;
  if (world_ > 1) {
    bool others = false;
    for (const auto& m : members_) others |= m.rank >= 0 && !m.exit_code;
    if (others) AddLog("worker", Cat(RankName(first->global_rank), " failed: stopping the group (SIGTERM, SIGKILL after ",
                                     Seconds(config_.stop_grace), ")"));
  }
}

// Which exit speaks for the group: the first rank that failed on its own; else (the worker stopped the
// group, or it ended) rank 0's, except that a rank that stopped resumably (75) under a requested stop
// makes the group interrupted, and a group is a success only when every rank exited 0.
void JobRunner::SettleGroupExit() {
  const Member* decided = &members_[0];
  if (first_failed_rank_) {
    decided = &members_[static_cast<size_t>(*first_failed_rank_)];
  } else {
    if (stop_reason_.load() != StopReason::kNone && decided->exit_code != contract::kExitInterrupted) {
      for (const auto& m : members_) {
        if (m.rank >= 0 && m.exit_code == contract::kExitInterrupted) {
          decided = &m;
          break;
        }
      }
    }
    if (decided->exit_code == 0) {
      for (const auto& m : members_) {
        if (m.rank >= 0 && m.exit_code != 0) {
          decided = &m;
          break;
        }
      }
    }
  }
  std::lock_guard lock(mu_);
  exit_code_ = decided->exit_code.value_or(-1);
  last_stderr_line_ = decided->last_stderr_line;
  if (world_ > 1) who_ = Cat("btx-train ", RankName(decided->global_rank));
}

void JobRunner::ReadLoop() {
  struct Stream {
    Member* member;
    int fd;
    std::string name, partial;
  };
  std::vector<Stream> streams;
  for (auto& m : members_) {
    streams.push_back({&m, m.proc->stdout_fd(), "stdout", m.rank < 0 ? store_stdout_rest_ : ""});
    streams.push_back({&m, m.proc->stderr_fd(), "stderr", ""});
    if (m.global_rank == 0) streams.push_back({&m, m.proc->progress_fd(), "progress", ""});
  }
  char buf[65536];
  for (;;) {
    CheckExits();
    EscalateIfOverdue();
    std::vector<pollfd> pfds;
    std::vector<Stream*> live;
    for (auto& s : streams) {
      if (s.fd >= 0) {
        pfds.push_back({s.fd, POLLIN, 0});
        live.push_back(&s);
      }
    }
    if (pfds.empty()) {
      bool all_exited = true;
      for (const auto& m : members_) all_exited &= m.exit_code.has_value();
      if (all_exited) break;
      // Pipes closed; a process may still be exiting (or have handed its pipes to nobody and kept running).
      ::poll(nullptr, 0, 20);
      continue;
    }
    const int r = ::poll(pfds.data(), pfds.size(), 100);
    if (r < 0 && errno != EINTR) {
      for (auto& s : streams) s.fd = -1;  // cannot read them; still reap (and, when told, stop) every process
      continue;
    }
    for (size_t i = 0; r > 0 && i < pfds.size(); ++i) {
      if (!(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      Stream& s = *live[i];
      const ssize_t n = ::read(s.fd, buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (!s.partial.empty()) OnLine(*s.member, s.name, s.partial);
        s.partial.clear();
        s.fd = -1;  // owned (and closed) by the Process
        continue;
      }
      s.partial.append(buf, static_cast<size_t>(n));
      size_t start = 0;
      for (size_t nl; (nl = s.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        OnLine(*s.member, s.name, s.partial.substr(start, nl - start));
      }
      s.partial.erase(0, start);
    }
  }
  SettleGroupExit();
  finished_.store(true);
}

// Progress comes from rank 0 alone (the only rank with the pipe). Log lines from every process, the
// others' prefixed with their rank, so one job log tells them apart.
void JobRunner::OnLine(Member& m, const std::string& stream, const std::string& text) {
  if (stream == "progress") {
    OnProgressEvent(text);
    return;
  }
  std::string line = CleanLine(text);
  if (stream == "stderr" && !line.empty()) m.last_stderr_line = line;
  std::lock_guard lock(mu_);
  AddLogLocked(stream, m.prefix + line);
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
  // A member's ranks report no progress (global rank 0, on node 0, alone does): it says none.
  if (!gang_member()) *r.mutable_progress() = progress_;
  if (config_.nodes > 1 && !gang_member() && !rendezvous_.empty() && !rendezvous_acked_) r.set_rendezvous(rendezvous_);
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
  // Every rank of a member exited 0 (SettleGroupExit): its part is done; node 0 verifies and reports.
  if (gang_member() && exit_code == contract::kExitOk) {
    o.kind = Outcome::kMemberDone;
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
    o.error = Cat("cancelled (", who_, " exit code ", exit_code, ")");
    return o;
  }
  if (exit_code == contract::kExitInvalidJob) {
    o.kind = Outcome::kInvalidInput;
    o.error = last_stderr_line_.empty() ? Cat(who_, ": invalid job (exit ", exit_code, ")") : last_stderr_line_;
    return o;
  }
  o.kind = Outcome::kRetryable;
  if (exit_code == contract::kExitInterrupted) {
    o.error = reason == StopReason::kDrain ? Cat("interrupted: the worker is draining (exit ", exit_code, ")")
                                           : Cat("interrupted (exit ", exit_code, ")", tail);
  } else if (exit_code == contract::kExitOk) {
    o.error = Cat(who_, " exited 0 without a done event");
  } else if (exit_code > 128) {
    o.error = Cat(who_, " killed by signal ", exit_code - 128, tail);
  } else {
    o.error = Cat(who_, " exited with code ", exit_code, tail);
  }
  return o;
}

}  // namespace btx::worker
