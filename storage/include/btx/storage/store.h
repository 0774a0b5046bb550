// Repositories over PostgreSQL: every state transition of pipelines, jobs and workers is one
// transaction here, so the scheduler holds no state of its own and can be killed at any time.
// Time always comes from the caller (an injectable clock), never from the database's now().
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/storage/notify.h"
#include "btx/storage/pool.h"
#include "btx/storage/records.h"
#include "btx/storage/retention.h"

namespace btx::storage {

struct PipelineFilter {
  std::string state{};        // empty = any
  std::string name_prefix{};
  int page_size = 50;
  std::string page_token{};   // opaque cursor from the previous page
  std::optional<std::string> owner{};  // only this owner's pipelines; none = everyone's
};

// What LargestWorker ranks workers by.
enum class WorkerResource { kGpus, kCpuThreads };

struct PipelinePage {
  std::vector<PipelineRecord> pipelines;
  std::string next_page_token;
};

struct ExpiredLease {
  std::string job_id, pipeline_id, name, kind;
  int attempt = 0;
  bool requeued = false;         // false: out of attempts (FAILED) or cancelled
  bool pipeline_failed = false;  // this expiry moved the pipeline to FAILED
};

// One claim: the leased job, none (nothing claimable was left for it), or FAILED_PRECONDITION when
// the worker is unknown or draining.
using ClaimOutcome = absl::StatusOr<std::optional<ClaimedJob>>;

// One job of a CompleteJobs batch, as CompleteJob takes it.
struct Completion {
  std::string worker_id{}, job_id{};
  int attempt = 0;
  std::string artifact_uri{}, result_json{};
};

struct CompletionOutcome {
  absl::Status status;  // as CompleteJob's
  int readied = 0;      // dependents that became READY
};

// What an idle worker's offer to gangs did: the gang it formed (if any), and this worker's own lease
// when it is a member.
struct GangOffer {
  std::string formed_job_id{};
  std::optional<ClaimedJob> mine{};
};

struct FailOutcome {
  std::string new_state;  // RETRY_WAIT, FAILED or CANCELLED
  bool pipeline_failed = false;  // this failure moved the pipeline to FAILED
  std::string pipeline_id, name, kind;
};

class Store {
 public:
  explicit Store(ConnectionPool& pool) : pool_(pool) {}

  // Creates the pipeline and its job DAG (roots READY). With an idempotency key that the same owner
  // already used for the same spec, returns that pipeline and created=false; for another spec,
  // ALREADY_EXISTS. Keys are scoped per owner: another owner's key is no match.
  absl::StatusOr<std::pair<PipelineRecord, bool>> CreatePipeline(const NewPipeline& p, TimePoint now);
  absl::StatusOr<PipelineRecord> GetPipeline(const std::string& id);
  absl::StatusOr<PipelinePage> ListPipelines(const PipelineFilter& filter);
  absl::StatusOr<PipelineRecord> CancelPipeline(const std::string& id, const std::string& reason, TimePoint now);
  absl::StatusOr<PipelineRecord> RetryPipeline(const std::string& id, TimePoint now);

  // `owner`: only jobs of that owner's pipelines; none = everyone's. Newest pipelines first, a pipeline's jobs
  // in plan order. `page_token`: a previous call's `next_page_token` (the last job's id), set when more follow.
  absl::StatusOr<std::vector<JobRecord>> ListJobs(const std::string& pipeline_id, const std::string& state, int limit,
                                                  const std::optional<std::string>& owner = std::nullopt,
                                                  const std::string& page_token = "", std::string* next_page_token = nullptr);
  absl::StatusOr<JobRecord> GetJob(const std::string& job_id);

