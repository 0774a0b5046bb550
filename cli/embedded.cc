#include "embedded.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <set>

#include <grpcpp/grpcpp.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/spdlog.h>

#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/scheduler/server.h"
#include "btx/storage/database.h"
#include "btx/storage/local_postgres.h"
#include "btx/storage/store.h"
#include "btx/worker/worker.h"

namespace btx::cli {
namespace fs = std::filesystem;

absl::StatusOr<std::string> FindTrainBinary(const std::string& configured) {
  if (!configured.empty()) {
    if (::access(configured.c_str(), X_OK) == 0) return fs::absolute(configured).string();
    return absl::FailedPreconditionError(
        Cat("--train-binary ", configured, ": not an executable file; build it with `cmake --build build --target btx-train`"));
  }
  if (std::string found = FindSiblingExecutable("btx-train"); !found.empty()) return found;
  return absl::FailedPreconditionError(Cat("cannot find btx-train (looked next to btxctl in ", SelfExeDir(),
                                           " and on PATH); build it with `cmake --build build --target btx-train` "
                                           "or pass --train-binary PATH"));
}

namespace {

// The descriptor of `path` locked with `op` (LOCK_SH / LOCK_EX, maybe | LOCK_NB), or -1 with errno set.
int Lock(const std::string& path, int op) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  while (::flock(fd, op) != 0) {
    if (errno == EINTR) continue;
    const int saved = errno;
    ::close(fd);
    errno = saved;
    return -1;
  }
  return fd;
}

std::string LocalWorkerName() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return Cat("btxctl@", host);
}

// `name` is LocalWorkerName() or LocalWorkerName()-N: a local worker of this host in some earlier run.
bool IsLocalWorkerName(const std::string& name, const std::string& base) {
  if (name == base) return true;
  if (name.size() <= base.size() + 1 || name.compare(0, base.size(), base) != 0 || name[base.size()] != '-') {
    return false;
  }
  return name.find_first_not_of("0123456789", base.size() + 1) == std::string::npos;
}

// What local worker `index` of `count` sees of the machine: only its own share of the GPUs, named by
// their CUDA ids on the machine (so a child's CUDA_VISIBLE_DEVICES picks the right devices).
worker::Capabilities GpuShareOf(const worker::Capabilities& all, GpuShare share) {
  worker::Capabilities caps = all;
  caps.gpu_memory_bytes.clear();
  caps.gpu_names.clear();
  caps.gpu_pci_bus_ids.clear();
  caps.gpu_cuda_ids.clear();
  for (int d = share.first; d < share.first + share.count && d < all.gpus(); ++d) {
    const auto i = static_cast<size_t>(d);
    caps.gpu_memory_bytes.push_back(all.gpu_memory_bytes[i]);
    caps.gpu_names.push_back(i < all.gpu_names.size() ? all.gpu_names[i] : "");
    caps.gpu_pci_bus_ids.push_back(i < all.gpu_pci_bus_ids.size() ? all.gpu_pci_bus_ids[i] : "");
    caps.gpu_cuda_ids.push_back(i < all.gpu_cuda_ids.size() && !all.gpu_cuda_ids[i].empty() ? all.gpu_cuda_ids[i]
                                                                                              : std::to_string(d));
  }
  return caps;
}

}  // namespace

std::vector<std::string> LocalWorkerNames(int count) {
  const std::string base = LocalWorkerName();
  std::vector<std::string> names;
  for (int i = 0; i < std::max(1, count); ++i) names.push_back(i == 0 ? base : Cat(base, "-", i + 1));
  return names;
}

GpuShare LocalWorkerGpus(int gpus, int index, int count) {
  if (count <= 0 || gpus <= 0) return {};
  const int per = gpus / count;
  return {index * per, per};
}

EmbeddedStack::EmbeddedStack(EmbeddedConfig config) : config_(std::move(config)) {}

