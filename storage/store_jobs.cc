// The job lease protocol: claim, heartbeat, complete, fail, reap. Every call that names an attempt
// is fenced: it changes nothing unless (job_id, attempt, worker) is the current lease.
#include <nlohmann/json.hpp>

#include "btx/common/strings.h"
#include "store_internal.h"

namespace btx::storage {
using namespace internal;
using json = nlohmann::json;

namespace {

struct LeaseRow {
  std::string pipeline_id, name, state, worker_id;
  int attempt = 0, max_attempts = 0;
  bool cancel_requested = false;
};

absl::StatusOr<LeaseRow> LockJob(pqxx::work& tx, const std::string& job_id) {
  auto r = tx.exec_params(
      "SELECT pipeline_id, name, state, coalesce(worker_id::text, ''), attempt, max_attempts, cancel_requested "
      "FROM jobs WHERE id::text = $1 FOR UPDATE",
      job_id);
  if (r.empty()) return absl::NotFoundError(Cat("job '", job_id, "' not found"));
  return LeaseRow{r[0][0].as<std::string>(), r[0][1].as<std::string>(), r[0][2].as<std::string>(),
                  r[0][3].as<std::string>(), r[0][4].as<int>(), r[0][5].as<int>(), r[0][6].as<bool>()};
}

absl::Status CheckFence(const LeaseRow& row, const std::string& job_id, int attempt, const std::string& worker_id) {
  if (row.state == job_state::kLeased && row.attempt == attempt && row.worker_id == worker_id) return absl::OkStatus();
  return absl::FailedPreconditionError(Cat(
      "stale attempt: job ", job_id, " attempt ", attempt, " is not the current lease of this worker (job is ",
      row.state, " at attempt ", row.attempt, ")"));
}

void FinishAttempt(pqxx::work& tx, const std::string& job_id, int attempt, const std::string& outcome,
                   const std::string& error, TimePoint now) {
  tx.exec_params("UPDATE job_attempts SET outcome = $3, error = $4, finished_at = " + Ts(5) +
                     " WHERE job_id::text = $1 AND attempt = $2",
                 job_id, attempt, outcome, error, Micros(now));
}

}  // namespace

absl::StatusOr<std::optional<ClaimedJob>> Store::ClaimJob(const std::string& worker_id, int free_gpus, Duration lease,
                                                          TimePoint now) {
  return InTx<std::optional<ClaimedJob>>(
      pool_, "claim job", [&](pqxx::work& tx) -> absl::StatusOr<std::optional<ClaimedJob>> {
        auto w = tx.exec_params("UPDATE workers SET last_seen = " + Ts(2) +
                                    " WHERE id::text = $1 AND state <> 'DRAINING' RETURNING id",
                                worker_id, Micros(now));
        if (w.empty()) {
          return absl::FailedPreconditionError(Cat(
              "worker '", worker_id, "' is unknown or draining; register again before acquiring jobs"));
        }
        auto claimed = tx.exec_params(
            "WITH c AS (SELECT id FROM jobs WHERE state IN ('READY', 'RETRY_WAIT') AND ready_at <= " + Ts(3) +
                " AND gpus <= $2 ORDER BY priority, created_at LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "UPDATE jobs j SET state = 'LEASED', attempt = j.attempt + 1, worker_id = $1::uuid, lease_deadline = " +
                Ts(4) + ", started_at = coalesce(j.started_at, " + Ts(3) +
                "), error = '' FROM c WHERE j.id = c.id RETURNING j.id, j.pipeline_id, j.attempt",
            worker_id, free_gpus, Micros(now), Micros(now + lease));
        if (claimed.empty()) return std::optional<ClaimedJob>();
        const std::string job_id = claimed[0][0].as<std::string>();
        const std::string pipeline_id = claimed[0][1].as<std::string>();
        const int attempt = claimed[0][2].as<int>();
        tx.exec_params("INSERT INTO job_attempts (job_id, attempt, worker_id, started_at) VALUES ($1, $2, $3::uuid, " +
                           Ts(4) + ")",
                       job_id, attempt, worker_id, Micros(now));
        AddEvent(tx, pipeline_id, job_id, "job.leased",
                 json{{"state", "LEASED"}, {"attempt", attempt}, {"worker_id", worker_id}}.dump(), now);
        ClaimedJob out;
        out.job = JobFromRow(tx.exec_params("SELECT " + kJobColumns + " FROM jobs j WHERE j.id = $1", job_id)[0]);
        out.pipeline_name = tx.exec_params("SELECT name FROM pipelines WHERE id = $1", pipeline_id)[0][0].as<std::string>();
        for (const auto& r : tx.exec_params("SELECT p.name, p.artifact_uri FROM job_deps d JOIN jobs p ON p.id = d.depends_on "
                                            "WHERE d.job_id = $1",
                                            job_id)) {
          out.parent_artifacts[r[0].as<std::string>()] = r[1].as<std::string>();
        }
        return std::optional<ClaimedJob>(std::move(out));
      });
}

absl::StatusOr<std::vector<JobDirectiveRow>> Store::Heartbeat(const std::string& worker_id,
                                                              const std::vector<JobReportRow>& reports, bool draining,
                                                              Duration lease, TimePoint now) {
  return InTx<std::vector<JobDirectiveRow>>(
      pool_, "heartbeat", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<JobDirectiveRow>> {
        auto w = tx.exec_params("UPDATE workers SET last_seen = " + Ts(2) + ", state = $3 WHERE id::text = $1 RETURNING id",
                                worker_id, Micros(now), std::string(draining ? "DRAINING" : "ACTIVE"));
        if (w.empty()) return absl::NotFoundError(Cat("worker '", worker_id, "' is unknown; register again"));
        std::vector<JobDirectiveRow> out;
        for (const auto& rep : reports) {
          JobDirectiveRow d{rep.job_id, rep.attempt, Directive::kLeaseLost, std::nullopt};
          auto row = LockJob(tx, rep.job_id);
          if (!row.ok() || !CheckFence(*row, rep.job_id, rep.attempt, worker_id).ok()) {
            out.push_back(d);
            continue;
          }
          const TimePoint deadline = now + lease;
          tx.exec_params("UPDATE jobs SET lease_deadline = " + Ts(2) +
                             ", progress = CASE WHEN $3 = '' THEN progress ELSE $3::jsonb END, "
                             "checkpoint_uri = CASE WHEN $4 = '' THEN checkpoint_uri ELSE $4 END WHERE id::text = $1",
                         rep.job_id, Micros(deadline), rep.progress_json, rep.checkpoint_uri);
          if (rep.step >= 0) {
            tx.exec_params("INSERT INTO job_metrics (job_id, attempt, step, loss, tokens_per_second, learning_rate, created_at) "
                           "VALUES ($1::uuid, $2, $3, $4, $5, $6, " + Ts(7) + ") ON CONFLICT DO NOTHING",
                           rep.job_id, rep.attempt, rep.step, rep.loss, rep.tokens_per_second, rep.learning_rate,
                           Micros(now));
          }
          if (!rep.progress_json.empty()) {
            AddEvent(tx, row->pipeline_id, rep.job_id, "job.progress",
                     json{{"state", "LEASED"}, {"attempt", rep.attempt}, {"progress", json::parse(rep.progress_json, nullptr, false)}}
                         .dump(),
                     now);
          }
          if (!rep.checkpoint_uri.empty()) {
            AddEvent(tx, row->pipeline_id, rep.job_id, "job.checkpoint",
                     json{{"state", "LEASED"}, {"attempt", rep.attempt}, {"message", rep.checkpoint_uri}}.dump(), now);
          }
          for (const auto& l : rep.logs) {
            tx.exec_params("INSERT INTO job_logs (job_id, attempt, stream, line, created_at) VALUES ($1::uuid, $2, $3, $4, " +
                               Ts(5) + ")",
                           rep.job_id, rep.attempt, l.stream, l.line, Micros(l.created_at));
          }
          d.directive = row->cancel_requested ? Directive::kCancel : Directive::kContinue;
          d.lease_deadline = deadline;
          out.push_back(d);
        }
        return out;
      });
}

absl::Status Store::CompleteJob(const std::string& worker_id, const std::string& job_id, int attempt,
                                const std::string& artifact_uri, const std::string& result_json, TimePoint now) {
  return InTx<bool>(pool_, "complete job", [&](pqxx::work& tx) -> absl::StatusOr<bool> {
           auto row = LockJob(tx, job_id);
           if (!row.ok()) return row.status();
           if (auto s = CheckFence(*row, job_id, attempt, worker_id); !s.ok()) return s;
           const std::string result = result_json.empty() ? "" : result_json;
           tx.exec_params("UPDATE jobs SET state = 'SUCCEEDED', artifact_uri = $2, result = NULLIF($3, '')::jsonb, "
                          "lease_deadline = NULL, finished_at = " + Ts(4) + " WHERE id::text = $1",
                          job_id, artifact_uri, result, Micros(now));
           FinishAttempt(tx, job_id, attempt, "SUCCEEDED", "", now);
           if (!result.empty()) {
             tx.exec_params("UPDATE pipelines SET result = coalesce(result, '{}'::jsonb) || jsonb_build_object($2::text, $3::jsonb) "
                            "WHERE id = $1",
                            row->pipeline_id, row->name, result);
           }
           AddEvent(tx, row->pipeline_id, job_id, "job.succeeded",
                    json{{"state", "SUCCEEDED"}, {"attempt", attempt}, {"message", artifact_uri}}.dump(), now);
           AfterJobSucceeded(tx, job_id, row->pipeline_id, now);
           return true;
         }).status();
}

absl::StatusOr<FailOutcome> Store::FailJob(const std::string& worker_id, const std::string& job_id, int attempt,
                                           const std::string& error, bool retryable, bool cancelled,
                                           const std::string& checkpoint_uri, const RetryPolicy& policy, TimePoint now) {
  return InTx<FailOutcome>(pool_, "fail job", [&](pqxx::work& tx) -> absl::StatusOr<FailOutcome> {
    auto row = LockJob(tx, job_id);
    if (!row.ok()) return row.status();
    if (auto s = CheckFence(*row, job_id, attempt, worker_id); !s.ok()) return s;
    FailOutcome out;
    if (cancelled || row->cancel_requested) {
      out.new_state = job_state::kCancelled;
    } else if (retryable && row->attempt < row->max_attempts) {
      out.new_state = job_state::kRetryWait;
    } else {
      out.new_state = job_state::kFailed;
    }
    const TimePoint ready_at = now + policy.BackoffAfter(row->attempt);
    tx.exec_params("UPDATE jobs SET state = $2, error = $3, lease_deadline = NULL, "
                   "checkpoint_uri = CASE WHEN $4 = '' THEN checkpoint_uri ELSE $4 END, "
                   "ready_at = CASE WHEN $2 = 'RETRY_WAIT' THEN " + Ts(5) + " ELSE ready_at END, "
                   "finished_at = CASE WHEN $2 = 'RETRY_WAIT' THEN NULL ELSE " + Ts(6) + " END WHERE id::text = $1",
                   job_id, out.new_state, error, checkpoint_uri, Micros(ready_at), Micros(now));
    FinishAttempt(tx, job_id, attempt, cancelled ? "CANCELLED" : "FAILED", error, now);
    json payload = {{"state", out.new_state}, {"attempt", attempt}, {"message", error}};
    AddEvent(tx, row->pipeline_id, job_id, out.new_state == job_state::kRetryWait ? "job.retry_wait"
                                           : out.new_state == job_state::kCancelled ? "job.cancelled"
                                                                                    : "job.failed",
             payload.dump(), now);
    if (out.new_state == job_state::kFailed) {
      FailPipeline(tx, row->pipeline_id, Cat("job ", row->name, " failed: ", error), now);
      out.pipeline_failed = true;
    }
    return out;
  });
}

absl::StatusOr<std::vector<ExpiredLease>> Store::ReapExpiredLeases(const RetryPolicy& policy, TimePoint now) {
  (void)policy;  // an expired lease is requeued at once: the attempt's checkpoint makes the retry cheap
  return InTx<std::vector<ExpiredLease>>(pool_, "reap leases", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<ExpiredLease>> {
    std::vector<ExpiredLease> out;
    auto rows = tx.exec_params(
        "SELECT id, pipeline_id, name, kind, attempt, max_attempts, cancel_requested FROM jobs "
        "WHERE state = 'LEASED' AND lease_deadline < " + Ts(1) + " FOR UPDATE SKIP LOCKED",
        Micros(now));
    bool requeued_any = false;
    for (const auto& r : rows) {
      ExpiredLease e{r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>(), r[3].as<std::string>(),
                     r[4].as<int>(), false};
      const bool cancel = r[6].as<bool>();
      std::string state = cancel ? job_state::kCancelled
                                 : (e.attempt < r[5].as<int>() ? job_state::kReady : job_state::kFailed);
      e.requeued = state == job_state::kReady;
      requeued_any |= e.requeued;
      const std::string error = Cat("lease of attempt ", e.attempt, " expired (worker stopped heartbeating)");
      tx.exec_params("UPDATE jobs SET state = $2, lease_deadline = NULL, error = $3, ready_at = " + Ts(4) +
                         ", finished_at = CASE WHEN $2 = 'READY' THEN NULL ELSE " + Ts(4) + " END WHERE id = $1",
                     e.job_id, state, error, Micros(now));
      FinishAttempt(tx, e.job_id, e.attempt, "LEASE_EXPIRED", error, now);
      AddEvent(tx, e.pipeline_id, e.job_id, "job.lease_expired",
               json{{"state", state}, {"attempt", e.attempt}, {"message", error}}.dump(), now);
      if (state == job_state::kFailed) FailPipeline(tx, e.pipeline_id, Cat("job ", e.name, ": ", error), now);
      out.push_back(std::move(e));
    }
    if (requeued_any) Notify(tx, kJobsChannel);
    return out;
  });
}

}  // namespace btx::storage
