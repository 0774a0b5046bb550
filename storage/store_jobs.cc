// The job lease protocol: claim, heartbeat, complete, fail, reap. Every call that names an attempt
// is fenced: it changes nothing unless (job_id, attempt, worker) is the current lease.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "absl/strings/str_join.h"

#include "btx/common/strings.h"
#include "store_internal.h"

namespace btx::storage {
using namespace internal;
using json = nlohmann::json;

namespace {

struct LeaseRow {
  std::string pipeline_id, name, kind, state, worker_id;
  int attempt = 0, max_attempts = 0;
  bool cancel_requested = false;
  int nodes = 1;
  // When, and for which attempt, the job's last job.progress event was written (none yet: nullopt).
  std::optional<TimePoint> progress_event_at{};
  std::optional<int> progress_event_attempt{};
};

absl::StatusOr<LeaseRow> LockJob(pqxx::work& tx, const std::string& job_id) {
  auto r = tx.exec_params(
      "SELECT pipeline_id, name, kind, state, coalesce(worker_id::text, ''), attempt, max_attempts, cancel_requested, " +
          Us("progress_event_at") + ", progress_event_attempt, nodes FROM jobs WHERE id = $1::uuid FOR UPDATE",
      UuidParam(job_id));
  if (r.empty()) return absl::NotFoundError(Cat("job '", job_id, "' not found"));
  LeaseRow row{r[0][0].as<std::string>(), r[0][1].as<std::string>(), r[0][2].as<std::string>(),
               r[0][3].as<std::string>(), r[0][4].as<std::string>(), r[0][5].as<int>(), r[0][6].as<int>(),
               r[0][7].as<bool>()};
  row.progress_event_at = OptTime(r[0][8]);
  if (!r[0][9].is_null()) row.progress_event_attempt = r[0][9].as<int>();
  row.nodes = r[0][10].as<int>();
  return row;
}

// A chatty trainer reports progress with every heartbeat; followers need it every few seconds, not
// every report. The first progress of an attempt always gets its event (a follower sees the retry
// start); a clock that went back (a re-synced database clock) counts as due.
bool ProgressEventDue(const LeaseRow& row, int attempt, Duration every, TimePoint now) {
  if (!row.progress_event_at || row.progress_event_attempt != attempt) return true;
  return now - *row.progress_event_at >= every || now < *row.progress_event_at;
}

// A heartbeat's log lines for one job in one statement; a line whose (attempt, seq) is stored
// already is skipped by the unique index job_logs_attempt_seq (migration 0007). Ids follow the
// lines' order. `seq_offset` moves a gang member's numbered lines into a range of its own (its worker
// numbers them from 1 like every other member's).
void InsertLogLines(pqxx::work& tx, const std::string& job_id, int attempt, const std::vector<LogRecord>& logs,
                    int64_t seq_offset = 0) {
  if (logs.empty()) return;
  static const std::string kSql =
      "INSERT INTO job_logs (job_id, attempt, seq, stream, line, created_at) "
      "SELECT $1::uuid, $2::int, u.seq, u.stream, u.line, timestamptz 'epoch' + u.us * interval '1 microsecond' "
      "FROM unnest($3::int8[], $4::text[], $5::text[], $6::int8[]) WITH ORDINALITY AS u(seq, stream, line, us, n) "
      "ORDER BY u.n ON CONFLICT DO NOTHING";
  // PostgreSQL text cannot hold NUL, and one inside the array literal would cut it short and fail the
  // whole heartbeat: a NUL from a client becomes a blank, as the worker does with control characters.
  auto text = [](std::string s) {
    std::replace(s.begin(), s.end(), '\0', ' ');
    return s;
  };
  std::vector<std::string> seqs, streams, lines, micros;
  for (const auto& l : logs) {
    seqs.push_back(std::to_string(l.seq > 0 ? l.seq + seq_offset : 0));
    streams.push_back(text(l.stream));
    lines.push_back(text(l.line));
    micros.push_back(std::to_string(Micros(l.created_at)));
  }
  ExecPrepared(tx, "btx_insert_logs", kSql, UuidParam(job_id), attempt, ArrayLiteral(seqs), ArrayLiteral(streams),
               ArrayLiteral(lines), ArrayLiteral(micros));
}

absl::Status CheckFence(const LeaseRow& row, const std::string& job_id, int attempt, const std::string& worker_id) {
  if (row.state == job_state::kLeased && row.attempt == attempt && row.worker_id == worker_id) return absl::OkStatus();
  return absl::FailedPreconditionError(Cat(
      "stale attempt: job ", job_id, " attempt ", attempt, " is not the current lease of this worker (job is ",
      row.state, " at attempt ", row.attempt, ")"));
}

// The fence of a call about (job, attempt) from worker_id, a gang's members included: its node rank
// (0 for a single-worker job), or FAILED_PRECONDITION as CheckFence's.
absl::StatusOr<int> MemberFence(pqxx::work& tx, const LeaseRow& row, const std::string& job_id, int attempt,
                                const std::string& worker_id) {
  if (row.nodes <= 1 || row.state != job_state::kLeased || row.attempt != attempt) {
    if (auto s = CheckFence(row, job_id, attempt, worker_id); !s.ok()) return s;
    return 0;
  }
  auto r = tx.exec_params("SELECT node_rank FROM job_members WHERE job_id = $1::uuid AND attempt = $2 AND worker_id = $3::uuid",
                          UuidParam(job_id), attempt, UuidParam(worker_id));
  if (r.empty()) {
    return absl::FailedPreconditionError(Cat("stale attempt: job ", job_id, " attempt ", attempt,
                                             " has no member on this worker (the gang's members are other workers)"));
  }
  return r[0][0].as<int>();
}

void FinishAttempt(pqxx::work& tx, const std::string& job_id, int attempt, const std::string& outcome,
                   const std::string& error, TimePoint now) {
  tx.exec_params("UPDATE job_attempts SET outcome = $3, error = $4, finished_at = " + Ts(5) +
                     " WHERE job_id = $1::uuid AND attempt = $2",
                 UuidParam(job_id), attempt, outcome, error, Micros(now));
}

// A row of btx_complete_job(s): (slot, outcome, job_state, job_attempt, readied).
CompletionOutcome CompletionFromRow(const pqxx::row& r, const Completion& c) {
  CompletionOutcome out;
  const std::string outcome = r[1].as<std::string>();
  if (outcome == "not_found") {
    out.status = absl::NotFoundError(Cat("job '", c.job_id, "' not found"));
  } else if (outcome == "stale") {
    LeaseRow row;
    row.state = r[2].as<std::string>();
    row.attempt = r[3].as<int>();
    out.status = CheckFence(row, c.job_id, c.attempt, c.worker_id);
  } else {
    out.readied = r[4].as<int>();
  }
  return out;
}

}  // namespace

ClaimOutcome Store::ClaimJob(const std::string& worker_id, int free_gpus, Duration lease, TimePoint now) {
  auto out = ClaimJobs({worker_id}, free_gpus, lease, now);
  if (!out.ok()) return out.status();
  return std::move(out->at(0));
}

absl::StatusOr<std::vector<ClaimOutcome>> Store::ClaimJobs(const std::vector<std::string>& worker_ids, int free_gpus,
                                                           Duration lease, TimePoint now) {
  // The hot path: one prepared statement (btx_claim_jobs, migration 0003) in autocommit.
  static const std::string kSql = "SELECT c.o_slot, c.o_refused, (c.o_job).id IS NOT NULL, " + kJobColumnsWithoutDeps +
                                  ", c.o_depends_on, c.o_pipeline_name, c.o_parents, c.o_note FROM btx_claim_jobs($1::uuid[], $2, " +
                                  Ts(3) + ", " + Ts(4) + ") c LEFT JOIN LATERAL (SELECT (c.o_job).*) j ON true ORDER BY c.o_slot";
  std::vector<std::string> ids;
  for (const auto& w : worker_ids) ids.push_back(UuidParam(w));
  return InAutocommit<std::vector<ClaimOutcome>>(
      pool_, "claim jobs", [&](pqxx::nontransaction& tx) -> absl::StatusOr<std::vector<ClaimOutcome>> {
        auto r = ExecPrepared(tx, "btx_claim_jobs", kSql, ArrayLiteral(ids), free_gpus, Micros(now), Micros(now + lease));
        if (r.size() != worker_ids.size()) {
          return absl::InternalError(Cat("claim jobs: ", r.size(), " rows for ", worker_ids.size(), " workers"));
        }
        std::vector<ClaimOutcome> out(worker_ids.size(), std::optional<ClaimedJob>());  // a default StatusOr is an error
        for (size_t i = 0; i < r.size(); ++i) {
          const pqxx::row row = r[i];
          if (row[1].as<bool>()) {
            out[i] = absl::FailedPreconditionError(
                Cat("worker '", worker_ids[i], "' is unknown or draining; register again before acquiring jobs"));
            continue;
          }
          if (!row[2].as<bool>()) {
            // No job: perhaps a gang's business for this worker (ClaimedJob::note).
            const std::string note = row[3 + kJobColumnCount + 3].as<std::string>();
            if (note == "members") out[i] = std::optional<ClaimedJob>(ClaimedJob{.note = ClaimNote::kMemberLeaseWaiting});
            if (note == "gang") out[i] = std::optional<ClaimedJob>(ClaimedJob{.note = ClaimNote::kGangWaiting});
            continue;
          }
          // The job's columns start at 3, in kJobColumnsWithoutDeps' order, then the three extras.
          ClaimedJob c;
          c.job = JobFromRow(row.slice(3, row.size()));
          c.pipeline_name = row[3 + kJobColumnCount + 1].as<std::string>();
          const json parents = json::parse(row[3 + kJobColumnCount + 2].as<std::string>(), nullptr, false);
          if (parents.is_object()) {
            for (const auto& [name, uri] : parents.items()) c.parent_artifacts[name] = uri.is_string() ? uri.get<std::string>() : "";
          }
          out[i] = std::optional<ClaimedJob>(std::move(c));
        }
        return out;
      });
}

absl::StatusOr<std::vector<JobDirectiveRow>> Store::Heartbeat(const std::string& worker_id,
                                                              const std::vector<JobReportRow>& reports, bool draining,
                                                              Duration lease, TimePoint now, Duration progress_event_every) {
  return InTx<std::vector<JobDirectiveRow>>(
      pool_, "heartbeat", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<JobDirectiveRow>> {
        auto w = tx.exec_params("UPDATE workers SET last_seen = " + Ts(2) + ", state = $3 WHERE id = $1::uuid RETURNING id",
                                UuidParam(worker_id), Micros(now), std::string(draining ? "DRAINING" : "ACTIVE"));
        if (w.empty()) return absl::NotFoundError(Cat("worker '", worker_id, "' is unknown; register again"));
        // Rows are locked in id order so that two heartbeats naming the same jobs cannot deadlock.
        std::vector<size_t> order(reports.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return reports[a].job_id < reports[b].job_id; });
        std::vector<JobDirectiveRow> out(reports.size());
        for (size_t i : order) {
          const auto& rep = reports[i];
          JobDirectiveRow& d = out[i];
          d = JobDirectiveRow{rep.job_id, rep.attempt, Directive::kLeaseLost, std::nullopt};
          auto row = LockJob(tx, rep.job_id);
          if (!row.ok()) continue;
          d.pipeline_id = row->pipeline_id;
          d.name = row->name;
          d.kind = row->kind;
          auto node = MemberFence(tx, *row, rep.job_id, rep.attempt, worker_id);
          if (!node.ok()) continue;
          const TimePoint deadline = now + lease;
          if (row->nodes > 1) {
            // A gang: this member's lease, the job's the earliest of its members' (what the reaper reads).
            // Progress and checkpoints are node 0's; a member's log lines are numbered by its own worker, so
            // each member gets a range of seq of its own (the dedup key).
            tx.exec_params("UPDATE job_members SET lease_deadline = " + Ts(3) + " WHERE job_id = $1::uuid AND attempt = $2 "
                           "AND node_rank = $4", rep.job_id, rep.attempt, Micros(deadline), *node);
            auto g = tx.exec_params(
                "UPDATE jobs SET lease_deadline = (SELECT min(lease_deadline) FROM job_members WHERE job_id = $1::uuid "
                "AND attempt = $2), rendezvous = CASE WHEN $3 AND $4 <> '' THEN $4 ELSE rendezvous END WHERE id = $1::uuid "
                "RETURNING rendezvous, " + Us("lease_deadline"),
                rep.job_id, rep.attempt, *node == 0, rep.rendezvous);
            d.rendezvous = g[0][0].as<std::string>();
            InsertLogLines(tx, rep.job_id, rep.attempt, rep.logs, static_cast<int64_t>(*node) << 40);  // node k: k * 2^40 + seq
            d.directive = row->cancel_requested ? Directive::kCancel : Directive::kContinue;
            d.lease_deadline = deadline;
            if (*node != 0) continue;
          }
          const bool progress_event =
              !rep.progress_json.empty() && ProgressEventDue(*row, rep.attempt, progress_event_every, now);
          tx.exec_params("UPDATE jobs SET lease_deadline = CASE WHEN nodes > 1 THEN lease_deadline ELSE " + Ts(2) +
                             " END, progress = CASE WHEN $3 = '' THEN progress ELSE $3::jsonb END, "
                             "checkpoint_uri = CASE WHEN $4 = '' THEN checkpoint_uri ELSE $4 END, "
                             "progress_event_at = CASE WHEN $5 THEN " + Ts(6) + " ELSE progress_event_at END, "
                             "progress_event_attempt = CASE WHEN $5 THEN $7 ELSE progress_event_attempt END "
                             "WHERE id = $1::uuid",
                         rep.job_id, Micros(deadline), rep.progress_json, rep.checkpoint_uri, progress_event,
                         Micros(now), rep.attempt);
          if (rep.step >= 0) {
            tx.exec_params("INSERT INTO job_metrics (job_id, attempt, step, loss, tokens_per_second, learning_rate, created_at) "
                           "VALUES ($1::uuid, $2, $3, $4, $5, $6, " + Ts(7) + ") ON CONFLICT DO NOTHING",
                           rep.job_id, rep.attempt, rep.step, rep.loss, rep.tokens_per_second, rep.learning_rate,
                           Micros(now));
          }
          if (progress_event) {
            AddEvent(tx, row->pipeline_id, rep.job_id, "job.progress",
                     json{{"state", "LEASED"}, {"attempt", rep.attempt}, {"progress", json::parse(rep.progress_json, nullptr, false)}}
                         .dump(),
                     now);
          }
          if (!rep.checkpoint_uri.empty()) {
            AddEvent(tx, row->pipeline_id, rep.job_id, "job.checkpoint",
                     json{{"state", "LEASED"}, {"attempt", rep.attempt}, {"message", rep.checkpoint_uri}}.dump(), now);
          }
          if (row->nodes <= 1) InsertLogLines(tx, rep.job_id, rep.attempt, rep.logs);
          d.directive = row->cancel_requested ? Directive::kCancel : Directive::kContinue;
          d.lease_deadline = deadline;
        }
        return out;
      });
}

