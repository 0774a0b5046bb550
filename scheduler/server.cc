#include "btx/scheduler/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <optional>
#include <utility>
#include <vector>

#include "btx/common/strings.h"
#include "btx/metrics/metrics.h"
#include "btx/storage/notify.h"
#include "follow.h"
#include "metrics.h"
#include "services.h"

#ifndef BTX_VERSION
#define BTX_VERSION "unknown"
#endif

namespace btx::scheduler {

void Notifier::Notify() {
  {
    std::lock_guard lock(mu_);
    ++gen_;
  }
  cv_.notify_all();
}

void Notifier::NotifyOne(int n) {
  {
    std::lock_guard lock(mu_);
    ++gen_;
  }
  for (int i = 0; i < n; ++i) cv_.notify_one();
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

void WakeUps::JobsChanged() {
  jobs_.NotifyOne();
  {
    std::lock_guard lock(mu_);
    jobs_pending_ = true;
  }
  cv_.notify_one();
}

void WakeUps::EventsChanged() {
  events_.Notify();
  {
    std::lock_guard lock(mu_);
    events_pending_ = true;
  }
  cv_.notify_one();
}

std::pair<bool, bool> WakeUps::TakePending(Duration max_wait) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, max_wait, [&] { return jobs_pending_ || events_pending_ || stopped_; });
  return {std::exchange(jobs_pending_, false), std::exchange(events_pending_, false)};
}

void WakeUps::Stop() {
  {
    std::lock_guard lock(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
  jobs_.Notify();
  events_.Notify();
}

Scheduler::Scheduler(SchedulerConfig config, storage::Store& store, const Clock& clock, std::string conninfo,
                     metrics::Registry* registry)
    : config_(std::move(config)), store_(store), clock_(clock), conninfo_(std::move(conninfo)), registry_(registry) {
  if (registry) metrics_ = std::make_unique<SchedulerMetrics>(*registry, config_.lease, BTX_VERSION);
}

Scheduler::~Scheduler() { Shutdown(); }

absl::StatusOr<int> Scheduler::Start() {
  if (auto s = CheckSecurity(config_.listen, config_.security); !s.ok()) return s;
  followers_ = std::make_unique<Followers>(config_, conninfo_, wakeups_, stopping_);
  pipelines_ = std::make_unique<PipelineServiceImpl>(store_, clock_, wakeups_, stopping_, *followers_, config_.data_roots,
      config_.security.authenticates() ? std::optional<Authenticator>(Authenticator(config_.security.identities))
                                       : std::nullopt);
  workers_ = std::make_unique<WorkerServiceImpl>(config_, store_, clock_, wakeups_, metrics_.get(), stopping_);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  RefusalObserver on_refused;
  if (registry_) {
    // Refused calls never reach the handlers, nor so btx_grpc_requests_total: counted here, so
    // that a credential-guessing client or a misconfigured worker shows on a dashboard.
    auto& refused = registry_->AddCounter("btx_grpc_auth_refusals_total",
                                          "calls refused by authentication or authorisation", {"method", "code"});
    on_refused = [&refused](std::string_view method, grpc::StatusCode code) {
      refused.WithLabels({MethodLabel(std::string(method).c_str()), StatusCodeName(code)}).Inc();
    };
  }
  builder.AddListeningPort(config_.listen, MakeServerCredentials(config_.security, std::move(on_refused)), &port);
  builder.RegisterService(pipelines_.get());
  builder.RegisterService(workers_.get());
  builder.SetMaxReceiveMessageSize(4 << 20);
  // For the calls still on the sync API (heartbeats, Watch and Logs streams, the PipelineService):
  // a sync server thread whose handler returns exits when max_pollers threads already poll, and a
  // new one is made for the next call; with many calls at once that churn (thread stacks mapped
  // and unmapped per call) cost more than the handlers. Idle threads just wait. (AcquireJob and
  // Complete, which hold threads in long polls, run on the WorkerService's HandlerPool instead.)
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, config_.max_idle_threads);
  // Per-call channelz bookkeeping nobody reads here; our own metrics count the calls.
  builder.AddChannelArgument(GRPC_ARG_ENABLE_CHANNELZ, 0);
  if (metrics_) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
    interceptors.push_back(metrics_->MakeInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
  }
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) return absl::UnavailableError(Cat("cannot listen on ", config_.listen));
  followers_->Start();
  reaper_ = std::thread([this] { ReaperLoop(); });
  listener_ = std::thread([this] { ListenLoop(); });
  pump_ = std::thread([this] { PumpLoop(); });
  if (metrics_) metrics_loop_ = std::thread([this] { MetricsLoop(); });
  return port;
}

