#include "btx/worker/worker.h"

#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>

#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/common/utf8.h"
#include "btx/contract/job.h"
#include "btx/metrics/metrics.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "device_allocator.h"
#include "gpu_memory.h"
#include "job_runner.h"

namespace btx::worker {
namespace fs = std::filesystem;
using google::protobuf::util::TimeUtil;

namespace {

constexpr char kVersion[] = "0.1.0";

std::string Hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

std::string DefaultTrainBinary() {
  std::string found = FindSiblingExecutable("btx-train");
  // Not found: the sibling path fails at launch with a clear "exec" error naming it.
  return found.empty() ? SelfExeDir() + "/btx-train" : found;
}

bool Retryable(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED ||
         code == grpc::StatusCode::RESOURCE_EXHAUSTED || code == grpc::StatusCode::ABORTED ||
         code == grpc::StatusCode::INTERNAL || code == grpc::StatusCode::UNKNOWN ||
         code == grpc::StatusCode::CANCELLED;
}

}  // namespace

class Worker::Impl {
 public:
  Impl(WorkerConfig config, std::shared_ptr<grpc::Channel> channel, ProcessLauncher& launcher, const Clock& clock,
       metrics::Registry* registry)
      : cfg_(std::move(config)), stub_(v1::WorkerService::NewStub(channel)), launcher_(launcher), clock_(clock) {
    caps_ = cfg_.discover_capabilities ? cfg_.discover_capabilities() : DiscoverCapabilities();
    devices_ = DeviceAllocator(caps_.gpus());
    if (cfg_.name.empty()) cfg_.name = Hostname();
    if (cfg_.advertise_host.empty()) cfg_.advertise_host = Hostname();
    if (cfg_.train_binary.empty()) cfg_.train_binary = DefaultTrainBinary();
    if (cfg_.work_dir.empty()) {
      const char* tmp = std::getenv("TMPDIR");
      cfg_.work_dir = Cat(tmp && *tmp ? tmp : "/tmp", "/btx-worker-", SanitizeComponent(cfg_.name));
    }
    slots_ = cfg_.slots > 0 ? cfg_.slots : std::max(1, caps_.gpus());
    threads_ = cfg_.threads_per_job > 0 ? cfg_.threads_per_job : std::max(1, caps_.cpu_threads / slots_);
    if (registry != nullptr) {
      const std::vector<std::string> w = {cfg_.name};
      jobs_running_ = &registry->AddGauge("btx_worker_jobs_running", "btx-train children currently supervised", {"worker"}).WithLabels(w);
      registry->AddGauge("btx_worker_slots", "jobs this worker accepts at once", {"worker"}).WithLabels(w).Set(slots_);
      child_failures_ = &registry->AddCounter("btx_worker_child_restarts_total",
                                              "btx-train children that exited abnormally (their job is retried)", {"worker"})
                             .WithLabels(w);
      hb_failures_ = &registry->AddCounter("btx_worker_heartbeat_failures_total",
                                           "heartbeats the scheduler did not acknowledge", {"worker"})
                          .WithLabels(w);
      // Without a driver there is nothing to report, and no family at all beats empty ones.
      auto reader = GpuMemoryReader::Open(caps_.gpu_pci_bus_ids);
      if (reader.ok()) {
        gpu_reader_ = *std::move(reader);
        gpu_used_ = &registry->AddGauge("btx_worker_gpu_memory_used_bytes",
                                        "GPU memory in use by all processes, as the driver reports it", {"worker", "gpu"});
        gpu_total_ = &registry->AddGauge("btx_worker_gpu_memory_total_bytes", "GPU memory installed", {"worker", "gpu"});
        SampleGpuMemory();
      } else {
        spdlog::info("worker {}: no GPU memory metrics: {}", cfg_.name, std::string(reader.status().message()));
      }
    }
  }

  ~Impl() { Shutdown(true); }

