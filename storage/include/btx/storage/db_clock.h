// The database's clock, read through a local one. Lease deadlines and reaping compare times written by
// different scheduler replicas; with each replica's own host clock a skewed replica would reap leases early
// (or never). Every replica runs on this clock instead: the local clock plus its measured offset from
// PostgreSQL's clock_timestamp(), so they all agree with the database, and with each other, to within the
// round-trip time of the last Sync().
#pragma once

#include <atomic>

#include "absl/status/status.h"
#include "btx/common/clock.h"
#include "btx/storage/pool.h"

namespace btx::storage {

class DatabaseClock final : public Clock {
 public:
  DatabaseClock(const Clock& local, ConnectionPool& pool) : local_(local), pool_(pool) {}
  // Measures the offset (the database's time minus the local clock's at the midpoint of the round trip).
  // Call at start and now and then: clocks drift.
  absl::Status Sync();
  TimePoint Now() const override;
  Duration offset() const { return Duration(offset_ms_.load()); }

 private:
  const Clock& local_;
  ConnectionPool& pool_;
  std::atomic<int64_t> offset_ms_{0};
};

}  // namespace btx::storage