// Holding `.worker.lock`, this process runs the only local workers of the state dir: jobs still leased to
// them (under any of the names an earlier btxctl used, however many workers it ran) belong to a btxctl
// that was killed. They go back to the queue now, as interruptions (no attempt spent), and resume from
// their checkpoints, instead of waiting out their leases.
absl::Status EmbeddedStack::AdoptOrphanedLeases() {
  storage::Store& store = *db_->store;
  auto workers = store.ListWorkers();
  if (!workers.ok()) return workers.status();
  const std::string base = LocalWorkerName();
  std::set<std::string> ids;
  for (const auto& w : *workers) {
    if (IsLocalWorkerName(w.name, base)) ids.insert(w.id);
  }
  if (ids.empty()) return absl::OkStatus();
  auto leased = store.ListJobs("", "LEASED", 1000);
  if (!leased.ok()) return leased.status();
  for (const auto& j : *leased) {
    // A gang job is held by its node 0 (j.worker_id), a local worker too: the embedded scheduler serves
    // only local workers. Failing the attempt through node 0 ends it for every member.
    if (!ids.count(j.worker_id)) continue;
    auto failed = store.FailJob(j.worker_id, j.id, j.attempt, "the btxctl that ran this job ended without stopping it",
                                true, false, "", storage::RetryPolicy{}, clock_.Now(), /*interrupted=*/true);
    if (!failed.ok() && !absl::IsFailedPrecondition(failed.status())) return failed.status();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EmbeddedStack>> EmbeddedStack::Start(EmbeddedConfig config) {
  std::error_code ec;
  config.state_dir = fs::absolute(config.state_dir, ec).lexically_normal().string();
  if (!config.state_dir.empty() && config.state_dir.back() == '/' && config.state_dir.size() > 1) config.state_dir.pop_back();
  if (config.require_existing && !fs::exists(config.state_dir + "/pgdata/PG_VERSION", ec)) {
    return absl::UnavailableError(Cat("no btx state in ", config.state_dir,
                                      " (nothing has run here yet); run `btxctl run PIPELINE.yaml` first, or pass "
                                      "--server HOST:PORT or --state-dir DIR"));
  }
  std::unique_ptr<EmbeddedStack> s(new EmbeddedStack(std::move(config)));
  EmbeddedConfig& cfg = s->config_;
  std::string train_binary;
  if (cfg.workers) {
    auto found = FindTrainBinary(cfg.train_binary);
    if (!found.ok()) return found.status();
    train_binary = *found;
  }
  fs::create_directories(cfg.state_dir, ec);
  if (ec) return absl::FailedPreconditionError(Cat("cannot create state dir ", cfg.state_dir, ": ", ec.message()));
  // One btxctl at a time initialises, starts and migrates the database of a state dir (two at once would
  // race on initdb, pg_ctl start and CREATE DATABASE); released once the database is open.
  const int start_fd = Lock(cfg.state_dir + "/.start.lock", LOCK_EX);
  if (start_fd < 0) {
    return absl::FailedPreconditionError(Cat("cannot lock ", cfg.state_dir, "/.start.lock: ", std::strerror(errno)));
  }
  struct CloseOnExit {
    int fd;
    ~CloseOnExit() { ::close(fd); }
  } start_lock{start_fd};
  // Blocks only while the last btxctl out is stopping PostgreSQL (it holds the lock exclusively).
  s->db_lock_fd_ = Lock(cfg.state_dir + "/.db.lock", LOCK_SH);
  if (s->db_lock_fd_ < 0) {
    return absl::FailedPreconditionError(Cat("cannot lock ", cfg.state_dir, "/.db.lock: ", std::strerror(errno)));
  }
  if (cfg.workers) {
    s->worker_lock_fd_ = Lock(cfg.state_dir + "/.worker.lock", LOCK_EX | LOCK_NB);
    if (s->worker_lock_fd_ < 0) {
      return absl::FailedPreconditionError(Cat(kStateDirBusy, cfg.state_dir,
                                               "; follow its pipelines with `btxctl watch ID` (or `btxctl get pipelines`), "
                                               "wait for it to end, or pass another --state-dir"));
    }
  }

  // The scheduler and workers log through spdlog; on the user's terminal that would tear the
  // progress display, so their log goes to a file in the state dir.
  s->log_file_ = cfg.state_dir + "/btxctl.log";
  try {
    auto logger = spdlog::basic_logger_mt("btxctl-embedded", s->log_file_);
    logger->flush_on(spdlog::level::info);
    spdlog::set_default_logger(logger);
  } catch (const spdlog::spdlog_ex& e) {
    spdlog::set_level(spdlog::level::off);  // no log file (read-only dir?): stay quiet rather than garble
  }

  // The same way btx-scheduler opens its database: start (or reuse) the server, migrate, pool.
  storage::DatabaseOptions db_options;
  db_options.local.state_dir = cfg.state_dir;
  db_options.connections = 8;
  auto db = storage::OpenDatabase(std::move(db_options), s->launcher_);
  if (!db.ok()) return absl::UnavailableError(Cat("embedded database in ", cfg.state_dir, ": ", db.status().message()));
  s->db_ = std::move(*db);
  if (cfg.workers) {
    if (auto a = s->AdoptOrphanedLeases(); !a.ok()) {
      return absl::UnavailableError(Cat("embedded database in ", cfg.state_dir, ": ", a.message()));
    }
  }

  s->artifact_root_ = cfg.state_dir + "/artifacts";
  fs::create_directories(s->artifact_root_, ec);
  if (ec) return absl::FailedPreconditionError(Cat("cannot create ", s->artifact_root_, ": ", ec.message()));
  scheduler::SchedulerConfig sc;
  sc.listen = "127.0.0.1:0";
  sc.artifact_root = s->artifact_root_;
  sc.heartbeat_interval = cfg.heartbeat;
  sc.lease = cfg.lease;
  s->scheduler_ = std::make_unique<scheduler::Scheduler>(sc, *s->db_->store, s->clock_, s->db_->conninfo);
  auto port = s->scheduler_->Start();
  if (!port.ok()) return absl::UnavailableError(Cat("cannot start the embedded scheduler: ", port.status().message()));
  s->port_ = *port;

  if (cfg.workers) {
    const worker::Capabilities caps = worker::DiscoverCapabilities();
    const int count = std::max(1, cfg.local_workers);
    s->gpus_ = caps.gpus();
    s->gpus_per_worker_ = count == 1 ? caps.gpus() : LocalWorkerGpus(caps.gpus(), 0, count).count;
    s->slots_ = cfg.slots > 0 ? cfg.slots : std::max(1, s->gpus_per_worker_);
    s->threads_per_job_ =
        cfg.threads_per_job > 0 ? cfg.threads_per_job : std::max(1, caps.cpu_threads / (count * s->slots_));
    // Each worker has a slot per GPU of its own: it gives each job devices of its share only, so GPUs
    // never collide, neither between the slots of a worker nor between the workers (a gang's members).
    const std::vector<std::string> names = LocalWorkerNames(count);
    auto channel = grpc::CreateChannel(s->target(), grpc::InsecureChannelCredentials());
    for (int i = 0; i < count; ++i) {
      worker::WorkerConfig wc;
      wc.name = names[static_cast<size_t>(i)];
      wc.train_binary = train_binary;
      wc.work_dir = i == 0 ? cfg.state_dir + "/work" : Cat(cfg.state_dir, "/work-", i + 1);
      wc.slots = s->slots_;
      wc.threads_per_job = s->threads_per_job_;
      wc.poll_wait = std::chrono::seconds(5);
      wc.stop_grace = cfg.stop_grace;
      // Gang members find node 0's rendezvous store here: every local worker is on loopback.
      wc.advertise_host = "127.0.0.1";
      if (count > 1) {
        const worker::Capabilities share = GpuShareOf(caps, LocalWorkerGpus(caps.gpus(), i, count));
        wc.discover_capabilities = [share] { return share; };
      }
      s->workers_.push_back(std::make_unique<worker::Worker>(wc, channel, s->launcher_, s->clock_, nullptr));
    }
    for (auto& w : s->workers_) s->worker_threads_.emplace_back([w = w.get()] { w->Run(); });
    // The scheduler refuses a gang pipeline when fewer workers are registered than a job spans (and a GPU
    // pipeline when the registered ones are too small): submit only once every local worker is known.
    // Registration is one loopback call; the bound only keeps a wedged start from hanging btxctl.
    const auto registered = [&s] {
      for (const auto& w : s->workers_) {
        if (w->worker_id().empty()) return false;
      }
      return true;
    };
    for (int i = 0; i < 3000 && !registered(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return s;
}

std::string EmbeddedStack::target() const { return Cat("127.0.0.1:", port_); }

void EmbeddedStack::DrainWorkers() {
  for (auto& w : workers_) w->Drain();
}

void EmbeddedStack::StopWorkers() {
  for (auto& w : workers_) w->Stop();
}

void EmbeddedStack::WaitWorkers() {
  for (auto& t : worker_threads_) {
    if (t.joinable()) t.join();
  }
}

EmbeddedStack::~EmbeddedStack() {
  DrainWorkers();
  WaitWorkers();
  workers_.clear();
  if (scheduler_) {
    scheduler_->Shutdown();
    scheduler_.reset();
  }
  // The last btxctl using the database stops PostgreSQL, whoever started it; any other leaves it running.
  if (db_ && db_->local) db_->local->set_stop_on_exit(db_lock_fd_ >= 0 && ::flock(db_lock_fd_, LOCK_EX | LOCK_NB) == 0);
  db_.reset();
  if (worker_lock_fd_ >= 0) ::close(worker_lock_fd_);
  if (db_lock_fd_ >= 0) ::close(db_lock_fd_);
  spdlog::default_logger()->flush();
}

}  // namespace btx::cli
