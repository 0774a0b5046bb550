// Replicas whose hosts' clocks disagree by hours still agree on lease deadlines when both run on the
// database's clock.
#include "btx/storage/db_clock.h"

#include <pqxx/pqxx>

#include <gtest/gtest.h>

#include "pg_fixture.h"

namespace btx::storage {
namespace {
using namespace std::chrono_literals;

class SkewedClock final : public Clock {
 public:
  explicit SkewedClock(Duration skew) : skew_(skew) {}
  TimePoint Now() const override { return std::chrono::system_clock::now() + skew_; }

 private:
  Duration skew_;
};

TEST(DatabaseClock, ReplicasWithSkewedHostClocksAgreeWithTheDatabase) {
  const std::string conninfo = btx::testing::NewMigratedDatabase();
  ConnectionPool pool(conninfo, 2);
  SkewedClock ahead(std::chrono::hours(1)), behind(-std::chrono::minutes(37));
  DatabaseClock a(ahead, pool), b(behind, pool);
  // Unsynced, each is as wrong as its host.
  EXPECT_GT(a.Now() - b.Now(), 90min);
  ASSERT_TRUE(a.Sync().ok());
  ASSERT_TRUE(b.Sync().ok());
  EXPECT_LT(std::chrono::abs(a.Now() - b.Now()), 1s);
  EXPECT_NEAR(std::chrono::duration_cast<std::chrono::minutes>(a.offset()).count(), -60, 1);
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  const TimePoint db = FromUnixMicros(tx.exec("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8")[0][0].as<int64_t>());
  EXPECT_LT(std::chrono::abs(a.Now() - db), 1s);
  // A lease of 30 s granted by one replica is still 30 s away for the other (not expired, not 2 h away).
  const TimePoint deadline = a.Now() + 30s;
  EXPECT_GT(deadline - b.Now(), 28s);
  EXPECT_LT(deadline - b.Now(), 32s);
}

}  // namespace
}  // namespace btx::storage
