#include "metrics.h"

#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>

#include "btx/common/strings.h"
#include "btx/contract/job.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"

namespace btx::scheduler {
using json = nlohmann::json;

namespace {

const std::vector<std::string> kPipelineStates = {"RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"};
const std::vector<std::string> kJobStates = {"PENDING", "READY", "LEASED", "RETRY_WAIT", "SUCCEEDED", "FAILED", "CANCELLED"};

double Seconds(Duration d) { return std::chrono::duration<double>(d).count(); }
double UnixSeconds(TimePoint t) { return std::chrono::duration<double>(t.time_since_epoch()).count(); }

const std::set<std::string>& KnownMethods() {
  static const std::set<std::string> known = [] {
    std::set<std::string> out = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                                 "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                 "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"};
    const auto* pool = google::protobuf::DescriptorPool::generated_pool();
    for (const char* service : {btx::v1::PipelineService::service_full_name(), btx::v1::WorkerService::service_full_name()}) {
      const auto* d = pool->FindServiceByName(service);
      for (int i = 0; d && i < d->method_count(); ++i) out.insert(Cat("/", service, "/", d->method(i)->name()));
    }
    return out;
  }();
  return known;
}

class RpcInterceptor final : public grpc::experimental::Interceptor {
 public:
  RpcInterceptor(SchedulerMetrics& m, const char* method)
      : metrics_(m), method_(method), start_(std::chrono::steady_clock::now()) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      // Handler durations are real elapsed time, not the injected clock (which tests freeze).
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      metrics_.OnRpc(method_, methods->GetSendStatus().error_code(), s);
    }
    methods->Proceed();
  }

 private:
  SchedulerMetrics& metrics_;
  const char* method_;
  std::chrono::steady_clock::time_point start_;
};

class RpcInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcInterceptorFactory(SchedulerMetrics& m) : metrics_(m) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new RpcInterceptor(metrics_, info->method());
  }

 private:
  SchedulerMetrics& metrics_;
};

}  // namespace

std::string MethodLabel(const char* full_method) {
  if (full_method == nullptr || !KnownMethods().count(full_method)) return "other";
  std::string_view m(full_method);
  const size_t slash = m.rfind('/');
  const size_t dot = m.rfind('.', slash);
  return std::string(m.substr(dot + 1));
}

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

SchedulerMetrics::SchedulerMetrics(metrics::Registry& r, Duration lease, const std::string& version)
    : lease_(lease),
      pipelines_(r.AddGauge("btx_pipelines", "Pipelines currently in each state (fleet-wide, from the database).", {"state"})),
      jobs_(r.AddGauge("btx_jobs", "Jobs currently in each state, by kind (fleet-wide, from the database).", {"state", "kind"})),
      dispatch_latency_(r.AddHistogram("btx_dispatch_latency_seconds", "Time a job waited from READY to LEASED.",
                                       metrics::ExponentialBuckets(0.01, 2, 16))),
      claim_latency_(r.AddHistogram("btx_claim_latency_seconds",
                                    "Time from an AcquireJob call arriving to the job being claimed in the database.",
                                    metrics::ExponentialBuckets(0.001, 2, 14))),
      db_batch_size_(r.AddHistogram("btx_db_batch_size",
                                    "Claims or completions sent to the database together as one call.",
                                    metrics::ExponentialBuckets(1, 2, 8), {"kind"})),
      lease_expirations_(r.AddCounter("btx_lease_expirations_total",
                                      "Leases that expired (job requeued from its last checkpoint).")),
      job_retries_(r.AddCounter("btx_job_retries_total", "Failed attempts that were scheduled for a retry (RETRY_WAIT).",
                                {"kind"})),
      pipeline_failures_(r.AddCounter("btx_pipeline_failures_total", "Pipelines that ended FAILED.")),
      workers_connected_(r.AddGauge("btx_workers_connected",
                                    "Workers registered and heartbeating (ACTIVE or DRAINING; fleet-wide).")),
      grpc_requests_(r.AddCounter("btx_grpc_requests_total", "gRPC requests handled, by final status.", {"method", "code"})),
      grpc_duration_(r.AddHistogram("btx_grpc_request_duration_seconds",
                                    "gRPC handler duration; AcquireJob is a long poll, so its duration includes the wait.",
                                    metrics::ExponentialBuckets(0.001, 2, 17), {"method"})),
      job_progress_(r.AddGauge("btx_job_progress_ratio", "Step / total steps of a running job, 0..1.",
                               {"pipeline", "job", "kind", "name"})),
      job_loss_(r.AddGauge("btx_job_loss", "Latest training loss reported (nats/token).", {"pipeline", "job", "kind", "name"})),
      job_tokens_per_second_(r.AddGauge("btx_job_tokens_per_second", "Training throughput reported.",
                                        {"pipeline", "job", "kind", "name"})),
      job_eta_(r.AddGauge("btx_job_eta_seconds", "Estimated seconds to the end of the job.",
                          {"pipeline", "job", "kind", "name"})),
      job_last_heartbeat_(r.AddGauge("btx_job_last_heartbeat_timestamp_seconds",
                                     "Unix time of the last heartbeat (or the claim) for a running job.",
                                     {"pipeline", "job", "kind", "name"})),
      router_expert_share_(r.AddGauge("btx_router_expert_share",
                                      "Fraction of tokens routed to each expert in the evaluation; uniform routing gives 1/experts.",
                                      {"pipeline", "layer", "expert"})),
      build_info_(r.AddGauge("btx_build_info", "Always 1; the version of the running binary.", {"version"})),
      gangs_formed_(r.AddCounter("btx_gangs_formed_total", "Gang jobs leased to all their workers at once (by this replica).")),
      gang_pending_(r.AddGauge("btx_gang_pending_nodes",
                               "A gang job waiting to be formed: the workers it needs at once (fleet-wide).",
                               {"pipeline", "job", "name"})),
      gang_member_(r.AddGauge("btx_gang_member", "1 per member of a leased gang job: which worker is which node (fleet-wide).",
                              {"pipeline", "job", "name", "node", "worker"})),
      workers_offering_(r.AddGauge("btx_workers_offering",
                                   "Idle workers offered to the waiting head gang (fleet-wide).")) {
  build_info_.WithLabels({version}).Set(1);
  for (const auto& s : kPipelineStates) pipelines_.WithLabels({s});
  for (const auto& s : kJobStates) {
    for (const auto& k : contract::JobKinds()) {
      jobs_.WithLabels({s, std::string(k.name)});
      job_state_series_.insert({s, std::string(k.name)});
    }
  }
  for (const auto& k : contract::JobKinds()) job_retries_.WithLabels({std::string(k.name)});
}

