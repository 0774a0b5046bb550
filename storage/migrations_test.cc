#include "btx/storage/migrations.h"

#include <gtest/gtest.h>

#include "pg_fixture.h"

namespace btx::storage {
namespace {

TEST(Migrations, AppliesAllAndIsIdempotent) {
  pqxx::connection c(btx::testing::PgServer::Get().NewDatabase());
  auto v = Migrate(c);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, LatestSchemaVersion());
  EXPECT_GE(LatestSchemaVersion(), 1);
  auto again = Migrate(c);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *v);
  pqxx::work tx(c);
  EXPECT_EQ(tx.exec("SELECT count(*) FROM schema_migrations")[0][0].as<int>(), static_cast<int>(AllMigrations().size()));
  EXPECT_EQ(tx.exec("SELECT count(*) FROM information_schema.tables WHERE table_name IN "
                    "('pipelines', 'jobs', 'workers', 'events', 'job_logs', 'job_attempts', 'job_deps', 'job_metrics')")[0][0]
                .as<int>(),
            8);
}

TEST(Migrations, AppliesOnlyMissingVersions) {
  pqxx::connection c(btx::testing::PgServer::Get().NewDatabase());
  std::vector<Migration> first = {{1, "one", "CREATE TABLE m1 (x int)"}};
  std::vector<Migration> both = {{1, "one", "CREATE TABLE m1 (x int)"}, {2, "two", "CREATE TABLE m2 (x int)"}};
  ASSERT_EQ(*Migrate(c, first), 1);
  ASSERT_EQ(*Migrate(c, both), 2);  // would fail if version 1 ran twice (table exists)
}

TEST(Migrations, RefusesNewerSchema) {
  pqxx::connection c(btx::testing::PgServer::Get().NewDatabase());
  ASSERT_TRUE(Migrate(c).ok());
  {
    pqxx::work tx(c);
    tx.exec_params("INSERT INTO schema_migrations (version, name) VALUES ($1, 'from the future')", LatestSchemaVersion() + 1);
    tx.commit();
  }
  auto v = Migrate(c);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(v.status().message().find("newer"), std::string_view::npos) << v.status();
}

TEST(Migrations, FailedMigrationLeavesSchemaUnchanged) {
  pqxx::connection c(btx::testing::PgServer::Get().NewDatabase());
  std::vector<Migration> bad = {{1, "one", "CREATE TABLE ok1 (x int)"}, {2, "broken", "CREATE TABLE ("}};
  EXPECT_FALSE(Migrate(c, bad).ok());
  pqxx::work tx(c);
  EXPECT_EQ(tx.exec("SELECT count(*) FROM information_schema.tables WHERE table_name = 'ok1'")[0][0].as<int>(), 0);
}

}  // namespace
}  // namespace btx::storage
