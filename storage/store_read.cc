// Row decoding and the read-only queries.
#include <cctype>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"

#include "btx/common/strings.h"

#include "store_internal.h"

namespace btx::storage {
using namespace internal;

Duration RetryPolicy::BackoffAfter(int failed_attempt) const {
  Duration d = base;
  for (int i = 1; i < failed_attempt && d < max; ++i) d *= 2;
  return std::min(d, max);
}

absl::Status StatusFromException(const std::exception& e, std::string_view what) {
  if (dynamic_cast<const pqxx::broken_connection*>(&e) || dynamic_cast<const pqxx::in_doubt_error*>(&e)) {
    return absl::UnavailableError(Cat(what, ": database unavailable: ", e.what()));
  }
  if (const auto* sql = dynamic_cast<const pqxx::sql_error*>(&e)) {
    const std::string& state = sql->sqlstate();
    if (state == "40001" || state == "40P01") return absl::AbortedError(Cat(what, ": ", e.what()));
    if (state == "22P02") return absl::InvalidArgumentError(Cat(what, ": malformed id: ", e.what()));
    // 08: connection exceptions; 57P01/57P02: the server terminated the session (shutdown, or
    // another backend crashed); 57P03: starting up or shutting down.
    if (state.rfind("08", 0) == 0 || state == "57P01" || state == "57P02" || state == "57P03") {
      return absl::UnavailableError(Cat(what, ": database unavailable: ", e.what()));
    }
  }
  return absl::InternalError(Cat(what, ": ", e.what()));
}

namespace internal {

std::string UuidParam(const std::string& id) {
  static const std::string kNil = "00000000-0000-0000-0000-000000000000";
  if (id.size() != 36) return kNil;
  for (size_t i = 0; i < id.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? id[i] != '-' : !std::isxdigit(static_cast<unsigned char>(id[i]))) return kNil;
  }
  return id;
}

std::string ArrayLiteral(const std::vector<std::string>& items) {
  std::string out = "{";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ',';
    out += '"';
    for (char ch : items[i]) {
      if (ch == '"' || ch == '\\') out += '\\';
      out += ch;
    }
    out += '"';
  }
  return out + "}";
}

std::optional<TimePoint> OptTime(const pqxx::field& f) {
  if (f.is_null()) return std::nullopt;
  return FromUnixMicros(f.as<int64_t>());
}

const std::string kJobColumnsWithoutDeps =
    "j.id, j.pipeline_id, j.name, j.kind, j.state, j.attempt, j.max_attempts, "
    "coalesce(j.worker_id::text, ''), " + Us("j.lease_deadline") + ", " + Us("j.ready_at") + ", " +
    Us("j.started_at") + ", " + Us("j.finished_at") + ", " + Us("j.created_at") +
    ", j.progress::text, j.checkpoint_uri, j.artifact_uri, j.error, j.spec::text, coalesce(j.result::text, ''), "
    "j.gpus, j.cancel_requested, j.ranks, j.nodes, j.rendezvous";

const std::string kJobColumns =
    kJobColumnsWithoutDeps +
    ", (SELECT coalesce(string_agg(p.name, ',' ORDER BY p.name), '') FROM job_deps d JOIN jobs p ON p.id = d.depends_on "
    "WHERE d.job_id = j.id)";

JobRecord JobFromRow(const pqxx::row& r) {
  JobRecord j;
  j.id = r[0].as<std::string>();
  j.pipeline_id = r[1].as<std::string>();
  j.name = r[2].as<std::string>();
  j.kind = r[3].as<std::string>();
  j.state = r[4].as<std::string>();
  j.attempt = r[5].as<int>();
  j.max_attempts = r[6].as<int>();
  j.worker_id = r[7].as<std::string>();
  j.lease_deadline = OptTime(r[8]);
  j.ready_at = OptTime(r[9]);
  j.started_at = OptTime(r[10]);
  j.finished_at = OptTime(r[11]);
  j.created_at = FromUnixMicros(r[12].as<int64_t>());
  j.progress_json = r[13].as<std::string>();
  j.checkpoint_uri = r[14].as<std::string>();
  j.artifact_uri = r[15].as<std::string>();
  j.error = r[16].as<std::string>();
  j.spec_json = r[17].as<std::string>();
  j.result_json = r[18].as<std::string>();
  j.gpus = r[19].as<int>();
  j.cancel_requested = r[20].as<bool>();
  j.ranks = r[21].as<int>();
  j.nodes = r[22].as<int>();
  j.rendezvous = r[23].as<std::string>();
  std::string deps = r[kJobColumnCount].as<std::string>();
  if (!deps.empty()) j.depends_on = Split(deps, ',');
  return j;
}

