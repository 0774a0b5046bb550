#include "btx/storage/db_clock.h"

#include <pqxx/pqxx>

#include "store_internal.h"

namespace btx::storage {

absl::Status DatabaseClock::Sync() {
  return internal::InTx<int>(pool_, "read the database clock", [&](pqxx::work& tx) -> absl::StatusOr<int> {
                   const TimePoint before = local_.Now();
                   const auto r = tx.exec("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8");
                   const TimePoint after = local_.Now();
                   const TimePoint db = FromUnixMicros(r[0][0].as<int64_t>());
                   const TimePoint mid = before + (after - before) / 2;
                   offset_ms_.store(std::chrono::duration_cast<Duration>(db - mid).count());
                   return 0;
                 })
      .status();
}

TimePoint DatabaseClock::Now() const { return local_.Now() + Duration(offset_ms_.load()); }

}  // namespace btx::storage
