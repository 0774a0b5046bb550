// Shared SQL fragments and row decoding for the repositories.
#pragma once

#include <pqxx/pqxx>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/storage/pool.h"
#include "btx/storage/records.h"
#include "btx/storage/store.h"

namespace btx::storage::internal {

// Times travel as integer microseconds since the epoch: exact, and independent of the session's
// time zone.
inline std::string Ts(int param) {
  return "(timestamptz 'epoch' + ($" + std::to_string(param) + ")::int8 * interval '1 microsecond')";
}
inline std::string Us(const std::string& col) { return "(extract(epoch from " + col + ") * 1000000)::int8"; }
inline int64_t Micros(TimePoint t) { return ToUnixMicros(t); }

extern const std::string kJobColumns;  // select list decoded by JobFromRow
// kJobColumns but the last one: the parents' names, comma-separated, sorted.
extern const std::string kJobColumnsWithoutDeps;
inline constexpr int kJobColumnCount = 24;  // in kJobColumnsWithoutDeps
JobRecord JobFromRow(const pqxx::row& r);
extern const std::string kPipelineColumns;
PipelineRecord PipelineFromRow(const pqxx::row& r);

std::optional<TimePoint> OptTime(const pqxx::field& f);

// Ids arrive as text from the API. Comparing `id::text = $1` would defeat every index on the uuid
// columns, so ids are cast on our side instead; a malformed id becomes the nil UUID, which no row
// has (ids come from gen_random_uuid), so it still reads as "not found".
std::string UuidParam(const std::string& id);
// A PostgreSQL array literal ('{"a","b"}') of the items, every one quoted: libpqxx 6 binds no arrays.
std::string ArrayLiteral(const std::vector<std::string>& items);

// Runs fn with a Tx (pqxx::work or pqxx::nontransaction) on a pooled connection; a transaction is
// committed when fn returns OK. Maps exceptions to statuses and drops broken connections.
template <typename Tx, typename T, typename Fn>
absl::StatusOr<T> OnPooledConnection(ConnectionPool& pool, std::string_view what, Fn&& fn) {
  auto lease = pool.Acquire();
  if (!lease.ok()) return lease.status();
  try {
    Tx tx(**lease);
    absl::StatusOr<T> result = fn(tx);
    if constexpr (std::is_same_v<Tx, pqxx::work>) {
      if (result.ok()) tx.commit();
    }
    return result;
  } catch (const pqxx::broken_connection& e) {
    lease->Discard();
    return StatusFromException(e, what);
  } catch (const std::exception& e) {
    if (!(*lease)->is_open()) lease->Discard();
    return StatusFromException(e, what);
  }
}

// fn in one transaction.
template <typename T, typename Fn>
absl::StatusOr<T> InTx(ConnectionPool& pool, std::string_view what, Fn&& fn) {
  return OnPooledConnection<pqxx::work, T>(pool, what, std::forward<Fn>(fn));
}

// Lock order, to keep concurrent transactions free of deadlocks: a transaction that locks more
// than one row takes its pipeline row first (FOR NO KEY UPDATE, which does not block the KEY SHARE
// locks that foreign-key checks take, so claims and heartbeats never wait for it), then job rows.
// Returns false when the pipeline does not exist.
bool LockPipeline(pqxx::work& tx, const std::string& pipeline_id);
// Locks the pipeline of a job; returns its id, or nullopt when the job does not exist.
std::optional<std::string> LockPipelineOfJob(pqxx::work& tx, const std::string& job_id);

// Runs fn on a pooled connection outside an explicit transaction: for work that is a single
// statement (atomic by itself), it saves the BEGIN and COMMIT round trips.
template <typename T, typename Fn>
absl::StatusOr<T> InAutocommit(ConnectionPool& pool, std::string_view what, Fn&& fn) {
  return OnPooledConnection<pqxx::nontransaction, T>(pool, what, std::forward<Fn>(fn));
}

// Executes `sql` as the prepared statement `name`, preparing it on first use on this connection
// (re-declaring an identical definition is free): the hot paths skip parsing and planning.
template <typename... Args>
pqxx::result ExecPrepared(pqxx::transaction_base& tx, const char* name, const std::string& sql, Args&&... args) {
  tx.conn().prepare(name, sql);
  return tx.exec_prepared(name, std::forward<Args>(args)...);
}

void Notify(pqxx::work& tx, const char* channel);
void AddEvent(pqxx::work& tx, const std::string& pipeline_id, const std::string& job_id, const std::string& type,
              const std::string& payload_json, TimePoint now);
// Returns true when this call moved the pipeline to FAILED (false: it was no longer RUNNING). The
// caller holds the pipeline lock.
bool FailPipeline(pqxx::work& tx, const std::string& pipeline_id, const std::string& error, TimePoint now);

}  // namespace btx::storage::internal