absl::Status Store::CompleteJob(const std::string& worker_id, const std::string& job_id, int attempt,
                                const std::string& artifact_uri, const std::string& result_json, TimePoint now,
                                int* readied) {
  // One statement (btx_complete_job, migration 0002): fence check, the transition, dependents,
  // events and the pipeline's completion, under the pipeline lock.
  static const std::string kSql =
      "SELECT 0, outcome, job_state, job_attempt, readied FROM btx_complete_job($1::uuid, $2, $3::uuid, $4, $5, " + Ts(6) + ")";
  const Completion c{.worker_id = worker_id, .job_id = job_id, .attempt = attempt};
  return InAutocommit<bool>(pool_, "complete job", [&](pqxx::nontransaction& tx) -> absl::StatusOr<bool> {
           auto r = ExecPrepared(tx, "btx_complete_job", kSql, UuidParam(job_id), attempt, UuidParam(worker_id),
                                 artifact_uri, result_json, Micros(now));
           CompletionOutcome out = CompletionFromRow(r[0], c);
           if (readied) *readied = out.readied;
           if (!out.status.ok()) return out.status;
           return true;
         }).status();
}

absl::StatusOr<std::vector<CompletionOutcome>> Store::CompleteJobs(const std::vector<Completion>& completions,
                                                                    TimePoint now) {
  static const std::string kSql =
      "SELECT o_slot, outcome, job_state, job_attempt, readied FROM btx_complete_jobs($1::uuid[], $2::int[], $3::uuid[], "
      "$4::text[], $5::text[], " + Ts(6) + ") ORDER BY o_slot";
  std::vector<std::string> jobs, attempts, workers, artifacts, results;
  for (const auto& c : completions) {
    jobs.push_back(UuidParam(c.job_id));
    attempts.push_back(std::to_string(c.attempt));
    workers.push_back(UuidParam(c.worker_id));
    artifacts.push_back(c.artifact_uri);
    results.push_back(c.result_json);
  }
  return InAutocommit<std::vector<CompletionOutcome>>(
      pool_, "complete jobs", [&](pqxx::nontransaction& tx) -> absl::StatusOr<std::vector<CompletionOutcome>> {
        auto r = ExecPrepared(tx, "btx_complete_jobs", kSql, ArrayLiteral(jobs), ArrayLiteral(attempts),
                              ArrayLiteral(workers), ArrayLiteral(artifacts), ArrayLiteral(results), Micros(now));
        if (r.size() != completions.size()) {
          return absl::InternalError(Cat("complete jobs: ", r.size(), " rows for ", completions.size(), " jobs"));
        }
        std::vector<CompletionOutcome> out(completions.size());
        for (size_t i = 0; i < r.size(); ++i) out[i] = CompletionFromRow(r[i], completions[i]);
        return out;
      });
}