uint64_t SchedulerMetrics::Mark() {
  std::lock_guard lock(mu_);
  return ++mark_;
}

bool SchedulerMetrics::RemovedSinceLocked(const std::string& job_id, uint64_t mark) const {
  auto it = removed_.find(job_id);
  return it != removed_.end() && it->second > mark;
}

void SchedulerMetrics::SetJobLocked(const std::string& job_id, std::vector<std::string> labels) {
  auto it = live_.find(job_id);
  if (it != live_.end() && it->second.labels != labels) RemoveJobLocked(job_id);
  removed_.erase(job_id);
  auto& live = live_[job_id];
  live.labels = std::move(labels);
  // Taken after the database work that justified the update: a snapshot read that began later
  // saw that work's commit.
  live.mark = ++mark_;
}

void SchedulerMetrics::SetProgressLocked(const std::vector<std::string>& labels, const std::string& progress_json) {
  const json p = json::parse(progress_json, nullptr, false);
  auto& ratio = job_progress_.WithLabels(labels);
  if (!p.is_object()) return;
  const double step = p.value("step", 0.0), total = p.value("total_steps", 0.0);
  if (total > 0) ratio.Set(std::clamp(step / total, 0.0, 1.0));
  if (p.contains("loss") && p["loss"].is_number()) job_loss_.WithLabels(labels).Set(p["loss"].get<double>());
  if (p.contains("tokens_per_s") && p["tokens_per_s"].is_number()) {
    job_tokens_per_second_.WithLabels(labels).Set(p["tokens_per_s"].get<double>());
  }
  if (p.contains("eta_s") && p["eta_s"].is_number()) job_eta_.WithLabels(labels).Set(p["eta_s"].get<double>());
}

void SchedulerMetrics::RemoveJobLocked(const std::string& job_id) {
  auto it = live_.find(job_id);
  if (it != live_.end()) {
    for (auto* f : {&job_progress_, &job_loss_, &job_tokens_per_second_, &job_eta_, &job_last_heartbeat_}) {
      f->Remove(it->second.labels);
    }
    live_.erase(it);
  }
  removed_[job_id] = ++mark_;
}

