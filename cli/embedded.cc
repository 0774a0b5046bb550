#include "embedded.h"

#include <unistd.h>

#include <filesystem>

#include <grpcpp/grpcpp.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/spdlog.h>

#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/scheduler/server.h"
#include "btx/storage/database.h"
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

EmbeddedStack::EmbeddedStack(EmbeddedConfig config) : config_(std::move(config)) {}

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
    s->gpus_ = caps.gpus();
    s->slots_ = cfg.slots > 0 ? cfg.slots : std::max(1, caps.gpus());
    s->threads_per_job_ = cfg.threads_per_job > 0 ? cfg.threads_per_job : std::max(1, caps.cpu_threads / s->slots_);
    // One worker with a slot per GPU: the worker gives slot i the device cuda:i, so GPUs never
    // collide the way separate single-slot workers (all on cuda:0) would.
    worker::WorkerConfig wc;
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    wc.name = Cat("btxctl@", host);
    wc.train_binary = train_binary;
    wc.work_dir = cfg.state_dir + "/work";
    wc.slots = s->slots_;
    wc.threads_per_job = s->threads_per_job_;
    wc.poll_wait = std::chrono::seconds(5);
    wc.stop_grace = cfg.stop_grace;
    auto channel = grpc::CreateChannel(s->target(), grpc::InsecureChannelCredentials());
    s->worker_ = std::make_unique<worker::Worker>(wc, channel, s->launcher_, s->clock_, nullptr);
    s->worker_thread_ = std::thread([w = s->worker_.get()] { w->Run(); });
  }
  return s;
}

std::string EmbeddedStack::target() const { return Cat("127.0.0.1:", port_); }

void EmbeddedStack::DrainWorkers() {
  if (worker_) worker_->Drain();
}

void EmbeddedStack::StopWorkers() {
  if (worker_) worker_->Stop();
}

void EmbeddedStack::WaitWorkers() {
  if (worker_thread_.joinable()) worker_thread_.join();
}

EmbeddedStack::~EmbeddedStack() {
  DrainWorkers();
  WaitWorkers();
  worker_.reset();
  if (scheduler_) {
    scheduler_->Shutdown();
    scheduler_.reset();
  }
  db_.reset();
  spdlog::default_logger()->flush();
}

}  // namespace btx::cli