const std::string kPipelineColumns =
    "p.id, p.name, p.state, p.spec::text, coalesce(p.idempotency_key, ''), p.error, coalesce(p.result::text, ''), "
    "p.cancel_requested, " + Us("p.created_at") + ", " + Us("p.updated_at") +
    ", (SELECT count(*) FROM jobs WHERE pipeline_id = p.id), "
    "(SELECT count(*) FROM jobs WHERE pipeline_id = p.id AND state = 'SUCCEEDED'), p.owner";

PipelineRecord PipelineFromRow(const pqxx::row& r) {
  PipelineRecord p;
  p.id = r[0].as<std::string>();
  p.name = r[1].as<std::string>();
  p.state = r[2].as<std::string>();
  p.spec_json = r[3].as<std::string>();
  p.idempotency_key = r[4].as<std::string>();
  p.error = r[5].as<std::string>();
  p.result_json = r[6].as<std::string>();
  p.cancel_requested = r[7].as<bool>();
  p.created_at = FromUnixMicros(r[8].as<int64_t>());
  p.updated_at = FromUnixMicros(r[9].as<int64_t>());
  p.jobs_total = r[10].as<int>();
  p.jobs_succeeded = r[11].as<int>();
  p.owner = r[12].as<std::string>();
  return p;
}

}  // namespace internal

absl::StatusOr<PipelineRecord> Store::GetPipeline(const std::string& id) {
  return InTx<PipelineRecord>(pool_, "get pipeline", [&](pqxx::work& tx) -> absl::StatusOr<PipelineRecord> {
    auto r = tx.exec_params("SELECT " + kPipelineColumns + " FROM pipelines p WHERE p.id = $1::uuid", UuidParam(id));
    if (r.empty()) return absl::NotFoundError(Cat("pipeline '", id, "' not found"));
    PipelineRecord p = PipelineFromRow(r[0]);
    for (const auto& row : tx.exec_params("SELECT " + kJobColumns +
                                              " FROM jobs j WHERE j.pipeline_id = $1 ORDER BY j.priority, j.name",
                                          p.id)) {
      p.jobs.push_back(JobFromRow(row));
    }
    return p;
  });
}

absl::StatusOr<PipelinePage> Store::ListPipelines(const PipelineFilter& f) {
  int64_t cursor_us = 0;  // 0: first page
  std::string cursor_id;
  if (!f.page_token.empty()) {
    std::vector<std::string> parts = Split(f.page_token, '_');
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &cursor_us)) {
      return absl::InvalidArgumentError(Cat("page_token '", f.page_token, "': not a token from a previous page"));
    }
    cursor_id = parts[1];
  }
  return InTx<PipelinePage>(pool_, "list pipelines", [&](pqxx::work& tx) -> absl::StatusOr<PipelinePage> {
    auto rows = tx.exec_params(
        "SELECT " + kPipelineColumns + ", " + Us("p.created_at") +
            " FROM pipelines p WHERE ($1 = '' OR p.state = $1) AND starts_with(p.name, $2) "
            "AND ($3::int8 = 0 OR (p.created_at, p.id::text) < (" + Ts(3) + ", $4)) AND (NOT $6 OR p.owner = $7) "
            "ORDER BY p.created_at DESC, p.id::text DESC LIMIT $5",
        f.state, f.name_prefix, cursor_us, cursor_id, f.page_size + 1, f.owner.has_value(), f.owner.value_or(""));
    PipelinePage page;
    for (const auto& r : rows) {
      if (static_cast<int>(page.pipelines.size()) == f.page_size) {
        const auto& last = page.pipelines.back();
        page.next_page_token = Cat(ToUnixMicros(last.created_at), "_", last.id);
        break;
      }
      page.pipelines.push_back(PipelineFromRow(r));
    }
    return page;
  });
}

