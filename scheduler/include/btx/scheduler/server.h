// The scheduler's gRPC services over the Store. Stateless apart from wake-ups: every decision is a
// database transaction, so replicas can share one database and a restart loses nothing.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "btx/common/clock.h"
#include "btx/scheduler/auth.h"
#include "btx/storage/store.h"

namespace btx::metrics {
class Registry;
}

namespace btx::scheduler {

class SchedulerMetrics;
class Followers;

struct SchedulerConfig {
  std::string listen = "127.0.0.1:0";
  std::string artifact_root = "/tmp/btx-artifacts";  // absolute path; published as file:// URIs
  // Every path a pipeline names must lie under one of these (absolute, normalised: NormaliseDataRoots);
  // empty: any path (a single-user machine). docs/security.md.
  std::vector<std::string> data_roots{};
  Duration lease = std::chrono::seconds(30);
  Duration heartbeat_interval = std::chrono::seconds(5);
  Duration max_poll = std::chrono::seconds(30);
  Duration reap_interval = std::chrono::seconds(2);
  // A job's progress is kept in place with every heartbeat; a job.progress event (what Watch
  // streams) is written at most once per this interval per job. 0: two heartbeat intervals (10 s
  // with the default; a stack that beats often for a live display gets livelier events).
  Duration progress_event_interval{0};
  Duration ProgressEventInterval() const {
    return progress_event_interval.count() > 0 ? progress_event_interval : 2 * heartbeat_interval;
  }
  // How old and how many log lines and events are kept (storage/retention.h); the reaper applies it
  // every retention_interval of the clock.
  storage::RetentionPolicy retention{};
  Duration retention_interval = std::chrono::minutes(5);
  // gRPC handler threads kept waiting for calls instead of exiting (see Start()).
  int max_idle_threads = 256;
  // Threads running AcquireJob and Complete (long polls hold one each); more calls than this wait.
  int max_handler_threads = 4096;
  // Wake-ups for other replicas are sent at most once per this interval.
  Duration notify_coalesce = std::chrono::milliseconds(10);
  // How often the fleet-wide gauges are re-read from the database (with a metrics registry).
  Duration metrics_refresh = std::chrono::seconds(5);
  // btx_router_expert_share covers the newest this many finished evaluations.
  int router_share_pipelines = 10;
  storage::RetryPolicy retry;
  // Claims (and completions) that arrive while earlier ones are at the database go to it together,
  // as one call of at most max_batch; at most batches_in_flight such calls run at once per kind.
  int max_batch = 64;
  int batches_in_flight = 4;
  // Watch and Logs streams (docs/reliability.md, "Followers"): open at once per caller (by name;
  // without authentication every caller is the one anonymous caller) and on this replica; more are
  // refused with RESOURCE_EXHAUSTED.
  int max_streams_per_user = 64;
  int max_streams = 4096;
  // The followers' own database connections, beside the pool heartbeats and claims use: followers
  // never wait for, nor hold, one of those.
  int follower_db_connections = 2;
  // TLS, client certificates and tokens; the default (plaintext, no authentication) is for
  // loopback only, and Start() refuses it elsewhere (auth.h).
  SecurityConfig security;
};

// Wakes waiters in this process: generation-counted, so a wake-up between reading the generation
// and waiting is not lost.
class Notifier {
 public:
  void Notify();  // wakes every waiter
  // Wakes up to n waiters: claims chain their own wake-ups (see WorkerServiceImpl::AcquireJob), so
  // a new job does not send every idle long poll to the database at once.
  void NotifyOne(int n = 1);
  // Waits until a notification or the deadline; returns the generation seen, to detect missed wake-ups.
  uint64_t WaitFor(uint64_t seen, Duration max_wait);
  uint64_t generation();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;
};

// What a commit changed, told at once to the waiters in this process and, through NOTIFY, to the
// other replicas. The NOTIFYs are coalesced by the scheduler's pump into one small transaction per
// interval: PostgreSQL serialises the commits of all notifying transactions on one lock, so a
// NOTIFY per claim or completion would cap the whole fleet's throughput.
class WakeUps {
 public:
  Notifier& jobs() { return jobs_; }      // a job may have become claimable: long polls
  Notifier& events() { return events_; }  // new events or log lines: Watch and Logs streams
  void JobsChanged();
  void EventsChanged();
  // For the pump: waits until something is to be published (or max_wait, or Stop); returns
  // {jobs, events} and clears them.
  std::pair<bool, bool> TakePending(Duration max_wait);
  void Stop();

 private:
  Notifier jobs_, events_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool jobs_pending_ = false, events_pending_ = false, stopped_ = false;
};

class Scheduler {
 public:
  // With a registry, the scheduler registers its metrics there (docs/metrics.md); the registry
  // must outlive the scheduler. Serving it over HTTP is the caller's business (metrics::Exposer).
  Scheduler(SchedulerConfig config, storage::Store& store, const Clock& clock, std::string conninfo,
            metrics::Registry* registry = nullptr);
  ~Scheduler();
  // Binds and serves; returns the bound port.
  absl::StatusOr<int> Start();
  void Shutdown();
  void Wait();
  // One reaper pass (the background loop calls this; tests call it directly with a manual clock).
  absl::Status ReapOnce();
  // One pass of config.retention (the reaper runs it every retention_interval; tests call it).
  absl::StatusOr<storage::RetentionResult> ApplyRetention();
  // Re-reads the fleet-wide gauges from the database (the background loop calls this every
  // metrics_refresh; tests call it before a scrape). A no-op without a registry.
  absl::Status RefreshMetrics();
  // Long polls wait on this one.
  Notifier& notifier() { return wakeups_.jobs(); }
  // Watch and Logs streams: caps, pool and shared feeds (scheduler/follow.h); null before Start().
  Followers* followers() { return followers_.get(); }

 private:
  void ReaperLoop();
  void ListenLoop();
  void MetricsLoop();
  void PumpLoop();
  void ShutdownOnce();
  // Sleeps up to `d`; returns false once the scheduler is stopping.
  bool SleepUnlessStopping(Duration d);

  SchedulerConfig config_;
  storage::Store& store_;
  const Clock& clock_;
  std::string conninfo_;
  WakeUps wakeups_;
  metrics::Registry* registry_;
  std::unique_ptr<SchedulerMetrics> metrics_;
  std::unique_ptr<Followers> followers_;
  std::unique_ptr<grpc::Service> pipelines_, workers_;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> stopping_{false};
  std::once_flag shutdown_once_;
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  std::thread reaper_, listener_, metrics_loop_, pump_;
};

}  // namespace btx::scheduler