absl::StatusOr<FailOutcome> Store::FailJob(const std::string& worker_id, const std::string& job_id, int attempt,
                                           const std::string& error, bool retryable, bool cancelled,
                                           const std::string& checkpoint_uri, const RetryPolicy& policy, TimePoint now,
                                           bool interrupted) {
  return InTx<FailOutcome>(pool_, "fail job", [&](pqxx::work& tx) -> absl::StatusOr<FailOutcome> {
    if (!LockPipelineOfJob(tx, job_id)) return absl::NotFoundError(Cat("job '", job_id, "' not found"));
    auto row = LockJob(tx, job_id);
    if (!row.ok()) return row.status();
    // Any member of a gang ends the attempt for all: the others learn it from their next heartbeat
    // (LEASE_LOST) and stop their ranks.
    auto node = MemberFence(tx, *row, job_id, attempt, worker_id);
    if (!node.ok()) return node.status();
    const std::string why = row->nodes > 1 ? Cat("node ", *node, " of ", row->nodes, ": ", error) : error;
    FailOutcome out;
    out.pipeline_id = row->pipeline_id;
    out.name = row->name;
    out.kind = row->kind;
    // An interruption is not the job's fault: it is requeued whatever its budget, which it keeps.
    const bool keep_budget = interrupted && retryable && !cancelled && !row->cancel_requested;
    if (cancelled || row->cancel_requested) {
      out.new_state = job_state::kCancelled;
    } else if (keep_budget || (retryable && row->attempt < row->max_attempts)) {
      out.new_state = job_state::kRetryWait;
    } else {
      out.new_state = job_state::kFailed;
    }
    const TimePoint ready_at = keep_budget ? now : now + policy.BackoffAfter(row->attempt);
    tx.exec_params("UPDATE jobs SET state = $2, error = $3, lease_deadline = NULL, "
                   "checkpoint_uri = CASE WHEN $4 = '' THEN checkpoint_uri ELSE $4 END, "
                   "ready_at = CASE WHEN $2 = 'RETRY_WAIT' THEN " + Ts(5) + " ELSE ready_at END, "
                   "max_attempts = max_attempts + $7, "
                   "finished_at = CASE WHEN $2 = 'RETRY_WAIT' THEN NULL ELSE " + Ts(6) + " END WHERE id = $1::uuid",
                   job_id, out.new_state, why, checkpoint_uri, Micros(ready_at), Micros(now), keep_budget ? 1 : 0);
    FinishAttempt(tx, job_id, attempt, cancelled ? "CANCELLED" : keep_budget ? "INTERRUPTED" : "FAILED", why, now);
    json payload = {{"state", out.new_state}, {"attempt", attempt}, {"message", why}};
    if (keep_budget) payload["interrupted"] = true;
    AddEvent(tx, row->pipeline_id, job_id, out.new_state == job_state::kRetryWait ? "job.retry_wait"
                                           : out.new_state == job_state::kCancelled ? "job.cancelled"
                                                                                    : "job.failed",
             payload.dump(), now);
    if (out.new_state == job_state::kFailed) {
      out.pipeline_failed = FailPipeline(tx, row->pipeline_id, Cat("job ", row->name, " failed: ", why), now);
    }
    return out;
  });
}