void Scheduler::Shutdown() {
  // call_once makes a second caller (a signal's thread racing main) wait until the first is done.
  std::call_once(shutdown_once_, [this] { ShutdownOnce(); });
}

void Scheduler::ShutdownOnce() {
  {
    std::lock_guard lock(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  wakeups_.Stop();
  // Before the server's shutdown, which waits for the streams to end.
  if (followers_) followers_->Stop();
  if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (reaper_.joinable()) reaper_.join();
  if (listener_.joinable()) listener_.join();
  if (pump_.joinable()) pump_.join();
  if (metrics_loop_.joinable()) metrics_loop_.join();
}

bool Scheduler::SleepUnlessStopping(Duration d) {
  std::unique_lock lock(stop_mu_);
  stop_cv_.wait_for(lock, d, [&] { return stopping_.load(); });
  return !stopping_;
}

void Scheduler::Wait() {
  if (server_) server_->Wait();
}

absl::Status Scheduler::ReapOnce() {
  auto expired = store_.ReapExpiredLeases(config_.retry, clock_.Now());
  if (!expired.ok()) return expired.status();
  if (metrics_) metrics_->OnExpired(*expired);
  auto lost = store_.MarkLostWorkers(config_.lease, clock_.Now());
  if (!expired->empty()) {
    wakeups_.JobsChanged();
    wakeups_.EventsChanged();
  }
  return lost.status();
}

absl::StatusOr<storage::RetentionResult> Scheduler::ApplyRetention() {
  return store_.ApplyRetention(config_.retention, clock_.Now());
}

void Scheduler::ReaperLoop() {
  // Leases expire with time, not with commits, so the reaper runs on a timer; waking it on every
  // notification would double the database load of a busy scheduler.
  std::optional<TimePoint> retention_due;  // the first pass applies it
  do {
    (void)ReapOnce();  // a database outage is retried on the next pass
    if (const TimePoint now = clock_.Now(); !retention_due || now >= *retention_due) {
      auto r = ApplyRetention();
      // A pass cut short by its row budget goes on at the next reap; an error waits for the next interval.
      retention_due = r.ok() && r->more ? now : now + config_.retention_interval;
    }
  } while (SleepUnlessStopping(config_.reap_interval));
}

absl::Status Scheduler::RefreshMetrics() {
  if (!metrics_) return absl::OkStatus();
  const uint64_t mark = metrics_->Mark();
  auto snapshot = store_.ReadFleetSnapshot(config_.router_share_pipelines, clock_.Now());
  if (!snapshot.ok()) return snapshot.status();
  metrics_->ApplySnapshot(*snapshot, mark);
  return absl::OkStatus();
}

void Scheduler::MetricsLoop() {
  do {
    (void)RefreshMetrics();  // stale gauges until the database is back; the next pass retries
  } while (SleepUnlessStopping(config_.metrics_refresh));
}

void Scheduler::PumpLoop() {
  storage::NotifySender sender(conninfo_);
  while (!stopping_) {
    const auto [jobs, events] = wakeups_.TakePending(std::chrono::seconds(1));
    if (!jobs && !events) continue;
    std::vector<std::string> channels;
    if (jobs) channels.emplace_back(storage::kJobsChannel);
    if (events) channels.emplace_back(storage::kEventsChannel);
    // A lost wake-up only delays the other replicas until their periodic re-checks.
    (void)sender.Notify(channels);
    // Everything committed meanwhile rides on the next NOTIFY.
    if (!SleepUnlessStopping(config_.notify_coalesce)) break;
  }
}

void Scheduler::ListenLoop() {
  // One waiter starts the claim chain; every stream looks at the new events.
  storage::NotifyListener listener(conninfo_, {{storage::kJobsChannel, [this] { wakeups_.jobs().NotifyOne(); }},
                                             // A gang formed: its members' polls must all wake to pick their leases up.
                                             {storage::kGangsChannel, [this] { wakeups_.jobs().Notify(); }},
                                               {storage::kEventsChannel, [this] { wakeups_.events().Notify(); }}});
  while (!stopping_) {
    if (listener.Wait(std::chrono::milliseconds(200)).ok()) continue;
    // The database is away; wake everyone so they see the error, then try again shortly.
    wakeups_.jobs().Notify();
    wakeups_.events().Notify();
    SleepUnlessStopping(std::chrono::seconds(1));
  }
}

}  // namespace btx::scheduler