  // Leases the first claimable job that fits free_gpus (FOR UPDATE SKIP LOCKED), bumping its attempt.
  ClaimOutcome ClaimJob(const std::string& worker_id, int free_gpus, Duration lease, TimePoint now);
  // ClaimJob for many workers in one transaction: entry i of the result answers worker_ids[i] (a
  // worker may appear more than once, once per free slot). Jobs go to entries in array order.
  absl::StatusOr<std::vector<ClaimOutcome>> ClaimJobs(const std::vector<std::string>& worker_ids, int free_gpus,
                                                      Duration lease, TimePoint now);
  // Gangs (docs/reliability.md "Gangs"). A member lease formed for this worker by another's offer, now
  // handed to it (none: nothing waiting, or its attempt ended meanwhile). Call before ClaimJobs: a
  // worker with a member lease to pick up gets nothing there.
  ClaimOutcome TakeMemberLease(const std::string& worker_id, TimePoint now);
  // The worker found no single-worker job: it offers itself to gangs until `offer_until` and, when the
  // head gang now has enough offers, forms it (all members leased at once, or none).
  absl::StatusOr<GangOffer> OfferToGangs(const std::string& worker_id, int free_gpus, TimePoint offer_until, Duration lease,
                                         TimePoint now);
  // Registered workers (any state, as LargestWorker) with at least `gpus` GPUs: how many, and the
  // first few names.
  absl::StatusOr<std::pair<int, std::vector<std::string>>> WorkersWithGpus(int gpus);
  // Fills members (LEASED) and pending_reason (READY, RETRY_WAIT) of the gang jobs among `jobs`.
  absl::Status DescribeGangs(std::vector<JobRecord>& jobs, TimePoint now);
  // Renews the leases and stores what the reports carry: the latest progress in place on the job, a
  // job.progress event at most once per `progress_event_every` per job (and for each new attempt's
  // first progress), the log lines in one statement per job, a line whose (attempt, seq) is stored
  // already (a re-sent heartbeat) not again.
  absl::StatusOr<std::vector<JobDirectiveRow>> Heartbeat(const std::string& worker_id,
                                                         const std::vector<JobReportRow>& reports, bool draining,
                                                         Duration lease, TimePoint now,
                                                         Duration progress_event_every = std::chrono::seconds(10));
  // FAILED_PRECONDITION when (job_id, attempt) is not the current lease of worker_id. `readied`
  // (optional) receives how many dependents became READY.
  absl::Status CompleteJob(const std::string& worker_id, const std::string& job_id, int attempt,
                           const std::string& artifact_uri, const std::string& result_json, TimePoint now,
                           int* readied = nullptr);
  // CompleteJob for many jobs in one transaction. An error status means nothing was applied (e.g. a
  // result PostgreSQL rejects, or a deadlock): the caller then completes the entries one by one.
  absl::StatusOr<std::vector<CompletionOutcome>> CompleteJobs(const std::vector<Completion>& completions, TimePoint now);
  // `interrupted`: the attempt stopped for a reason that is not the job's fault (its worker drained,
  // or handed back a job it had just claimed). A retryable interruption is requeued at once and
  // keeps the job's attempt budget: the next attempt still gets a new number (fencing), but
  // max_attempts grows by one with it. A crash, a non-zero exit or an expired lease still count.
  absl::StatusOr<FailOutcome> FailJob(const std::string& worker_id, const std::string& job_id, int attempt,
                                      const std::string& error, bool retryable, bool cancelled,
                                      const std::string& checkpoint_uri, const RetryPolicy& policy, TimePoint now,
                                      bool interrupted = false);
  // Requeues (or fails, when out of attempts) every lease that expired before `now`.
  absl::StatusOr<std::vector<ExpiredLease>> ReapExpiredLeases(const RetryPolicy& policy, TimePoint now);
  // Workers not seen for `timeout` become LOST.
  absl::StatusOr<int> MarkLostWorkers(Duration timeout, TimePoint now);

  absl::StatusOr<std::string> RegisterWorker(const std::string& name, const std::string& hostname,
                                             const std::string& capabilities_json, const std::string& version,
                                             TimePoint now);
  absl::StatusOr<std::vector<WorkerRecord>> ListWorkers();
  // The registered worker with the most GPUs (or CPU threads), in any state, or none when no worker
  // ever registered.
  absl::StatusOr<std::optional<WorkerSize>> LargestWorker(WorkerResource by = WorkerResource::kGpus);

  // `owner`: only events of that owner's pipelines; none = everyone's.
  absl::StatusOr<std::vector<EventRecord>> EventsAfter(const std::string& pipeline_id, int64_t after_id, int limit,
                                                       const std::optional<std::string>& owner = std::nullopt);
  absl::StatusOr<std::vector<LogRecord>> LogsAfter(const std::string& job_id, int64_t after_id, int limit);

  // One pass of the retention policy (retention.h) in bounded batches. One replica at a time: while
  // another one's pass runs, this returns skipped.
  absl::StatusOr<RetentionResult> ApplyRetention(const RetentionPolicy& policy, TimePoint now);

  // Counts for metrics: state -> count.
  absl::StatusOr<std::vector<std::tuple<std::string, std::string, int64_t>>> CountJobsByStateAndKind();
  absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> CountPipelinesByState();
  // Everything the metrics refresh needs, in one read-only transaction; `max_evals` bounds the
  // eval results returned (newest first).
  absl::StatusOr<FleetSnapshot> ReadFleetSnapshot(int max_evals, TimePoint now);

 private:
  ConnectionPool& pool_;
};

// Maps libpqxx exceptions to statuses: connection loss -> UNAVAILABLE, serialization -> ABORTED.
absl::Status StatusFromException(const std::exception& e, std::string_view what);

}  // namespace btx::storage