void SchedulerMetrics::OnClaim(const storage::ClaimedJob& c, TimePoint now, double seconds_since_call, uint64_t mark) {
  claim_latency_.WithLabels({}).Observe(seconds_since_call);
  if (c.job.ready_at) dispatch_latency_.WithLabels({}).Observe(std::max(0.0, Seconds(std::chrono::duration_cast<Duration>(now - *c.job.ready_at))));
  std::lock_guard lock(mu_);
  if (RemovedSinceLocked(c.job.id, mark)) return;
  std::vector<std::string> labels = {c.job.pipeline_id, c.job.id, c.job.kind, c.job.name};
  SetJobLocked(c.job.id, labels);
  // A resumed attempt starts where the checkpoint left it; the progress of the last report is
  // the best estimate until the first heartbeat.
  SetProgressLocked(labels, c.job.progress_json);
  job_last_heartbeat_.WithLabels(labels).Set(UnixSeconds(now));
}

void SchedulerMetrics::OnHeartbeat(const storage::JobDirectiveRow& d, const ReportedProgress* p, TimePoint now,
                                   uint64_t mark) {
  if (d.directive == storage::Directive::kLeaseLost || d.pipeline_id.empty()) return;
  std::lock_guard lock(mu_);
  if (RemovedSinceLocked(d.job_id, mark)) return;
  std::vector<std::string> labels = {d.pipeline_id, d.job_id, d.kind, d.name};
  SetJobLocked(d.job_id, labels);
  auto& ratio = job_progress_.WithLabels(labels);
  if (p != nullptr) {
    if (p->total_steps > 0) ratio.Set(std::clamp(static_cast<double>(p->step) / p->total_steps, 0.0, 1.0));
    job_loss_.WithLabels(labels).Set(p->loss);
    job_tokens_per_second_.WithLabels(labels).Set(p->tokens_per_second);
    job_eta_.WithLabels(labels).Set(p->eta_seconds);
  }
  job_last_heartbeat_.WithLabels(labels).Set(UnixSeconds(now));
}

void SchedulerMetrics::OnBatch(const char* kind, size_t calls) {
  db_batch_size_.WithLabels({kind}).Observe(static_cast<double>(calls));
}

void SchedulerMetrics::OnGangFormed() { gangs_formed_.WithLabels({}).Inc(); }

void SchedulerMetrics::OnComplete(const std::string& job_id) {
  std::lock_guard lock(mu_);
  RemoveJobLocked(job_id);
}

void SchedulerMetrics::OnFail(const std::string& job_id, const storage::FailOutcome& out) {
  if (out.new_state == storage::job_state::kRetryWait) job_retries_.WithLabels({out.kind}).Inc();
  if (out.pipeline_failed) pipeline_failures_.WithLabels({}).Inc();
  std::lock_guard lock(mu_);
  RemoveJobLocked(job_id);
}

void SchedulerMetrics::OnExpired(const std::vector<storage::ExpiredLease>& expired) {
  if (expired.empty()) return;
  lease_expirations_.WithLabels({}).Inc(static_cast<double>(expired.size()));
  for (const auto& e : expired) {
    if (e.pipeline_failed) pipeline_failures_.WithLabels({}).Inc();
  }
  std::lock_guard lock(mu_);
  for (const auto& e : expired) RemoveJobLocked(e.job_id);
}

void SchedulerMetrics::OnRpc(const char* full_method, grpc::StatusCode code, double seconds) {
  const std::string method = MethodLabel(full_method);
  grpc_requests_.WithLabels({method, StatusCodeName(code)}).Inc();
  grpc_duration_.WithLabels({method}).Observe(seconds);
}

