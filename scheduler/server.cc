#include "btx/scheduler/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <pqxx/pqxx>

#include "btx/common/strings.h"
#include "services.h"

namespace btx::scheduler {

void Notifier::Notify() {
  {
    std::lock_guard lock(mu_);
    ++gen_;
  }
  cv_.notify_all();
}

uint64_t Notifier::generation() {
  std::lock_guard lock(mu_);
  return gen_;
}

uint64_t Notifier::WaitFor(uint64_t seen, Duration max_wait) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, max_wait, [&] { return gen_ != seen; });
  return gen_;
}

Scheduler::Scheduler(SchedulerConfig config, storage::Store& store, const Clock& clock, std::string conninfo)
    : config_(std::move(config)), store_(store), clock_(clock), conninfo_(std::move(conninfo)) {}

Scheduler::~Scheduler() { Shutdown(); }

absl::StatusOr<int> Scheduler::Start() {
  pipelines_ = std::make_unique<PipelineServiceImpl>(store_, clock_, notifier_);
  workers_ = std::make_unique<WorkerServiceImpl>(config_, store_, clock_, notifier_);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config_.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(pipelines_.get());
  builder.RegisterService(workers_.get());
  builder.SetMaxReceiveMessageSize(4 << 20);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) return absl::UnavailableError(Cat("cannot listen on ", config_.listen));
  reaper_ = std::thread([this] { ReaperLoop(); });
  listener_ = std::thread([this] { ListenLoop(); });
  return port;
}

void Scheduler::Shutdown() {
  if (stopping_.exchange(true)) return;
  notifier_.Notify();
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (reaper_.joinable()) reaper_.join();
  if (listener_.joinable()) listener_.join();
}

void Scheduler::Wait() {
  if (server_) server_->Wait();
}

absl::Status Scheduler::ReapOnce() {
  auto expired = store_.ReapExpiredLeases(config_.retry, clock_.Now());
  if (!expired.ok()) return expired.status();
  auto lost = store_.MarkLostWorkers(config_.lease, clock_.Now());
  if (!expired->empty()) notifier_.Notify();
  return lost.status();
}

void Scheduler::ReaperLoop() {
  uint64_t gen = notifier_.generation();
  while (!stopping_) {
    (void)ReapOnce();  // a database outage is retried on the next pass
    gen = notifier_.WaitFor(gen, config_.reap_interval);
  }
}

namespace {
class Receiver final : public pqxx::notification_receiver {
 public:
  Receiver(pqxx::connection_base& c, const std::string& channel, Notifier& n) : notification_receiver(c, channel), n_(n) {}
  void operator()(const std::string&, int) override { n_.Notify(); }

 private:
  Notifier& n_;
};
}  // namespace

void Scheduler::ListenLoop() {
  while (!stopping_) {
    try {
      pqxx::connection conn(conninfo_);
      Receiver jobs(conn, storage::kJobsChannel, notifier_), events(conn, storage::kEventsChannel, notifier_);
      while (!stopping_) conn.await_notification(0, 200000);
    } catch (const std::exception&) {
      // The database is away; wake everyone so they see the error, then try again shortly.
      notifier_.Notify();
      for (int i = 0; i < 10 && !stopping_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
}

}  // namespace btx::scheduler
