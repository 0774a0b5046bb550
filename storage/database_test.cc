// OpenDatabase, the one way btx-scheduler and btxctl's embedded stack get a migrated database.
#include "btx/storage/database.h"

#include <filesystem>
#include <pqxx/pqxx>

#include <gtest/gtest.h>

#include "absl/cleanup/cleanup.h"
#include "btx/common/fs.h"
#include "btx/storage/migrations.h"
#include "pg_fixture.h"

namespace btx::storage {
namespace {

TEST(OpenDatabase, MigratesADatabaseGivenByUrlAndServesTheStore) {
  PosixProcessLauncher launcher;
  DatabaseOptions options;
  options.url = btx::testing::PgServer::Get().NewDatabase();  // empty: no schema yet
  options.connections = 2;
  auto db = OpenDatabase(options, launcher);
  ASSERT_TRUE(db.ok()) << db.status();
  EXPECT_EQ((*db)->local, nullptr);
  EXPECT_EQ((*db)->conninfo, options.url);
  EXPECT_EQ((*db)->schema_version, LatestSchemaVersion());
  auto id = (*db)->store->RegisterWorker("w1", "host", R"({"gpus": 1})", "test", TimePoint{});
  ASSERT_TRUE(id.ok()) << id.status();
  auto workers = (*db)->store->ListWorkers();
  ASSERT_TRUE(workers.ok()) << workers.status();
  EXPECT_EQ(workers->size(), 1u);
  // Opening it again (a second replica, a restart) finds the schema in place.
  auto again = OpenDatabase(options, launcher);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->store->ListWorkers()->size(), 1u);
}

TEST(OpenDatabase, StartsAPrivateServerUnderTheStateDirAndStopsItAfterwards) {
  auto dir = MakeTempDir("btx-open-db-");
  ASSERT_TRUE(dir.ok());
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(*dir); };
  PosixProcessLauncher launcher;
  DatabaseOptions options;
  options.local.state_dir = *dir;
  options.local.durable = false;
  {
    auto db = OpenDatabase(options, launcher);
    ASSERT_TRUE(db.ok()) << db.status();
    ASSERT_NE((*db)->local, nullptr);
    EXPECT_EQ((*db)->conninfo, (*db)->local->ConnectionString());
    EXPECT_EQ((*db)->schema_version, LatestSchemaVersion());
    ASSERT_TRUE((*db)->store->RegisterWorker("w1", "host", "{}", "test", TimePoint{}).ok());
  }
  EXPECT_FALSE(std::filesystem::exists(*dir + "/pgdata/postmaster.pid"));
  // The data stays in the state dir for the next process.
  auto db = OpenDatabase(options, launcher);
  ASSERT_TRUE(db.ok()) << db.status();
  EXPECT_EQ((*db)->store->ListWorkers()->size(), 1u);
}

TEST(OpenDatabase, RefusesANewerSchemaAndNoDatabaseAtAll) {
  PosixProcessLauncher launcher;
  DatabaseOptions options;
  options.url = btx::testing::NewMigratedDatabase();
  {
    pqxx::connection c(options.url);
    pqxx::nontransaction(c).exec("INSERT INTO schema_migrations (version, name) VALUES (9999, 'from the future')");
  }
  auto newer = OpenDatabase(options, launcher);
  ASSERT_FALSE(newer.ok());
  EXPECT_EQ(newer.status().code(), absl::StatusCode::kFailedPrecondition) << newer.status();
  EXPECT_NE(newer.status().message().find("9999"), std::string::npos) << newer.status();

  auto none = OpenDatabase(DatabaseOptions{}, launcher);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);

  options.url = "host=/nonexistent-btx-socket-dir dbname=btx connect_timeout=1";
  auto unreachable = OpenDatabase(options, launcher);
  ASSERT_FALSE(unreachable.ok());
  EXPECT_EQ(unreachable.status().code(), absl::StatusCode::kUnavailable) << unreachable.status();
}

}  // namespace
}  // namespace btx::storage