absl::StatusOr<std::vector<JobRecord>> Store::ListJobs(const std::string& pipeline_id, const std::string& state,
                                                       int limit, const std::optional<std::string>& owner,
                                                       const std::string& page_token, std::string* next_page_token) {
  if (!page_token.empty() && !IsUuid(page_token)) {
    return absl::InvalidArgumentError(Cat("page_token '", page_token, "': not a token from a previous page"));
  }
  return InTx<std::vector<JobRecord>>(pool_, "list jobs", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<JobRecord>> {
    // Keyset pagination over the order shown, made total by the id: rows inserted meanwhile never shift a page.
    if (!page_token.empty() && tx.exec_params("SELECT 1 FROM jobs WHERE id = $1::uuid", page_token).empty()) {
      return absl::InvalidArgumentError(Cat("page_token '", page_token, "': no such job (deleted since?)"));
    }
    std::vector<JobRecord> out;
    for (const auto& r : tx.exec_params(
             "SELECT " + kJobColumns +
                 " FROM jobs j WHERE ($1 = '' OR j.pipeline_id = $4::uuid) AND "
                 "($2 = '' OR j.state = $2) AND (NOT $5 OR EXISTS (SELECT 1 FROM pipelines p "
                 "WHERE p.id = j.pipeline_id AND p.owner = $6)) AND ($7 = '' OR EXISTS (SELECT 1 FROM jobs c "
                 "WHERE c.id = $8::uuid AND (j.created_at < c.created_at OR (j.created_at = c.created_at AND "
                 "(j.priority, j.name, j.id::text) > (c.priority, c.name, c.id::text))))) "
                 "ORDER BY j.created_at DESC, j.priority, j.name, j.id::text LIMIT $3",
             pipeline_id, state, limit + 1, UuidParam(pipeline_id), owner.has_value(), owner.value_or(""), page_token,
             UuidParam(page_token))) {
      if (static_cast<int>(out.size()) == limit) {
        if (next_page_token != nullptr) *next_page_token = out.back().id;
        break;
      }
      out.push_back(JobFromRow(r));
    }
    return out;
  });
}

absl::StatusOr<JobRecord> Store::GetJob(const std::string& job_id) {
  return InTx<JobRecord>(pool_, "get job", [&](pqxx::work& tx) -> absl::StatusOr<JobRecord> {
    auto r = tx.exec_params("SELECT " + kJobColumns + " FROM jobs j WHERE j.id = $1::uuid", UuidParam(job_id));
    if (r.empty()) return absl::NotFoundError(Cat("job '", job_id, "' not found"));
    return JobFromRow(r[0]);
  });
}

absl::StatusOr<std::vector<WorkerRecord>> Store::ListWorkers() {
  return InTx<std::vector<WorkerRecord>>(pool_, "list workers", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<WorkerRecord>> {
    std::vector<WorkerRecord> out;
    for (const auto& r : tx.exec(
             "SELECT w.id, w.name, w.hostname, w.capabilities::text, w.version, w.state, " + Us("w.registered_at") +
             ", " + Us("w.last_seen") +
             ", (SELECT coalesce(string_agg(j.id::text, ','), '') FROM jobs j WHERE j.worker_id = w.id AND "
             "j.state = 'LEASED') FROM workers w ORDER BY w.name")) {
      WorkerRecord w;
      w.id = r[0].as<std::string>();
      w.name = r[1].as<std::string>();
      w.hostname = r[2].as<std::string>();
      w.capabilities_json = r[3].as<std::string>();
      w.version = r[4].as<std::string>();
      w.state = r[5].as<std::string>();
      w.registered_at = FromUnixMicros(r[6].as<int64_t>());
      w.last_seen = FromUnixMicros(r[7].as<int64_t>());
      std::string jobs = r[8].as<std::string>();
      if (!jobs.empty()) w.running_job_ids = Split(jobs, ',');
      out.push_back(std::move(w));
    }
    return out;
  });
}

