// The retention policy (retention.h): deletes old and excess log lines and events in short batches.
#include <algorithm>

#include "btx/common/strings.h"
#include "store_internal.h"

namespace btx::storage {
using namespace internal;

namespace {

// Arbitrary constant: the session advisory lock that lets one replica at a time apply retention (two
// passes counting the same pipeline's excess at once would each delete it).
constexpr int64_t kRetentionLockKey = 0x6274785f726574;  // "btx_ret"

// Everything that deletes runs in autocommit, one statement (one batch) per transaction: locks are
// held for one batch only, and heartbeats and transitions go on meanwhile.
class Pass {
 public:
  Pass(pqxx::nontransaction& tx, const RetentionPolicy& policy, TimePoint now)
      : tx_(tx), policy_(policy), now_(now), budget_(std::max<int64_t>(policy.max_rows_per_pass, 1)) {}

  RetentionResult Run() {
    if (policy_.finished_age.count() > 0) {
      // The pipeline.* events stay: a Watch of the pipeline still sees how it ended.
      const std::string finished =
          "p.state <> 'RUNNING' AND p.updated_at < " + Ts(1) +
          " AND NOT EXISTS (SELECT 1 FROM jobs x WHERE x.pipeline_id = p.id AND x.state = 'LEASED')";
      Drain(&result_.log_lines_deleted, [&](int64_t n) {
        return tx_.exec_params("DELETE FROM job_logs WHERE ctid IN (SELECT l.ctid FROM pipelines p JOIN jobs j ON "
                               "j.pipeline_id = p.id JOIN job_logs l ON l.job_id = j.id WHERE " + finished +
                                   " LIMIT $2)",
                               Micros(now_ - policy_.finished_age), n);
      });
      Drain(&result_.events_deleted, [&](int64_t n) {
        return tx_.exec_params("DELETE FROM events WHERE ctid IN (SELECT e.ctid FROM pipelines p JOIN events e ON "
                               "e.pipeline_id = p.id WHERE e.job_id IS NOT NULL AND " + finished + " LIMIT $2)",
                               Micros(now_ - policy_.finished_age), n);
      });
    }
    if (policy_.max_log_lines_per_pipeline > 0 || policy_.max_events_per_pipeline > 0) Caps();
    return result_;
  }

 private:
  // Runs `batch(n)` until it deletes fewer than n rows, `*limit` rows are gone, or the pass's budget
  // is spent.
  template <typename Batch>
  void Drain(int64_t* counter, Batch&& batch, int64_t limit = INT64_MAX) {
    while (limit > 0) {
      if (budget_ <= 0) {
        result_.more = true;
        return;
      }
      const int64_t n = std::min({static_cast<int64_t>(std::max(policy_.batch_rows, 1)), budget_, limit});
      const int64_t deleted = batch(n).affected_rows();
      *counter += deleted;
      budget_ -= deleted;
      limit -= deleted;
      if (deleted < n) return;
    }
  }

  // Pipelines over a cap: the running ones, and those that finished recently enough to still have
  // their rows (the age rule empties older ones); their counts come from index-only scans.
  void Caps() {
    const int64_t max_logs = policy_.max_log_lines_per_pipeline, max_events = policy_.max_events_per_pipeline;
    const TimePoint since = policy_.finished_age.count() > 0 ? now_ - policy_.finished_age : FromUnixMicros(0);
    auto over = tx_.exec_params(
        "SELECT id, logs, events FROM (SELECT p.id, "
        "CASE WHEN $1::int8 > 0 THEN (SELECT count(*) FROM jobs j JOIN job_logs l ON l.job_id = j.id WHERE j.pipeline_id = p.id) "
        "ELSE 0 END AS logs, "
        "CASE WHEN $2::int8 > 0 THEN (SELECT count(*) FROM events e WHERE e.pipeline_id = p.id AND e.job_id IS NOT NULL) "
        "ELSE 0 END AS events FROM pipelines p WHERE p.state = 'RUNNING' OR p.updated_at >= " + Ts(3) + ") c "
        "WHERE ($1::int8 > 0 AND logs > $1::int8) OR ($2::int8 > 0 AND events > $2::int8) ORDER BY id",
        max_logs, max_events, Micros(since));
    for (const auto& row : over) {
      const std::string pid = row[0].as<std::string>();
      if (max_logs > 0 && row[1].as<int64_t>() > max_logs) {
        // Oldest first across the pipeline's jobs: at most n from the front of each job's lines.
        Drain(&result_.log_lines_deleted, [&](int64_t n) {
          return tx_.exec_params(
              "DELETE FROM job_logs WHERE ctid IN (SELECT x.ctid FROM jobs j CROSS JOIN LATERAL (SELECT l.ctid, l.id "
              "FROM job_logs l WHERE l.job_id = j.id ORDER BY l.id LIMIT $2) x WHERE j.pipeline_id = $1 "
              "ORDER BY x.id LIMIT $2)",
              pid, n);
        }, row[1].as<int64_t>() - max_logs);
      }
      if (max_events > 0 && row[2].as<int64_t>() > max_events) {
        Drain(&result_.events_deleted, [&](int64_t n) {
          return tx_.exec_params(
              "DELETE FROM events WHERE ctid IN (SELECT ctid FROM events WHERE pipeline_id = $1 AND job_id IS NOT NULL "
              "ORDER BY id LIMIT $2)",
              pid, n);
        }, row[2].as<int64_t>() - max_events);
      }
      if (budget_ <= 0) {
        result_.more = true;
        return;
      }
    }
  }

  pqxx::nontransaction& tx_;
  const RetentionPolicy& policy_;
  const TimePoint now_;
  int64_t budget_;
  RetentionResult result_;
};

}  // namespace

absl::StatusOr<RetentionResult> Store::ApplyRetention(const RetentionPolicy& policy, TimePoint now) {
  return InAutocommit<RetentionResult>(
      pool_, "apply retention", [&](pqxx::nontransaction& tx) -> absl::StatusOr<RetentionResult> {
        if (!tx.exec_params("SELECT pg_try_advisory_lock($1)", kRetentionLockKey)[0][0].as<bool>()) {
          return RetentionResult{.skipped = true};
        }
        // Released on every path: an error leaves the (autocommit) connection usable, and a broken
        // one takes its session locks with it.
        struct Unlock {
          pqxx::nontransaction& tx;
          ~Unlock() {
            try {
              tx.exec_params("SELECT pg_advisory_unlock($1)", kRetentionLockKey);
            } catch (const std::exception&) {
            }
          }
        } unlock{tx};
        return Pass(tx, policy, now).Run();
      });
}

}  // namespace btx::storage