absl::StatusOr<std::vector<ExpiredLease>> Store::ReapExpiredLeases(const RetryPolicy& policy, TimePoint now) {
  (void)policy;  // an expired lease is requeued at once: the attempt's checkpoint makes the retry cheap
  // One transaction per job, each taking its pipeline lock first (see LockPipeline): one
  // transaction over all of them would hold several pipelines at once and could deadlock with
  // another replica's reaper.
  auto candidates = InTx<std::vector<std::string>>(pool_, "reap leases", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<std::string>> {
    std::vector<std::string> ids;
    for (const auto& r : tx.exec_params("SELECT id FROM jobs WHERE state = 'LEASED' AND lease_deadline < " + Ts(1), Micros(now))) {
      ids.push_back(r[0].as<std::string>());
    }
    return ids;
  });
  if (!candidates.ok()) return candidates.status();
  std::vector<ExpiredLease> out;
  for (const auto& id : *candidates) {
    auto one = InTx<std::optional<ExpiredLease>>(pool_, "reap lease", [&](pqxx::work& tx) -> absl::StatusOr<std::optional<ExpiredLease>> {
      if (!LockPipelineOfJob(tx, id)) return std::optional<ExpiredLease>();
      // Re-checked under the lock: the worker may have renewed or finished it meanwhile; another
      // replica's reaper may hold it (SKIP LOCKED).
      auto rows = tx.exec_params(
          "SELECT id, pipeline_id, name, kind, attempt, max_attempts, cancel_requested, nodes FROM jobs "
          "WHERE id = $1 AND state = 'LEASED' AND lease_deadline < " + Ts(2) + " FOR UPDATE SKIP LOCKED",
          id, Micros(now));
      if (rows.empty()) return std::optional<ExpiredLease>();
      const auto& r = rows[0];
      ExpiredLease e{r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>(), r[3].as<std::string>(),
                     r[4].as<int>(), false};
      const bool cancel = r[6].as<bool>();
      std::string error = Cat("lease of attempt ", e.attempt, " expired (worker stopped heartbeating)");
      // A gang: which members stopped. One that never picked its lease up (its worker left between
      // offering itself and its next poll) cost the job nothing: the attempt is an interruption.
      bool never_started = false;
      if (r[7].as<int>() > 1) {
        std::vector<std::string> who;
        never_started = true;
        for (const auto& m : tx.exec_params(
                 "SELECT m.node_rank, w.name, m.delivered FROM job_members m JOIN workers w ON w.id = m.worker_id "
                 "WHERE m.job_id = $1 AND m.attempt = $2 AND m.lease_deadline < " + Ts(3) + " ORDER BY m.node_rank",
                 e.job_id, e.attempt, Micros(now))) {
          who.push_back(Cat("node ", m[0].as<int>(), " (worker ", m[1].as<std::string>(), ")"));
          never_started &= !m[2].as<bool>();
        }
        never_started &= !who.empty();
        error = never_started ? Cat("attempt ", e.attempt, ": ", absl::StrJoin(who, ", "),
                                    " never picked up its lease; the gang is formed again")
                              : Cat("lease of ", absl::StrJoin(who, ", "), " of attempt ", e.attempt,
                                    " expired (worker stopped heartbeating); the whole gang's attempt ends");
      }
      std::string state = cancel ? job_state::kCancelled
                                 : (never_started || e.attempt < r[5].as<int>() ? job_state::kReady : job_state::kFailed);
      e.requeued = state == job_state::kReady;
      tx.exec_params("UPDATE jobs SET state = $2, lease_deadline = NULL, error = $3, ready_at = " + Ts(4) +
                         ", finished_at = CASE WHEN $2 = 'READY' THEN NULL ELSE " + Ts(4) + " END, "
                         "max_attempts = max_attempts + $5 WHERE id = $1",
                     e.job_id, state, error, Micros(now), never_started && !cancel ? 1 : 0);
      FinishAttempt(tx, e.job_id, e.attempt, never_started ? "INTERRUPTED" : "LEASE_EXPIRED", error, now);
      AddEvent(tx, e.pipeline_id, e.job_id, "job.lease_expired",
               json{{"state", state}, {"attempt", e.attempt}, {"message", error}}.dump(), now);
      if (state == job_state::kFailed) e.pipeline_failed = FailPipeline(tx, e.pipeline_id, Cat("job ", e.name, ": ", error), now);
      if (e.requeued) Notify(tx, kJobsChannel);
      return std::optional<ExpiredLease>(std::move(e));
    });
    if (!one.ok()) {
      // What was reaped is committed: report it (the rest waits for the next pass).
      if (out.empty()) return one.status();
      break;
    }
    if (one->has_value()) out.push_back(std::move(**one));
  }
  return out;
}

}  // namespace btx::storage