absl::StatusOr<std::optional<WorkerSize>> Store::LargestWorker(WorkerResource by) {
  return InTx<std::optional<WorkerSize>>(pool_, "largest worker", [&](pqxx::work& tx) -> absl::StatusOr<std::optional<WorkerSize>> {
    // Every registered worker counts, whatever its state: a LOST or DRAINING one is a machine of the
    // fleet that may come back (it re-registers under its name, replacing its row). Capabilities are
    // what the worker said: anything but a number counts as 0.
    auto field = [](const char* key) {
      return Cat("CASE WHEN jsonb_typeof(capabilities->'", key, "') = 'number' THEN least(greatest((capabilities->>'",
                 key, "')::numeric, 0), 2147483647)::integer ELSE 0 END");
    };
    auto r = tx.exec(Cat("SELECT name, ", field("gpus"), " AS gpus, ", field("cpu_threads"),
                         " AS cpu_threads FROM workers ORDER BY ",
                         by == WorkerResource::kGpus ? "gpus" : "cpu_threads", " DESC, name LIMIT 1"));
    if (r.empty()) return std::optional<WorkerSize>();
    return std::optional<WorkerSize>(WorkerSize{r[0][0].as<std::string>(), r[0][1].as<int>(), r[0][2].as<int>()});
  });
}

absl::StatusOr<std::vector<EventRecord>> Store::EventsAfter(const std::string& pipeline_id, int64_t after_id, int limit,
                                                            const std::optional<std::string>& owner) {
  return InTx<std::vector<EventRecord>>(pool_, "events", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<EventRecord>> {
    std::vector<EventRecord> out;
    for (const auto& r : tx.exec_params(
             "SELECT e.id, e.pipeline_id, coalesce(e.job_id::text, ''), coalesce(j.name, ''), e.type, e.payload::text, " +
                 Us("e.created_at") +
                 " FROM events e LEFT JOIN jobs j ON j.id = e.job_id WHERE ($1 = '' OR e.pipeline_id = $4::uuid) "
                 "AND e.id > $2 AND (NOT $5 OR EXISTS (SELECT 1 FROM pipelines p WHERE p.id = e.pipeline_id AND "
                 "p.owner = $6)) ORDER BY e.id LIMIT $3",
             pipeline_id, after_id, limit, UuidParam(pipeline_id), owner.has_value(), owner.value_or(""))) {
      EventRecord e;
      e.id = r[0].as<int64_t>();
      e.pipeline_id = r[1].as<std::string>();
      e.job_id = r[2].as<std::string>();
      e.job_name = r[3].as<std::string>();
      e.type = r[4].as<std::string>();
      e.payload_json = r[5].as<std::string>();
      e.created_at = FromUnixMicros(r[6].as<int64_t>());
      out.push_back(std::move(e));
    }
    return out;
  });
}

absl::StatusOr<std::vector<LogRecord>> Store::LogsAfter(const std::string& job_id, int64_t after_id, int limit) {
  return InTx<std::vector<LogRecord>>(pool_, "logs", [&](pqxx::work& tx) -> absl::StatusOr<std::vector<LogRecord>> {
    std::vector<LogRecord> out;
    for (const auto& r : tx.exec_params("SELECT id, attempt, stream, line, " + Us("created_at") +
                                            " FROM job_logs WHERE job_id = $1::uuid AND id > $2 ORDER BY id LIMIT $3",
                                        UuidParam(job_id), after_id, limit)) {
      out.push_back({r[0].as<int64_t>(), r[1].as<int>(), r[2].as<std::string>(), r[3].as<std::string>(),
                     FromUnixMicros(r[4].as<int64_t>())});
    }
    return out;
  });
}

