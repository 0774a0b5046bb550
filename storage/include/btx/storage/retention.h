// How much of a pipeline's history the database keeps: progress events are coalesced as they are
// written (Store::Heartbeat), old and excess log lines and events are deleted by Store::ApplyRetention,
// which the scheduler's reaper runs. docs/reliability.md, "Logs and events stay bounded".
#pragma once

#include <cstdint>

#include "btx/common/clock.h"

namespace btx::storage {

struct RetentionPolicy {
  // The log lines and job events of a pipeline that finished (SUCCEEDED, FAILED, CANCELLED) longer
  // ago than this are deleted; its own pipeline.* events stay, so a Watch of it still ends. 0: kept.
  Duration finished_age = std::chrono::hours(24 * 30);
  // Per pipeline, running or not: beyond this many log lines (events), the oldest go first. 0: no cap.
  // A pipeline's pipeline.* events are never deleted and do not count against the cap of events.
  int64_t max_log_lines_per_pipeline = 1'000'000;
  int64_t max_events_per_pipeline = 100'000;
  // Rows per DELETE statement (one short transaction each), and at most this many per pass: a pass
  // never holds locks long, and a backlog is worked off over several passes.
  int batch_rows = 5'000;
  int64_t max_rows_per_pass = 200'000;
};

struct RetentionResult {
  int64_t log_lines_deleted = 0;
  int64_t events_deleted = 0;
  bool more = false;  // the pass stopped at max_rows_per_pass with rows left to delete
  bool skipped = false;  // another replica was applying retention: nothing done
};

}  // namespace btx::storage