  void Run() {
    if (!Register()) return Finish();
    std::thread heartbeat([this] { HeartbeatLoop(); });
    // Its own thread: a driver call that stalls must not hold up heartbeats and cost leases.
    std::thread gpu_sampler;
    if (gpu_reader_) gpu_sampler = std::thread([this] { GpuSampleLoop(); });
    AcquireLoop();
    // Draining: tell running children to checkpoint (or kill them), then wait for their reports.
    std::map<uint64_t, std::thread> supervisors;
    {
      std::unique_lock lock(mu_);
      for (auto& [slot, r] : running_) r.runner->RequestStop(killing_ ? StopReason::kKill : StopReason::kDrain);
      cv_.wait(lock, [&] { return running_.empty(); });
      supervisors.swap(supervisors_);
      finished_supervisors_.clear();
    }
    for (auto& [id, t] : supervisors) t.join();
    {
      std::lock_guard lock(mu_);
      heartbeat_done_ = true;
    }
    cv_.notify_all();
    heartbeat.join();
    if (gpu_sampler.joinable()) gpu_sampler.join();
    Finish();
  }

  void Shutdown(bool kill) {
    std::lock_guard lock(mu_);
    if (kill) killing_ = true;
    draining_ = true;
    for (auto& [slot, r] : running_) r.runner->RequestStop(kill ? StopReason::kKill : StopReason::kDrain);
    if (acquire_ctx_ != nullptr) acquire_ctx_->TryCancel();
    cv_.notify_all();
  }