void SchedulerMetrics::ApplySnapshot(const storage::FleetSnapshot& s, uint64_t mark) {
  std::lock_guard snapshot_lock(snapshot_mu_);
  std::map<std::string, double> pipelines;
  for (const auto& st : kPipelineStates) pipelines[st] = 0;
  for (const auto& [st, n] : s.pipelines) pipelines[st] = static_cast<double>(n);
  for (const auto& [st, n] : pipelines) pipelines_.WithLabels({st}).Set(n);

  std::map<std::vector<std::string>, double> jobs;
  for (const auto& key : job_state_series_) jobs[key] = 0;
  for (const auto& [st, kind, n] : s.jobs) jobs[{st, kind}] = static_cast<double>(n);
  for (const auto& [key, n] : jobs) {
    jobs_.WithLabels(key).Set(n);
    job_state_series_.insert(key);
  }
  workers_connected_.WithLabels({}).Set(static_cast<double>(s.workers_connected));
  workers_offering_.WithLabels({}).Set(static_cast<double>(s.workers_offering));
  // Gang series live as long as their gang waits or runs: the ones the snapshot no longer has go.
  auto apply = [](metrics::Family<metrics::Gauge>& family, std::set<std::vector<std::string>>& series,
                  std::map<std::vector<std::string>, double> now) {
    for (const auto& key : series) {
      if (!now.count(key)) family.Remove(key);
    }
    series.clear();
    for (const auto& [key, v] : now) {
      family.WithLabels(key).Set(v);
      series.insert(key);
    }
  };
  std::map<std::vector<std::string>, double> pending, members;
  for (const auto& g : s.gangs_waiting) pending[{g.pipeline_id, g.job_id, g.name}] = g.nodes;
  for (const auto& g : s.gang_members) members[{g.pipeline_id, g.job_id, g.name, std::to_string(g.node_rank), g.worker}] = 1;
  apply(gang_pending_, gang_pending_series_, std::move(pending));
  apply(gang_member_, gang_member_series_, std::move(members));

  {
    std::lock_guard lock(mu_);
    std::set<std::string> leased;
    for (const auto& j : s.leased) {
      leased.insert(j.job_id);
      if (RemovedSinceLocked(j.job_id, mark)) continue;  // finished here after the snapshot was read
      std::vector<std::string> labels = {j.pipeline_id, j.job_id, j.kind, j.name};
      auto it = live_.find(j.job_id);
      const bool fresher_here = it != live_.end() && it->second.mark > mark;
      SetJobLocked(j.job_id, labels);
      if (fresher_here) continue;  // a heartbeat this replica saw after the read wins
      SetProgressLocked(labels, j.progress_json);
      if (j.lease_deadline) {
        // Every heartbeat and the claim set the deadline to their time + lease.
        job_last_heartbeat_.WithLabels(labels).Set(UnixSeconds(*j.lease_deadline - lease_));
      }
    }
    std::vector<std::string> gone;
    for (const auto& [id, live] : live_) {
      if (!leased.count(id) && live.mark <= mark) gone.push_back(id);
    }
    for (const auto& id : gone) RemoveJobLocked(id);
    // Removals before the read are reflected in it; only later ones still need remembering.
    for (auto it = removed_.begin(); it != removed_.end();) {
      it = it->second <= mark ? removed_.erase(it) : std::next(it);
    }
  }
  ApplyRouting(s.evals);
}

void SchedulerMetrics::ApplyRouting(const std::vector<storage::EvalResultRow>& evals) {
  std::map<std::string, std::vector<std::vector<std::string>>> next;
  for (const auto& e : evals) {
    if (next.count(e.pipeline_id)) continue;  // newest result of a retried pipeline wins
    const json r = json::parse(e.result_json, nullptr, false);
    if (!r.is_object() || !r.contains("models") || !r["models"].is_object()) continue;
    const json* model = nullptr;
    if (!e.main_model.empty() && r["models"].contains(e.main_model)) model = &r["models"][e.main_model];
    if (model == nullptr || !model->is_object() || !model->contains("domains")) continue;
    // Token-weighted mean over the evaluation domains of each layer's routing fractions.
    std::vector<std::vector<double>> sum;
    double tokens = 0;
    for (const auto& [domain, d] : (*model)["domains"].items()) {
      if (!d.is_object() || !d.contains("routing") || !d["routing"].is_array()) continue;
      const double w = d.contains("tokens") && d["tokens"].is_number() ? d["tokens"].get<double>() : 1.0;
      const json& layers = d["routing"];
      if (sum.size() < layers.size()) sum.resize(layers.size());
      for (size_t l = 0; l < layers.size(); ++l) {
        if (!layers[l].is_array()) continue;
        if (sum[l].size() < layers[l].size()) sum[l].resize(layers[l].size(), 0.0);
        for (size_t x = 0; x < layers[l].size(); ++x) {
          if (layers[l][x].is_number()) sum[l][x] += w * layers[l][x].get<double>();
        }
      }
      tokens += w;
    }
    if (tokens <= 0) continue;
    auto& labels = next[e.pipeline_id];
    for (size_t l = 0; l < sum.size(); ++l) {
      for (size_t x = 0; x < sum[l].size(); ++x) {
        labels.push_back({e.pipeline_id, std::to_string(l), std::to_string(x)});
        router_expert_share_.WithLabels(labels.back()).Set(sum[l][x] / tokens);
      }
    }
  }
  std::set<std::vector<std::string>> keep;
  for (const auto& [p, ls] : next) keep.insert(ls.begin(), ls.end());
  for (const auto& [p, ls] : routing_series_) {
    for (const auto& l : ls) {
      if (!keep.count(l)) router_expert_share_.Remove(l);
    }
  }
  routing_series_ = std::move(next);
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> SchedulerMetrics::MakeInterceptorFactory() {
  return std::make_unique<RpcInterceptorFactory>(*this);
}

}  // namespace btx::scheduler
