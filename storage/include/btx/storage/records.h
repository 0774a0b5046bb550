// Plain rows as the repositories read and write them. Storage knows nothing of gRPC; the scheduler
// converts these to API messages.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "btx/common/clock.h"

namespace btx::storage {

// Fields without a default take `{}`, so that designated initializers may name only what they set
// (-Wmissing-field-initializers).

// States are stored as text so the database is readable by hand (and by Grafana's SQL panels).
namespace pipeline_state {
inline constexpr char kRunning[] = "RUNNING";
inline constexpr char kSucceeded[] = "SUCCEEDED";
inline constexpr char kFailed[] = "FAILED";
inline constexpr char kCancelled[] = "CANCELLED";
}  // namespace pipeline_state

namespace job_state {
inline constexpr char kPending[] = "PENDING";
inline constexpr char kReady[] = "READY";
inline constexpr char kLeased[] = "LEASED";
inline constexpr char kSucceeded[] = "SUCCEEDED";
inline constexpr char kRetryWait[] = "RETRY_WAIT";
inline constexpr char kFailed[] = "FAILED";
inline constexpr char kCancelled[] = "CANCELLED";
}  // namespace job_state

struct GangMemberRecord {
  int node_rank = 0;
  std::string worker_id, worker_name;
  TimePoint lease_deadline;
  bool delivered = false;
};

struct JobRecord {
  std::string id, pipeline_id, name, kind, state;
  int attempt = 0;
  int max_attempts = 1;
  std::vector<std::string> depends_on;  // parent job names
  std::string worker_id;
  std::optional<TimePoint> lease_deadline, ready_at, started_at, finished_at;
  TimePoint created_at;
  std::string progress_json = "{}";
  std::string checkpoint_uri, artifact_uri, error;
  std::string spec_json = "{}";
  std::string result_json;  // empty when none
  int gpus = 0;
  int ranks = 1;  // btx-train processes of the job's rank group (a GPU job: one per GPU)
  bool cancel_requested = false;
  int nodes = 1;  // workers the job spans (a gang), each running `gpus` GPUs and `ranks` ranks
  std::string rendezvous;  // a gang's current attempt: node 0's store, once reported
  // Filled by Store::DescribeGangs only: the current attempt's members (LEASED), or why it waits.
  std::vector<GangMemberRecord> members{};
  std::string pending_reason{};
};


struct PipelineRecord {
  std::string id, name, state, spec_json, idempotency_key, error, result_json;
  std::string owner;  // who submitted it; '' without authentication
  bool cancel_requested = false;
  TimePoint created_at, updated_at;
  int jobs_total = 0, jobs_succeeded = 0;
  std::vector<JobRecord> jobs;  // filled by GetPipeline only
};

struct WorkerRecord {
  std::string id, name, hostname, capabilities_json, version, state;
  TimePoint registered_at, last_seen;
  std::vector<std::string> running_job_ids;
};

// What Submit needs to know of the fleet: can any worker ever run a job of this size?
struct WorkerSize {
  std::string name;
  int gpus = 0;
  int cpu_threads = 0;  // the most CPU ranks its jobs may have (docs/architecture.md, "Resources")
};

struct EventRecord {
  int64_t id = 0;
  std::string pipeline_id, job_id, job_name, type, payload_json;
  TimePoint created_at;
};

struct LogRecord {
  int64_t id = 0;
  int attempt = 0;
  std::string stream, line;
  TimePoint created_at;
  // The worker's number for the line (1, 2, ... per attempt): a re-sent line is stored once. 0: not
  // deduplicated (a worker's "lines dropped" notice).
  int64_t seq = 0;
};

struct NewJob {
  std::string name{}, kind{};
  std::string spec_json = "{}";
  std::vector<std::string> depends_on{};  // names of jobs in the same pipeline
  int max_attempts = 3;
  int gpus = 0;
  int ranks = 1;     // a GPU job's ranks equal its gpus; a CPU job's are CPU ranks
  int priority = 0;  // lower first
  int nodes = 1;     // workers it spans (a gang); gpus and ranks are per worker
};

struct NewPipeline {
  std::string name{};
  std::string spec_json{};
  std::string idempotency_key{};  // empty = none; scoped per owner
  std::string owner{};            // the submitting principal's name; '' without authentication
  std::vector<NewJob> jobs{};     // a DAG: every depends_on names an earlier-or-later job of this list
};

// Why a claim that leased nothing still has something for the worker to do (gangs).
enum class ClaimNote {
  kNone,                // `job` is a lease
  kMemberLeaseWaiting,  // no lease: a gang formed with this worker as a member (Store::TakeMemberLease)
  kGangWaiting,         // no lease: a gang this worker could serve waits for workers (Store::OfferToGangs)
};

// A lease handed to a worker, with what the scheduler needs to resolve the job's arguments; or, with a
// note other than kNone, no lease (job empty) but a gang's business.
struct ClaimedJob {
  JobRecord job{};
  std::string pipeline_name{};
  std::map<std::string, std::string> parent_artifacts{};  // parent name -> artifact URI
  int node_rank = 0;  // a gang job: which member this worker is
  ClaimNote note = ClaimNote::kNone;
};

struct JobReportRow {
  std::string job_id{};
  int attempt = 0;
  std::string progress_json{};  // empty: no progress in this report
  int64_t step = -1;
  double loss = 0, tokens_per_second = 0, learning_rate = 0;
  std::string checkpoint_uri{};
  std::vector<LogRecord> logs{};
  std::string rendezvous{};  // node 0 of a gang: its store's host:port
};

enum class Directive { kContinue, kCancel, kLeaseLost };

struct JobDirectiveRow {
  std::string job_id;
  int attempt = 0;
  Directive directive = Directive::kContinue;
  std::optional<TimePoint> lease_deadline;
  // Set unless the job is unknown: lets the scheduler label per-job metrics without another query.
  std::string pipeline_id{}, name{}, kind{};
  std::string rendezvous{};  // a gang's store, once node 0 reported it
};

// A LEASED job as the metrics refresh sees it.
struct LeasedJobRow {
  std::string job_id, pipeline_id, name, kind;
  std::string progress_json = "{}";  // latest progress reported by any attempt
  std::optional<TimePoint> lease_deadline;
};

// The result of a finished eval job, for routing metrics.
struct EvalResultRow {
  std::string pipeline_id;
  std::string main_model;  // the first model of the eval spec: the pipeline's MoE
  std::string result_json;
};

// Fleet-wide state read in one transaction, so every replica reports the same numbers.
struct FleetSnapshot {
  std::vector<std::tuple<std::string, std::string, int64_t>> jobs;  // state, kind, count
  std::vector<std::pair<std::string, int64_t>> pipelines;          // state, count
  int64_t workers_connected = 0;                                   // ACTIVE or DRAINING
  std::vector<LeasedJobRow> leased;
  std::vector<EvalResultRow> evals;  // newest first
  // Gangs: jobs waiting to be formed (nodes needed), the members of the leased ones, idle workers offered.
  struct GangRow {
    std::string pipeline_id, job_id, name;
    int nodes = 0;          // waiting: workers needed at once
    int node_rank = 0;      // member
    std::string worker;     // member: the worker's name
  };
  std::vector<GangRow> gangs_waiting, gang_members;
  int64_t workers_offering = 0;
};

struct RetryPolicy {
  Duration base = std::chrono::seconds(5);
  Duration max = std::chrono::minutes(5);
  // Backoff before attempt `failed_attempt + 1`: base * 2^(failed_attempt-1), capped.
  Duration BackoffAfter(int failed_attempt) const;
};

}  // namespace btx::storage