  void WaitFinished() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return finished_ || !started_; });
  }

  std::string worker_id() const {
    std::lock_guard lock(mu_);
    return worker_id_;
  }
  int running_jobs() const {
    std::lock_guard lock(mu_);
    return static_cast<int>(running_.size());
  }

 private:
  void Finish() {
    std::lock_guard lock(mu_);
    finished_ = true;
    cv_.notify_all();
  }

  void AddAuth(grpc::ClientContext& ctx, Duration timeout) const {
    if (!cfg_.bearer_token.empty()) ctx.AddMetadata("authorization", "Bearer " + cfg_.bearer_token);
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  }

  // Waits out one backoff step (woken early by a drain). False once draining.
  bool Backoff(Duration& backoff) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, backoff, [&] { return draining_; });
    backoff = std::min<Duration>(backoff * 2, cfg_.backoff_max);
    return !draining_;
  }

  bool Register() {
    {
      std::lock_guard lock(mu_);
      started_ = true;
    }
    Duration backoff = cfg_.backoff_min;
    for (;;) {
      v1::RegisterRequest req;
      req.set_name(SanitizeUtf8(cfg_.name));
      req.set_hostname(SanitizeUtf8(Hostname()));
      req.set_version(kVersion);
      auto* c = req.mutable_capabilities();
      c->set_gpus(caps_.gpus());
      for (int64_t m : caps_.gpu_memory_bytes) c->add_gpu_memory_bytes(m);
      c->set_cpu_threads(caps_.cpu_threads);
      c->set_slots(slots_);
      v1::RegisterResponse resp;
      grpc::ClientContext ctx;
      AddAuth(ctx, cfg_.rpc_timeout);
      const grpc::Status s = stub_->Register(&ctx, req, &resp);
      if (s.ok()) {
        std::lock_guard lock(mu_);
        worker_id_ = resp.worker_id();
        if (resp.heartbeat_interval_ms() > 0) heartbeat_interval_ = Duration(resp.heartbeat_interval_ms());
        if (resp.lease_duration_ms() > 0) lease_ = Duration(resp.lease_duration_ms());
        spdlog::info("worker {} registered as {} ({} slots, {} threads per job, {} GPUs)", cfg_.name, worker_id_, slots_,
                     threads_, caps_.gpus());
        return true;
      }
      if (!Retryable(s.error_code())) {
        spdlog::error("worker {}: registration refused: {}", cfg_.name, s.error_message());
        return false;
      }
      spdlog::warn("worker {}: scheduler unreachable ({}); retrying in {} ms", cfg_.name, s.error_message(),
                   backoff.count());
      if (!Backoff(backoff)) return false;
    }
  }

  int FreeSlotLocked() const {
    for (int i = 0; i < slots_; ++i) {
      if (!running_.count(i)) return i;
    }
    return -1;
  }

  // Joins the supervisor threads that have finished (each has reported its job and left running_), so
  // that a worker that runs many jobs holds threads for the jobs it runs now, not for every job it ran.
  void JoinFinishedSupervisors() {
    std::vector<std::thread> done;
    {
      std::lock_guard lock(mu_);
      for (uint64_t id : finished_supervisors_) {
        if (auto node = supervisors_.extract(id)) done.push_back(std::move(node.mapped()));
      }
      finished_supervisors_.clear();
    }
    for (auto& t : done) t.join();
  }

  void AcquireLoop() {
    Duration backoff = cfg_.backoff_min;
    for (;;) {
      JoinFinishedSupervisors();
      int slot = -1;
      grpc::ClientContext ctx;
      v1::AcquireJobRequest req;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return draining_ || FreeSlotLocked() >= 0; });
        if (draining_) return;
        // The deadline starts now, not before the wait for a free slot: after a job longer than
        // the poll plus the RPC timeout the call would otherwise fail at once (DEADLINE_EXCEEDED).
        AddAuth(ctx, cfg_.poll_wait + cfg_.rpc_timeout);
        slot = FreeSlotLocked();
        // Devices, not slots: a 2-GPU job holds one slot and two GPUs. Nothing takes devices until this
        // call returns (StartJob runs on this thread), so what it claims against is still free then.
        req.set_worker_id(worker_id_);
        req.set_free_gpus(devices_.free());
        acquire_ctx_ = &ctx;
      }
      req.set_wait_timeout_ms(cfg_.poll_wait.count());
      v1::AcquireJobResponse resp;
      const grpc::Status s = stub_->AcquireJob(&ctx, req, &resp);
      bool draining;
      {
        std::lock_guard lock(mu_);
        acquire_ctx_ = nullptr;
        draining = draining_;
      }
      if (!s.ok()) {
        if (draining) return;
        if (s.error_code() == grpc::StatusCode::NOT_FOUND || s.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
          spdlog::warn("worker {}: scheduler does not know this worker ({}); registering again", cfg_.name, s.error_message());
          if (!Register()) return;
          continue;
        }
        spdlog::warn("worker {}: AcquireJob failed ({}: {}); retrying in {} ms", cfg_.name,
                     static_cast<int>(s.error_code()), s.error_message(), backoff.count());
        if (!Backoff(backoff)) return;
        continue;
      }
      backoff = cfg_.backoff_min;
      if (!resp.has_job()) continue;
      if (draining) {
        // Claimed as the drain began: hand it straight back rather than start work we must stop.
        SendFail(resp.job(), "the worker began draining before the job started", /*retryable=*/true, false, "",
                 /*interrupted=*/true);
        return;
      }
      StartJob(slot, resp.job());
    }
  }

  void StartJob(int slot, const v1::JobAssignment& job) {
    const int wanted = job.resources().gpus();
    std::optional<std::vector<int>> gpus;
    std::string no_gpus;
    {
      std::lock_guard lock(mu_);
      gpus = devices_.Acquire(wanted);
      if (!gpus) {
        no_gpus = Cat("the job needs ", wanted, " GPUs but this worker has ", devices_.free(), " free (of ",
                      devices_.total(), "); it is not run on fewer");
      }
    }
    if (!gpus) {
      // The scheduler claims within free_gpus, so this is a disagreement about the count, not a bad job:
      // it goes back to be retried where it fits.
      spdlog::error("worker {}: cannot start {}: {}", cfg_.name, job.name(), no_gpus);
      SendFail(job, Cat("worker could not start the job: ", no_gpus), /*retryable=*/true, false, "");
      return;
    }
    JobRunnerConfig rc;
    rc.train_binary = cfg_.train_binary;
    // A gang member's own: members of one gang may share a machine (and a work dir).
    rc.attempt_dir = Cat(cfg_.work_dir, "/", SanitizeComponent(job.job_id()), "-attempt-", job.attempt(),
                         job.nodes() > 1 && job.node_rank() > 0 ? Cat("-node-", job.node_rank()) : "");
    rc.threads = threads_;
    rc.gpus = CudaDeviceIds(*gpus, caps_.gpu_cuda_ids);
    // A CPU job's ranks share its slot (and its threads); a GPU job's are one per device.
    rc.ranks = std::max(1, job.resources().ranks());
    rc.dist_timeout = cfg_.dist_timeout;
    rc.stop_grace = cfg_.stop_grace;
    rc.verify_artifact = cfg_.verify_artifact;
    // A gang job: this worker is one member (node) of it; 0 (a scheduler that predates gangs) means 1.
    rc.nodes = std::max(1, job.nodes());
    rc.node_rank = job.node_rank();
    rc.advertise_host = cfg_.advertise_host;
    // A member waits for node 0's store, which node 0 starts only after checking a leftover output.
    if (rc.nodes > 1 && rc.node_rank > 0) rc.rendezvous_timeout = cfg_.gang_rendezvous_timeout;
    auto runner = std::make_shared<JobRunner>(job, rc, launcher_, clock_);
    std::string as;
    if (rc.nodes > 1) {
      as = Cat(" as ", GangPlace(rc.node_rank, rc.nodes, rc.ranks),
               job.rendezvous().empty() || rc.node_rank == 0 ? "" : Cat(", rendezvous ", job.rendezvous()));
    } else if (rc.ranks > 1) {
      as = Cat(" as ", rc.ranks, " ranks");
    }
    spdlog::info("worker {}: starting {} ({}) attempt {} of pipeline {} on {}{}", cfg_.name, job.name(), job.job_id(),
                 job.attempt(), job.pipeline_name(), rc.gpus.empty() ? "cpu" : Cat(rc.gpus.size(), " GPUs"), as);
    // From here the job is in heartbeats (its lease renewed) until its supervisor has reported it: the
    // start checks a leftover output, and the end verifies the new one, each as long as hashing it takes.
    std::lock_guard lock(mu_);
    running_[slot] = {runner, std::move(*gpus)};
    if (jobs_running_) jobs_running_->Set(static_cast<double>(running_.size()));
    const uint64_t id = next_supervisor_++;
    supervisors_.emplace(id, std::thread([this, slot, runner, id] { Supervise(slot, runner, id); }));
  }

  void ReleaseGpusLocked(const v1::JobAssignment& job, const std::vector<int>& gpus) {
    if (!devices_.Release(gpus)) {
      spdlog::error("worker {}: GPU bookkeeping error releasing the devices of {} attempt {}; they stay held",
                    cfg_.name, job.name(), job.attempt());
    }
  }

  // The life of one attempt, on its own thread: start (after checking a leftover output), wait for the
  // child, verify its output, then report. Heartbeats carry the job until the report begins.
  void Supervise(int slot, std::shared_ptr<JobRunner> runner, uint64_t id) {
    const auto& job = runner->job();
    Outcome o;
    bool child_ran = false;
    if (absl::Status s = runner->Start(); !s.ok()) {
      spdlog::error("worker {}: cannot start {}: {}", cfg_.name, job.name(), std::string(s.message()));
      o = runner->NotStarted(s);
    } else {
      child_ran = true;
      o = runner->Wait();
    }
    // This thread alone reports the attempt from now on: wait out any heartbeat that carries part of it
    // (log lines must reach the scheduler before the outcome closes the attempt).
    {
      std::unique_lock lock(mu_);
      Running& r = running_.at(slot);
      r.reporting = true;
      cv_.wait(lock, [&] { return r.heartbeats_in_flight == 0; });
    }
    // A lease lost meanwhile (LEASE_LOST, or not renewed in time) leaves nothing to report.
    if (runner->stop_reason() == StopReason::kLeaseLost && o.kind != Outcome::kLeaseLost) {
      o.kind = Outcome::kLeaseLost;
      o.error = "lease lost";
    }
    spdlog::info("worker {}: {} attempt {} ended: exit {}, {}", cfg_.name, job.name(), job.attempt(), o.exit_code,
                 o.kind == Outcome::kSucceeded    ? "succeeded"
                 : o.kind == Outcome::kMemberDone ? Cat("node ", job.node_rank(), "'s ranks are done (node 0 reports the job)")
                                                  : o.error);
    if (child_ran && o.kind == Outcome::kRetryable && child_failures_ && runner->stop_reason() == StopReason::kNone) {
      child_failures_->Inc();
    }
    if (o.kind != Outcome::kLeaseLost) {
      FlushLogs(*runner);
      if (o.kind == Outcome::kMemberDone) {
        // A gang member's part ended well: node 0 completes the job (or fails it), this member says nothing.
      } else if (o.kind == Outcome::kSucceeded) {
        SendComplete(*runner, o);
      } else {
        // Drained (btx-train stopped resumably, or never started): not the job's fault, so the retry
        // keeps its attempt budget. A crash or any other exit while draining still counts.
        const bool interrupted = o.kind == Outcome::kRetryable && runner->stop_reason() == StopReason::kDrain &&
                                 (!child_ran || o.exit_code == contract::kExitInterrupted);
        SendFail(job, o.error, o.kind != Outcome::kInvalidInput, o.kind == Outcome::kCancelled, o.checkpoint_uri,
                 interrupted);
      }
    }
    std::lock_guard lock(mu_);
    // The child has exited (Wait), so its GPUs are free for the next claim.
    if (auto it = running_.find(slot); it != running_.end()) {
      ReleaseGpusLocked(job, it->second.gpus);
      running_.erase(it);
    }
    if (jobs_running_) jobs_running_->Set(static_cast<double>(running_.size()));
    finished_supervisors_.push_back(id);  // joined by the acquire loop (or Run, at the end)
    cv_.notify_all();
  }

  // Calls `rpc` until it succeeds, is refused for good, the attempt can no longer be current, or Stop().
  template <typename Rpc>
  grpc::Status Deliver(const char* what, const v1::JobAssignment& job, Rpc rpc) {
    Duration backoff = cfg_.backoff_min;
    const TimePoint give_up = clock_.Now() + 2 * lease_;
    for (;;) {
      grpc::ClientContext ctx;
      AddAuth(ctx, cfg_.rpc_timeout);
      const grpc::Status s = rpc(ctx);
      if (s.ok() || !Retryable(s.error_code())) {
        if (!s.ok() && s.error_code() == grpc::StatusCode::FAILED_PRECONDITION && job.nodes() > 1 &&
            std::string_view(what) == "Fail") {
          // A gang's attempt ends for every member at the first Fail (or node 0's Complete): the others'
          // Fails then find it over, as expected.
          spdlog::info("worker {}: Fail of {} attempt {} (node {} of {}) not needed: {}", cfg_.name, job.name(),
                       job.attempt(), job.node_rank(), job.nodes(), s.error_message());
        } else if (!s.ok()) {
          spdlog::warn("worker {}: {} of {} attempt {} refused: {}", cfg_.name, what, job.name(), job.attempt(),
                       s.error_message());
        }
        return s;
      }
      {
        std::unique_lock lock(mu_);
        if (killing_ || clock_.Now() > give_up) {
          spdlog::error("worker {}: giving up on {} of {} attempt {}: {}", cfg_.name, what, job.name(), job.attempt(),
                        s.error_message());
          return s;
        }
        cv_.wait_for(lock, backoff, [&] { return killing_; });
      }
      backoff = std::min<Duration>(backoff * 2, cfg_.backoff_max);
    }
  }

  // The last log lines and progress go out before the outcome: once the attempt is closed the
  // scheduler refuses reports for it.
  void FlushLogs(JobRunner& runner) {
    for (int round = 0; round < 64; ++round) {
      v1::HeartbeatRequest req;
      req.set_worker_id(worker_id());
      *req.add_jobs() = runner.TakeReport(static_cast<size_t>(cfg_.max_log_lines_per_heartbeat));
      const bool more = req.jobs(0).logs_size() >= cfg_.max_log_lines_per_heartbeat;
      v1::HeartbeatResponse resp;
      const grpc::Status s = Deliver("final report", runner.job(), [&](grpc::ClientContext& ctx) {
        return stub_->Heartbeat(&ctx, req, &resp);
      });
      if (!s.ok() || !more) return;
    }
  }

  void SendComplete(JobRunner& runner, const Outcome& o) {
    v1::CompleteRequest req;
    req.set_worker_id(worker_id());
    req.set_job_id(runner.job().job_id());
    req.set_attempt(runner.job().attempt());
    req.set_artifact_uri(SanitizeUtf8(o.artifact_uri));
    req.set_result_json(SanitizeUtf8(o.result_json));
    v1::CompleteResponse resp;
    Deliver("Complete", runner.job(), [&](grpc::ClientContext& ctx) { return stub_->Complete(&ctx, req, &resp); });
  }

  void SendFail(const v1::JobAssignment& job, const std::string& error, bool retryable, bool cancelled,
                const std::string& checkpoint_uri, bool interrupted = false) {
    v1::FailRequest req;
    req.set_worker_id(worker_id());
    req.set_job_id(job.job_id());
    req.set_attempt(job.attempt());
    // Built from btx-train's stderr and from file names: a protobuf string field must be UTF-8, or the
    // whole call is refused.
    req.set_error(SanitizeUtf8(error));
    req.set_retryable(retryable);
    req.set_cancelled(cancelled);
    req.set_interrupted(interrupted);
    req.set_checkpoint_uri(SanitizeUtf8(checkpoint_uri));
    v1::FailResponse resp;
    Deliver("Fail", job, [&](grpc::ClientContext& ctx) { return stub_->Fail(&ctx, req, &resp); });
  }

  void HeartbeatLoop() {
    for (;;) {
      std::vector<std::shared_ptr<JobRunner>> live;
      std::vector<int> live_slots;
      v1::HeartbeatRequest req;
      {
        std::unique_lock lock(mu_);
        cv_.wait_for(lock, heartbeat_interval_, [&] { return heartbeat_done_; });
        if (heartbeat_done_) return;
        req.set_worker_id(worker_id_);
        req.set_draining(draining_);
        // Every job until its supervisor begins the final report: starting, running, or with its child
        // gone and its output being verified. Counted in flight, so that the report waits for this call.
        for (auto& [slot, r] : running_) {
          if (r.reporting || r.runner->stop_reason() == StopReason::kLeaseLost) continue;
          ++r.heartbeats_in_flight;
          live.push_back(r.runner);
          live_slots.push_back(slot);
        }
      }
      // Ends this heartbeat's hold on its jobs, whatever the path out of this iteration.
      struct Landed {
        Impl* self;
        const std::vector<int>& slots;
        ~Landed() {
          std::lock_guard lock(self->mu_);
          for (int slot : slots) {
            if (auto it = self->running_.find(slot); it != self->running_.end()) --it->second.heartbeats_in_flight;
          }
          self->cv_.notify_all();
        }
      } landed{this, live_slots};
      for (auto& r : live) *req.add_jobs() = r->TakeReport(static_cast<size_t>(cfg_.max_log_lines_per_heartbeat));
      v1::HeartbeatResponse resp;
      grpc::ClientContext ctx;
      AddAuth(ctx, cfg_.rpc_timeout);
      const grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
      if (s.ok()) {
        for (const auto& st : resp.jobs()) {
          for (auto& r : live) {
            if (r->job().job_id() != st.job_id() || r->job().attempt() != st.attempt()) continue;
            // A gang's store: to a member, where its ranks meet (ends its wait); to node 0, its report acknowledged.
            if (!st.rendezvous().empty()) r->SetRendezvous(st.rendezvous());
            if (st.directive() == v1::JOB_DIRECTIVE_CANCEL) {
              spdlog::info("worker {}: {} cancelled by the scheduler", cfg_.name, r->job().name());
              r->RequestStop(StopReason::kCancel);
            } else if (st.directive() == v1::JOB_DIRECTIVE_LEASE_LOST) {
              spdlog::warn("worker {}: lease of {} attempt {} lost; killing it", cfg_.name, r->job().name(),
                           r->job().attempt());
              r->RequestStop(StopReason::kLeaseLost);
            } else if (st.has_lease_deadline()) {
              r->set_lease_deadline(FromUnixMicros(TimeUtil::TimestampToMicroseconds(st.lease_deadline())));
            }
          }
        }
        continue;
      }
      if (hb_failures_) hb_failures_->Inc();
      spdlog::warn("worker {}: heartbeat failed: {}", cfg_.name, s.error_message());
      for (int i = 0; i < static_cast<int>(live.size()); ++i) {
        live[i]->ReturnReport(std::move(*req.mutable_jobs(i)));
        // Past its deadline the scheduler may already have handed the job to someone else.
        if (clock_.Now() >= live[i]->lease_deadline()) {
          spdlog::warn("worker {}: lease of {} expired without renewal; killing it", cfg_.name, live[i]->job().name());
          live[i]->RequestStop(StopReason::kLeaseLost);
        }
      }
    }
  }

  void GpuSampleLoop() {
    for (;;) {
      {
        std::unique_lock lock(mu_);
        cv_.wait_for(lock, cfg_.gpu_metrics_interval, [&] { return heartbeat_done_; });
        if (heartbeat_done_) return;
      }
      SampleGpuMemory();
    }
  }

  void SampleGpuMemory() {
    std::set<int> seen;
    for (const auto& s : gpu_reader_->Read()) {
      const std::vector<std::string> labels = {cfg_.name, std::to_string(s.gpu)};
      gpu_used_->WithLabels(labels).Set(static_cast<double>(s.used_bytes));
      gpu_total_->WithLabels(labels).Set(static_cast<double>(s.total_bytes));
      seen.insert(s.gpu);
    }
    // A GPU the driver stopped answering for loses its series instead of showing a frozen value.
    for (int gpu : gpu_series_) {
      if (seen.count(gpu)) continue;
      gpu_used_->Remove({cfg_.name, std::to_string(gpu)});
      gpu_total_->Remove({cfg_.name, std::to_string(gpu)});
    }
    gpu_series_ = std::move(seen);
  }

  WorkerConfig cfg_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  ProcessLauncher& launcher_;
  const Clock& clock_;
  Capabilities caps_;
  int slots_ = 1, threads_ = 1;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::string worker_id_;
  Duration heartbeat_interval_ = std::chrono::seconds(5), lease_ = std::chrono::seconds(30);
  struct Running {
    std::shared_ptr<JobRunner> runner;
    std::vector<int> gpus;  // indices into caps_, held in devices_ until the child has exited
    bool reporting = false;        // its supervisor sends the final report: heartbeats leave it out
    int heartbeats_in_flight = 0;  // heartbeats carrying a report of it that have not returned yet
  };
  std::map<int, Running> running_;  // by slot; an entry is erased only by its job's supervisor
  DeviceAllocator devices_;
  // One thread per job being supervised, joined once it has finished (JoinFinishedSupervisors).
  std::map<uint64_t, std::thread> supervisors_;
  std::vector<uint64_t> finished_supervisors_;
  uint64_t next_supervisor_ = 0;
  bool draining_ = false, killing_ = false, heartbeat_done_ = false, started_ = false, finished_ = false;
  grpc::ClientContext* acquire_ctx_ = nullptr;

  metrics::Gauge* jobs_running_ = nullptr;
  metrics::Counter* child_failures_ = nullptr;
  metrics::Counter* hb_failures_ = nullptr;
  std::unique_ptr<GpuMemoryReader> gpu_reader_;
  metrics::Family<metrics::Gauge>* gpu_used_ = nullptr;
  metrics::Family<metrics::Gauge>* gpu_total_ = nullptr;
  std::set<int> gpu_series_;  // GPUs with series, touched only by the constructor and then the sampler
};

Worker::Worker(WorkerConfig config, std::shared_ptr<grpc::Channel> channel, ProcessLauncher& launcher,
               const Clock& clock, metrics::Registry* registry)
    : impl_(std::make_unique<Impl>(std::move(config), std::move(channel), launcher, clock, registry)) {}

Worker::~Worker() {
  impl_->Shutdown(true);
  impl_->WaitFinished();
}

void Worker::Run() { impl_->Run(); }
void Worker::Drain() { impl_->Shutdown(false); }
void Worker::Stop() { impl_->Shutdown(true); }
std::string Worker::worker_id() const { return impl_->worker_id(); }
int Worker::running_jobs() const { return impl_->running_jobs(); }

}  // namespace btx::worker
