// The scheduler's Prometheus metrics (docs/metrics.md). Counters and histograms count what this
// replica did; the fleet-wide gauges and the per-job gauges are rebuilt from the database by
// ApplySnapshot, so every replica reports the same values and a restarted one starts right.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "btx/common/clock.h"
#include "btx/metrics/metrics.h"
#include "btx/storage/records.h"
#include "btx/storage/store.h"

namespace btx::scheduler {

// Progress as a heartbeat reports it.
struct ReportedProgress {
  int64_t step = 0, total_steps = 0;
  double loss = 0, tokens_per_second = 0, eta_seconds = 0;
};

class SchedulerMetrics {
 public:
  // `lease` turns a lease deadline read from the database back into the time of the heartbeat
  // (or claim) that set it.
  SchedulerMetrics(metrics::Registry& registry, Duration lease, const std::string& version);

  // Orders per-job updates against removals that raced with them: take a mark before the
  // database work whose outcome is then reported with it.
  uint64_t Mark();

  void OnClaim(const storage::ClaimedJob& c, TimePoint now, double seconds_since_call, uint64_t mark);
  void OnHeartbeat(const storage::JobDirectiveRow& d, const ReportedProgress* progress, TimePoint now, uint64_t mark);
  void OnComplete(const std::string& job_id);
  void OnGangFormed();
  void OnFail(const std::string& job_id, const storage::FailOutcome& out);
  void OnExpired(const std::vector<storage::ExpiredLease>& expired);
  // A batch of claims or completions sent to the database as one call (kind: claim, complete).
  void OnBatch(const char* kind, size_t calls);
  void OnRpc(const char* full_method, grpc::StatusCode code, double seconds);
  // Replaces the fleet-wide and per-job gauges with what the database holds; `mark` was taken
  // before the snapshot was read.
  void ApplySnapshot(const storage::FleetSnapshot& s, uint64_t mark);

  // Counts every RPC of the server it is installed in (btx_grpc_requests_total and
  // btx_grpc_request_duration_seconds).
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeInterceptorFactory();

 private:
  struct LiveJob {
    std::vector<std::string> labels;  // pipeline, job, kind, name
    uint64_t mark = 0;                // when this replica last set it (after the database work)
  };
  // All under mu_: a series must not be removed between WithLabels and Set.
  void SetJobLocked(const std::string& job_id, std::vector<std::string> labels);
  void SetProgressLocked(const std::vector<std::string>& labels, const std::string& progress_json);
  void RemoveJobLocked(const std::string& job_id);
  bool RemovedSinceLocked(const std::string& job_id, uint64_t mark) const;
  void ApplyRouting(const std::vector<storage::EvalResultRow>& evals);

  Duration lease_;
  metrics::Family<metrics::Gauge>& pipelines_;
  metrics::Family<metrics::Gauge>& jobs_;
  metrics::Family<metrics::Histogram>& dispatch_latency_;
  metrics::Family<metrics::Histogram>& claim_latency_;
  metrics::Family<metrics::Histogram>& db_batch_size_;
  metrics::Family<metrics::Counter>& lease_expirations_;
  metrics::Family<metrics::Counter>& job_retries_;
  metrics::Family<metrics::Counter>& pipeline_failures_;
  metrics::Family<metrics::Gauge>& workers_connected_;
  metrics::Family<metrics::Counter>& grpc_requests_;
  metrics::Family<metrics::Histogram>& grpc_duration_;
  metrics::Family<metrics::Gauge>& job_progress_;
  metrics::Family<metrics::Gauge>& job_loss_;
  metrics::Family<metrics::Gauge>& job_tokens_per_second_;
  metrics::Family<metrics::Gauge>& job_eta_;
  metrics::Family<metrics::Gauge>& job_last_heartbeat_;
  metrics::Family<metrics::Gauge>& router_expert_share_;
  metrics::Family<metrics::Gauge>& build_info_;
  metrics::Family<metrics::Counter>& gangs_formed_;
  metrics::Family<metrics::Gauge>& gang_pending_;
  metrics::Family<metrics::Gauge>& gang_member_;
  metrics::Family<metrics::Gauge>& workers_offering_;
  std::set<std::vector<std::string>> gang_pending_series_, gang_member_series_;

  std::mutex snapshot_mu_;  // one ApplySnapshot at a time; guards the *_series_ sets
  std::mutex mu_;
  uint64_t mark_ = 0;
  std::map<std::string, LiveJob> live_;      // job id -> its series
  std::map<std::string, uint64_t> removed_;  // job id -> mark of its removal, until a snapshot covers it
  std::set<std::vector<std::string>> job_state_series_;
  std::map<std::string, std::vector<std::vector<std::string>>> routing_series_;  // pipeline -> labels
};

// "/btx.v1.WorkerService/AcquireJob" -> "WorkerService/AcquireJob"; methods the scheduler does
// not serve become "other", so a client cannot grow the label set without bound.
std::string MethodLabel(const char* full_method);
const char* StatusCodeName(grpc::StatusCode code);

}  // namespace btx::scheduler
