// Shared SQL fragments and row decoding for the repositories.
#pragma once

#include <pqxx/pqxx>
#include <string>

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
JobRecord JobFromRow(const pqxx::row& r);
extern const std::string kPipelineColumns;
PipelineRecord PipelineFromRow(const pqxx::row& r);

std::optional<TimePoint> OptTime(const pqxx::field& f);

// Runs fn in a transaction on a pooled connection; commits when fn returns OK. Maps exceptions to
// statuses and drops broken connections.
template <typename T, typename Fn>
absl::StatusOr<T> InTx(ConnectionPool& pool, std::string_view what, Fn&& fn) {
  auto lease = pool.Acquire();
  if (!lease.ok()) return lease.status();
  try {
    pqxx::work tx(**lease);
    absl::StatusOr<T> result = fn(tx);
    if (result.ok()) tx.commit();
    return result;
  } catch (const pqxx::broken_connection& e) {
    lease->Discard();
    return StatusFromException(e, what);
  } catch (const std::exception& e) {
    if (!(*lease)->is_open()) lease->Discard();
    return StatusFromException(e, what);
  }
}

void Notify(pqxx::work& tx, const char* channel);
void AddEvent(pqxx::work& tx, const std::string& pipeline_id, const std::string& job_id, const std::string& type,
              const std::string& payload_json, TimePoint now);
// After a job reached a terminal state: update dependents and the pipeline's state.
void AfterJobSucceeded(pqxx::work& tx, const std::string& job_id, const std::string& pipeline_id, TimePoint now);
void FailPipeline(pqxx::work& tx, const std::string& pipeline_id, const std::string& error, TimePoint now);

}  // namespace btx::storage::internal