absl::StatusOr<std::vector<std::tuple<std::string, std::string, int64_t>>> Store::CountJobsByStateAndKind() {
  using Rows = std::vector<std::tuple<std::string, std::string, int64_t>>;
  return InTx<Rows>(pool_, "count jobs", [&](pqxx::work& tx) -> absl::StatusOr<Rows> {
    Rows out;
    for (const auto& r : tx.exec("SELECT state, kind, count(*) FROM jobs GROUP BY state, kind")) {
      out.emplace_back(r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<int64_t>());
    }
    return out;
  });
}

absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> Store::CountPipelinesByState() {
  using Rows = std::vector<std::pair<std::string, int64_t>>;
  return InTx<Rows>(pool_, "count pipelines", [&](pqxx::work& tx) -> absl::StatusOr<Rows> {
    Rows out;
    for (const auto& r : tx.exec("SELECT state, count(*) FROM pipelines GROUP BY state")) {
      out.emplace_back(r[0].as<std::string>(), r[1].as<int64_t>());
    }
    return out;
  });
}

absl::StatusOr<FleetSnapshot> Store::ReadFleetSnapshot(int max_evals, TimePoint now) {
  return InTx<FleetSnapshot>(pool_, "read fleet snapshot", [&](pqxx::work& tx) -> absl::StatusOr<FleetSnapshot> {
    FleetSnapshot s;
    for (const auto& r : tx.exec("SELECT state, kind, count(*) FROM jobs GROUP BY state, kind")) {
      s.jobs.emplace_back(r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<int64_t>());
    }
    for (const auto& r : tx.exec("SELECT state, count(*) FROM pipelines GROUP BY state")) {
      s.pipelines.emplace_back(r[0].as<std::string>(), r[1].as<int64_t>());
    }
    s.workers_connected = tx.exec("SELECT count(*) FROM workers WHERE state IN ('ACTIVE', 'DRAINING')")[0][0].as<int64_t>();
    for (const auto& r : tx.exec("SELECT id, pipeline_id, name, kind, progress::text, " + Us("lease_deadline") +
                                 " FROM jobs WHERE state = 'LEASED'")) {
      s.leased.push_back({r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>(), r[3].as<std::string>(),
                          r[4].as<std::string>(), OptTime(r[5])});
    }
    for (const auto& r : tx.exec("SELECT pipeline_id, id, name, nodes FROM jobs WHERE nodes > 1 AND state IN ('READY', 'RETRY_WAIT')")) {
      s.gangs_waiting.push_back({r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>(), r[3].as<int>(), 0, ""});
    }
    for (const auto& r : tx.exec("SELECT j.pipeline_id, j.id, j.name, j.nodes, m.node_rank, w.name FROM jobs j "
                                 "JOIN job_members m ON m.job_id = j.id AND m.attempt = j.attempt JOIN workers w ON w.id = m.worker_id "
                                 "WHERE j.nodes > 1 AND j.state = 'LEASED'")) {
      s.gang_members.push_back({r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>(), r[3].as<int>(),
                                r[4].as<int>(), r[5].as<std::string>()});
    }
    s.workers_offering = tx.exec_params("SELECT count(*) FROM workers WHERE state = 'ACTIVE' AND offer_until >= " + Ts(1),
                                        Micros(now))[0][0].as<int64_t>();
    if (max_evals > 0) {
      for (const auto& r : tx.exec_params(
               "SELECT pipeline_id, coalesce(spec->'models'->0->>'name', ''), result::text FROM jobs "
               "WHERE kind = 'eval' AND state = 'SUCCEEDED' AND result IS NOT NULL ORDER BY finished_at DESC LIMIT $1",
               max_evals)) {
        s.evals.push_back({r[0].as<std::string>(), r[1].as<std::string>(), r[2].as<std::string>()});
      }
    }
    return s;
  });
}

}  // namespace btx::storage
