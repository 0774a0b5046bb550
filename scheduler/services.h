#pragma once
#include <optional>
#include <unordered_map>
#include <mutex>
#include <deque>

#include <atomic>
#include <functional>

#include "btx/common/artifact_store.h"
#include "batcher.h"
#include "handler_pool.h"
#include "btx/scheduler/server.h"
#include "metrics.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"

namespace btx::scheduler {

class Followers;

class PipelineServiceImpl final : public btx::v1::PipelineService::Service {
 public:
  // Watch and Logs run on `followers` (follow.h): its caps, its own database pool, its shared feeds.
  PipelineServiceImpl(storage::Store& store, const Clock& clock, WakeUps& wakeups, const std::atomic<bool>& stopping,
                      Followers& followers, std::vector<std::string> data_roots = {},
                      std::optional<Authenticator> authenticator = std::nullopt)
      : store_(store),
        clock_(clock),
        wakeups_(wakeups),
        stopping_(stopping),
        followers_(followers),
        data_roots_(std::move(data_roots)),
        authenticator_(std::move(authenticator)) {}
  grpc::Status Submit(grpc::ServerContext*, const btx::v1::SubmitRequest*, btx::v1::SubmitResponse*) override;
  grpc::Status Get(grpc::ServerContext*, const btx::v1::GetPipelineRequest*, btx::v1::Pipeline*) override;
  grpc::Status List(grpc::ServerContext*, const btx::v1::ListPipelinesRequest*, btx::v1::ListPipelinesResponse*) override;
  grpc::Status Cancel(grpc::ServerContext*, const btx::v1::CancelRequest*, btx::v1::Pipeline*) override;
  grpc::Status Retry(grpc::ServerContext*, const btx::v1::RetryRequest*, btx::v1::Pipeline*) override;
  grpc::Status Watch(grpc::ServerContext*, const btx::v1::WatchRequest*, grpc::ServerWriter<btx::v1::Event>*) override;
  grpc::Status Logs(grpc::ServerContext*, const btx::v1::LogsRequest*, grpc::ServerWriter<btx::v1::LogLine>*) override;
  grpc::Status ListJobs(grpc::ServerContext*, const btx::v1::ListJobsRequest*, btx::v1::ListJobsResponse*) override;
  grpc::Status ListWorkers(grpc::ServerContext*, const btx::v1::ListWorkersRequest*, btx::v1::ListWorkersResponse*) override;

 private:
  storage::Store& store_;
  const Clock& clock_;
  WakeUps& wakeups_;
  const std::atomic<bool>& stopping_;
  Followers& followers_;
  const std::vector<std::string> data_roots_;
  // Who calls, from the call's own credentials; none: no authentication (loopback dev mode).
  const std::optional<Authenticator> authenticator_;
};

// AcquireJob and Complete, the calls every job makes, use gRPC's callback API and run on a
// HandlerPool (see handler_pool.h); the rarer calls stay synchronous.
using WorkerServiceBase = btx::v1::WorkerService::WithCallbackMethod_AcquireJob<
    btx::v1::WorkerService::WithCallbackMethod_Complete<btx::v1::WorkerService::Service>>;

class WorkerServiceImpl final : public WorkerServiceBase {
 public:
  // `metrics` may be null; `stopping` ends long polls at once when the server shuts down.
  WorkerServiceImpl(const SchedulerConfig& config, storage::Store& store, const Clock& clock, WakeUps& wakeups,
                    SchedulerMetrics* metrics, const std::atomic<bool>& stopping)
      : config_(config),
        artifacts_(config.artifact_root),
        store_(store),
        clock_(clock),
        wakeups_(wakeups),
        metrics_(metrics),
        stopping_(stopping),
        claims_({.max_batch = config.max_batch, .max_in_flight = config.batches_in_flight},
                [this](std::vector<ClaimCall>& calls) { return RunClaims(calls); },
                [](const ClaimCall& c) { return int64_t{c.free_gpus}; }),
        completions_({.max_batch = config.max_batch, .max_in_flight = config.batches_in_flight},
                     [this](std::vector<storage::Completion>& cs) { return RunCompletions(cs); }),
        handlers_(static_cast<size_t>(config.max_handler_threads)) {}
  grpc::Status Register(grpc::ServerContext*, const btx::v1::RegisterRequest*, btx::v1::RegisterResponse*) override;
  grpc::ServerUnaryReactor* AcquireJob(grpc::CallbackServerContext*, const btx::v1::AcquireJobRequest*,
                                       btx::v1::AcquireJobResponse*) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const btx::v1::HeartbeatRequest*, btx::v1::HeartbeatResponse*) override;
  grpc::ServerUnaryReactor* Complete(grpc::CallbackServerContext*, const btx::v1::CompleteRequest*,
                                     btx::v1::CompleteResponse*) override;
  grpc::Status Fail(grpc::ServerContext*, const btx::v1::FailRequest*, btx::v1::FailResponse*) override;

 private:
  // Runs `body` on handlers_ and finishes the call with its status.
  grpc::ServerUnaryReactor* OnHandlerPool(grpc::CallbackServerContext* ctx, std::function<grpc::Status()> body);
  grpc::Status AcquireJobBlocking(grpc::ServerContextBase*, const btx::v1::AcquireJobRequest*, btx::v1::AcquireJobResponse*);
  grpc::Status CompleteBlocking(const btx::v1::CompleteRequest*);
  // What a claim's note asks of a gang (storage::ClaimNote): this worker's member lease, if any.
  absl::StatusOr<std::optional<storage::ClaimedJob>> GangStep(const btx::v1::AcquireJobRequest& req, storage::ClaimNote note,
                                                              std::chrono::steady_clock::time_point give_up);
  // `uri` must be what this job's attempts were assigned: its output (exact) or a checkpoint below its
  // checkpoint dir. Another job's output would otherwise become this job's result, and its dependents' input.
  enum class Assigned { kOutput, kCheckpoint };
  absl::Status CheckAssignedUri(const std::string& field, const std::string& job_id, int attempt, const std::string& uri,
                                Assigned what);
  struct ClaimCall {
    std::string worker_id;
    int free_gpus = 0;
  };
  std::vector<storage::ClaimOutcome> RunClaims(std::vector<ClaimCall>& calls);
  // Readied dependents, or the completion's error.
  std::vector<absl::StatusOr<int>> RunCompletions(std::vector<storage::Completion>& completions);

  const SchedulerConfig& config_;
  // Artifacts and checkpoints that workers report must lie in it (PathOf checks the URI).
  FileArtifactStore artifacts_;
  // The dir each job claimed here was assigned, so that checking a Complete costs no database read (a job
  // claimed through another replica, or before a restart, is looked up). Bounded: the oldest go first.
  void RememberJobDir(const std::string& job_id, std::string dir);
  std::optional<std::string> RememberedJobDir(const std::string& job_id);
  std::mutex job_dirs_mu_;
  std::unordered_map<std::string, std::string> job_dirs_;
  std::deque<std::string> job_dirs_order_;
  storage::Store& store_;
  const Clock& clock_;
  WakeUps& wakeups_;
  SchedulerMetrics* metrics_;
  const std::atomic<bool>& stopping_;
  Batcher<ClaimCall, storage::ClaimOutcome> claims_;
  Batcher<storage::Completion, absl::StatusOr<int>> completions_;
  // Last: destroyed first, so every call still running finishes while the members it uses exist.
  HandlerPool handlers_;
};

}  // namespace btx::scheduler
