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
#include "btx/storage/store.h"

namespace btx::scheduler {

struct SchedulerConfig {
  std::string listen = "127.0.0.1:0";
  std::string artifact_root = "/tmp/btx-artifacts";  // absolute path; published as file:// URIs
  Duration lease = std::chrono::seconds(30);
  Duration heartbeat_interval = std::chrono::seconds(5);
  Duration max_poll = std::chrono::seconds(30);
  Duration reap_interval = std::chrono::seconds(2);
  storage::RetryPolicy retry;
};

// Wakes long polls and streams when jobs or events change (in this process, or — through
// LISTEN/NOTIFY — in another replica).
class Notifier {
 public:
  void Notify();
  // Waits until Notify or the deadline; returns the generation seen, to detect missed wake-ups.
  uint64_t WaitFor(uint64_t seen, Duration max_wait);
  uint64_t generation();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;
};

class Scheduler {
 public:
  Scheduler(SchedulerConfig config, storage::Store& store, const Clock& clock, std::string conninfo);
  ~Scheduler();
  // Binds and serves; returns the bound port.
  absl::StatusOr<int> Start();
  void Shutdown();
  void Wait();
  // One reaper pass (the background loop calls this; tests call it directly with a manual clock).
  absl::Status ReapOnce();
  Notifier& notifier() { return notifier_; }

 private:
  void ReaperLoop();
  void ListenLoop();

  SchedulerConfig config_;
  storage::Store& store_;
  const Clock& clock_;
  std::string conninfo_;
  Notifier notifier_;
  std::unique_ptr<grpc::Service> pipelines_, workers_;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> stopping_{false};
  std::thread reaper_, listener_;
};

}  // namespace btx::scheduler
