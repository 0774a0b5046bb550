// Pipelines, workers and the shared transition helpers.
#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>

#include "btx/common/strings.h"
#include "store_internal.h"

namespace btx::storage {
using namespace internal;
using json = nlohmann::json;

namespace internal {

void Notify(pqxx::work& tx, const char* channel) { tx.exec(std::string("NOTIFY ") + channel); }

void AddEvent(pqxx::work& tx, const std::string& pipeline_id, const std::string& job_id, const std::string& type,
              const std::string& payload_json, TimePoint now) {
  tx.exec_params("INSERT INTO events (pipeline_id, job_id, type, payload, created_at) VALUES ($1, NULLIF($2, '')::uuid, $3, $4::jsonb, " +
                     Ts(5) + ")",
                 pipeline_id, job_id, type, payload_json, Micros(now));
  Notify(tx, kEventsChannel);
}

bool LockPipeline(pqxx::work& tx, const std::string& pipeline_id) {
  return !tx.exec_params("SELECT 1 FROM pipelines WHERE id = $1::uuid FOR NO KEY UPDATE", UuidParam(pipeline_id)).empty();
}

std::optional<std::string> LockPipelineOfJob(pqxx::work& tx, const std::string& job_id) {
  // A job never changes pipeline, so reading pipeline_id before the lock is safe.
  auto r = tx.exec_params(
      "SELECT p.id FROM pipelines p WHERE p.id = (SELECT pipeline_id FROM jobs WHERE id = $1::uuid) FOR NO KEY UPDATE",
      UuidParam(job_id));
  if (r.empty()) return std::nullopt;
  return r[0][0].as<std::string>();
}

bool FailPipeline(pqxx::work& tx, const std::string& pipeline_id, const std::string& error, TimePoint now) {
  auto r = tx.exec_params("UPDATE pipelines SET state = 'FAILED', error = $2, updated_at = " + Ts(3) +
                              " WHERE id = $1 AND state = 'RUNNING' RETURNING id",
                          pipeline_id, error, Micros(now));
  if (r.empty()) return false;
  // Nothing else of a failed pipeline should run: drop queued work, stop running work.
  tx.exec_params("UPDATE jobs SET state = 'CANCELLED', finished_at = " + Ts(2) +
                     " WHERE pipeline_id = $1 AND state IN ('PENDING', 'READY', 'RETRY_WAIT')",
                 pipeline_id, Micros(now));
  tx.exec_params("UPDATE jobs SET cancel_requested = true WHERE pipeline_id = $1 AND state = 'LEASED'", pipeline_id);
  AddEvent(tx, pipeline_id, "", "pipeline.failed", json{{"pipeline_state", "FAILED"}, {"message", error}}.dump(), now);
  return true;
}

}  // namespace internal

absl::StatusOr<std::pair<PipelineRecord, bool>> Store::CreatePipeline(const NewPipeline& p, TimePoint now) {
  // Dependency names must resolve inside the pipeline; a cycle would leave jobs PENDING forever.
  std::map<std::string, const NewJob*> by_name;
  for (const auto& j : p.jobs) {
    if (!by_name.emplace(j.name, &j).second) {
      return absl::InvalidArgumentError(Cat("job name '", j.name, "' appears twice"));
    }
  }
  for (const auto& j : p.jobs) {
    for (const auto& d : j.depends_on) {
      if (!by_name.count(d)) return absl::InvalidArgumentError(Cat("job '", j.name, "' depends on unknown job '", d, "'"));
    }
  }
  {
    std::map<std::string, int> color;  // 0 white, 1 grey, 2 black
    std::function<bool(const std::string&)> cyclic = [&](const std::string& n) {
      if (color[n] == 1) return true;
      if (color[n] == 2) return false;
      color[n] = 1;
      for (const auto& d : by_name[n]->depends_on)
        if (cyclic(d)) return true;
      color[n] = 2;
      return false;
    };
    for (const auto& j : p.jobs)
      if (cyclic(j.name)) return absl::InvalidArgumentError(Cat("job graph has a cycle through '", j.name, "'"));
  }

  auto created = InTx<std::pair<std::string, bool>>(
      pool_, "create pipeline", [&](pqxx::work& tx) -> absl::StatusOr<std::pair<std::string, bool>> {
        if (!p.idempotency_key.empty()) {
          // Serialise submits with the same key so the check-then-insert below cannot race. Keys are
          // scoped per owner: another owner's pipeline with this key is neither returned nor refused.
          tx.exec_params("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                         Cat(p.owner.size(), ":", p.owner, "/", p.idempotency_key));
          auto existing = tx.exec_params(
              "SELECT id, spec = $3::jsonb FROM pipelines WHERE owner = $1 AND idempotency_key = $2", p.owner,
              p.idempotency_key, p.spec_json);
          if (!existing.empty()) {
            if (!existing[0][1].as<bool>()) {
              return absl::AlreadyExistsError(
                  Cat("idempotency key '", p.idempotency_key, "' was already used for pipeline ",
                      existing[0][0].as<std::string>(), " with a different spec; use a new key for a new spec"));
            }
            return std::make_pair(existing[0][0].as<std::string>(), false);
          }
        }
        auto row = tx.exec_params("INSERT INTO pipelines (name, state, spec, idempotency_key, owner, created_at, updated_at) "
                                  "VALUES ($1, 'RUNNING', $2::jsonb, NULLIF($3, ''), $4, " + Ts(5) + ", " + Ts(5) + ") RETURNING id",
                                  p.name, p.spec_json, p.idempotency_key, p.owner, Micros(now));
        std::string pid = row[0][0].as<std::string>();
        std::map<std::string, std::string> ids;
        for (const auto& j : p.jobs) {
          const bool root = j.depends_on.empty();
          auto jr = tx.exec_params(
              "INSERT INTO jobs (pipeline_id, name, kind, state, max_attempts, spec, deps_remaining, gpus, priority, "
              "ready_at, created_at, ranks, nodes) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, CASE WHEN $4 = 'READY' THEN " +
                  Ts(10) + " END, " + Ts(10) + ", $11, $12) RETURNING id",
              pid, j.name, j.kind, std::string(root ? job_state::kReady : job_state::kPending), j.max_attempts,
              j.spec_json, static_cast<int>(j.depends_on.size()), j.gpus, j.priority, Micros(now), std::max(1, j.ranks), std::max(1, j.nodes));
          ids[j.name] = jr[0][0].as<std::string>();
        }
        for (const auto& j : p.jobs) {
          for (const auto& d : j.depends_on) {
            tx.exec_params("INSERT INTO job_deps (job_id, depends_on) VALUES ($1, $2)", ids[j.name], ids[d]);
          }
        }
        AddEvent(tx, pid, "", "pipeline.submitted", json{{"pipeline_state", "RUNNING"}, {"message", p.name}}.dump(), now);
        Notify(tx, kJobsChannel);
        return std::make_pair(pid, true);
      });
  if (!created.ok()) return created.status();
  auto rec = GetPipeline(created->first);
  if (!rec.ok()) return rec.status();
  return std::make_pair(*std::move(rec), created->second);
}

absl::StatusOr<PipelineRecord> Store::CancelPipeline(const std::string& id, const std::string& reason, TimePoint now) {
  auto s = InTx<bool>(pool_, "cancel pipeline", [&](pqxx::work& tx) -> absl::StatusOr<bool> {
    auto r = tx.exec_params("SELECT id, state FROM pipelines WHERE id = $1::uuid FOR NO KEY UPDATE", UuidParam(id));
    if (r.empty()) return absl::NotFoundError(Cat("pipeline '", id, "' not found"));
    if (r[0][1].as<std::string>() != pipeline_state::kRunning) return false;  // terminal: cancelling is a no-op
    const std::string pid = r[0][0].as<std::string>();
    std::string msg = reason.empty() ? "cancelled by user" : reason;
    tx.exec_params("UPDATE pipelines SET state = 'CANCELLED', cancel_requested = true, error = $2, updated_at = " + Ts(3) +
                       " WHERE id = $1",
                   pid, msg, Micros(now));
    tx.exec_params("UPDATE jobs SET state = 'CANCELLED', finished_at = " + Ts(2) +
                       " WHERE pipeline_id = $1 AND state IN ('PENDING', 'READY', 'RETRY_WAIT')",
                   pid, Micros(now));
    // Running jobs learn it from their next heartbeat; their lease ends as CANCELLED.
    tx.exec_params("UPDATE jobs SET cancel_requested = true WHERE pipeline_id = $1 AND state = 'LEASED'", pid);
    AddEvent(tx, pid, "", "pipeline.cancelled", json{{"pipeline_state", "CANCELLED"}, {"message", msg}}.dump(), now);
    return true;
  });
  if (!s.ok()) return s.status();
  return GetPipeline(id);
}

absl::StatusOr<PipelineRecord> Store::RetryPipeline(const std::string& id, TimePoint now) {
  auto s = InTx<bool>(pool_, "retry pipeline", [&](pqxx::work& tx) -> absl::StatusOr<bool> {
    auto r = tx.exec_params("SELECT id, state FROM pipelines WHERE id = $1::uuid FOR NO KEY UPDATE", UuidParam(id));
    if (r.empty()) return absl::NotFoundError(Cat("pipeline '", id, "' not found"));
    std::string pid = r[0][0].as<std::string>(), state = r[0][1].as<std::string>();
    if (state == pipeline_state::kSucceeded || state == pipeline_state::kRunning) {
      auto leased = tx.exec_params("SELECT count(*) FROM jobs WHERE pipeline_id = $1 AND state IN ('FAILED', 'CANCELLED')", pid);
      if (leased[0][0].as<int64_t>() == 0) {
        return absl::FailedPreconditionError(Cat("pipeline '", id, "' is ", state, "; only a FAILED or CANCELLED pipeline can be retried"));
      }
    }
    auto live = tx.exec_params("SELECT count(*) FROM jobs WHERE pipeline_id = $1 AND state = 'LEASED'", pid);
    if (live[0][0].as<int64_t>() > 0) {
      return absl::FailedPreconditionError(Cat("pipeline '", id, "' still has running jobs; wait until they stop"));
    }
    // Failed/cancelled jobs get a fresh attempt budget; those whose parents are all done are READY.
    tx.exec_params(
        "UPDATE jobs j SET max_attempts = j.attempt + j.max_attempts, cancel_requested = false, error = '', finished_at = NULL, "
        "deps_remaining = (SELECT count(*) FROM job_deps d JOIN jobs p ON p.id = d.depends_on WHERE d.job_id = j.id AND p.state <> 'SUCCEEDED'), "
        "state = 'PENDING' WHERE j.pipeline_id = $1 AND j.state IN ('FAILED', 'CANCELLED')",
        pid);
    tx.exec_params("UPDATE jobs SET state = 'READY', ready_at = " + Ts(2) +
                       " WHERE pipeline_id = $1 AND state = 'PENDING' AND deps_remaining = 0",
                   pid, Micros(now));
    tx.exec_params("UPDATE pipelines SET state = 'RUNNING', cancel_requested = false, error = '', updated_at = " + Ts(2) +
                       " WHERE id = $1",
                   pid, Micros(now));
    AddEvent(tx, pid, "", "pipeline.retried", json{{"pipeline_state", "RUNNING"}}.dump(), now);
    // A cancel that raced the last completion leaves a CANCELLED pipeline whose jobs all
    // succeeded: nothing is left to run, so no completion would ever finish it. Finish it here.
    auto unfinished = tx.exec_params("SELECT count(*) FROM jobs WHERE pipeline_id = $1 AND state <> 'SUCCEEDED'", pid);
    if (unfinished[0][0].as<int64_t>() == 0) {
      tx.exec_params("UPDATE pipelines SET state = 'SUCCEEDED', updated_at = " + Ts(2) + " WHERE id = $1", pid,
                     Micros(now));
      AddEvent(tx, pid, "", "pipeline.succeeded", json{{"pipeline_state", "SUCCEEDED"}}.dump(), now);
    }
    Notify(tx, kJobsChannel);
    return true;
  });
  if (!s.ok()) return s.status();
  return GetPipeline(id);
}

absl::StatusOr<std::string> Store::RegisterWorker(const std::string& name, const std::string& hostname,
                                                  const std::string& capabilities_json, const std::string& version,
                                                  TimePoint now) {
  return InTx<std::string>(pool_, "register worker", [&](pqxx::work& tx) -> absl::StatusOr<std::string> {
    auto r = tx.exec_params(
        "INSERT INTO workers (name, hostname, capabilities, version, state, registered_at, last_seen) "
        "VALUES ($1, $2, $3::jsonb, $4, 'ACTIVE', " + Ts(5) + ", " + Ts(5) + ") ON CONFLICT (name) DO UPDATE SET "
        "hostname = EXCLUDED.hostname, capabilities = EXCLUDED.capabilities, version = EXCLUDED.version, "
        "state = 'ACTIVE', registered_at = EXCLUDED.registered_at, last_seen = EXCLUDED.last_seen RETURNING id",
        name, hostname, capabilities_json, version, Micros(now));
    return r[0][0].as<std::string>();
  });
}

absl::StatusOr<int> Store::MarkLostWorkers(Duration timeout, TimePoint now) {
  return InTx<int>(pool_, "mark lost workers", [&](pqxx::work& tx) -> absl::StatusOr<int> {
    auto r = tx.exec_params("UPDATE workers SET state = 'LOST' WHERE state <> 'LOST' AND last_seen < " + Ts(1) + " RETURNING id",
                            Micros(now - timeout));
    return static_cast<int>(r.size());
  });
}

}  // namespace btx::storage
