#include "btx/storage/local_postgres.h"

#include <filesystem>
#include <pqxx/pqxx>

#include "absl/cleanup/cleanup.h"

#include <gtest/gtest.h>

#include "btx/common/fs.h"
#include "pg_fixture.h"

namespace btx::storage {
namespace {

TEST(LocalPostgres, StartsConnectsAndKeepsDataAcrossRestart) {
  auto dir = MakeTempDir("btx-pg-launch-");
  ASSERT_TRUE(dir.ok());
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(*dir); };
  PosixProcessLauncher launcher;
  LocalPostgresConfig cfg{.state_dir = *dir, .durable = false};
  {
    auto pg = LocalPostgres::Start(cfg, launcher);
    ASSERT_TRUE(pg.ok()) << pg.status();
    pqxx::connection c((*pg)->ConnectionString());
    pqxx::work tx(c);
    tx.exec("CREATE TABLE t (x int)");
    tx.exec("INSERT INTO t VALUES (42)");
    tx.commit();
    ASSERT_TRUE((*pg)->Restart().ok());
    pqxx::connection c2((*pg)->ConnectionString());
    pqxx::work tx2(c2);
    EXPECT_EQ(tx2.exec("SELECT x FROM t")[0][0].as<int>(), 42);
  }  // destructor stops the server
  EXPECT_FALSE(std::filesystem::exists(*dir + "/pgdata/postmaster.pid"));
  // A second start on the same state dir reuses the cluster (no initdb) and sees the data.
  auto pg = LocalPostgres::Start(cfg, launcher);
  ASSERT_TRUE(pg.ok()) << pg.status();
  pqxx::connection c((*pg)->ConnectionString());
  pqxx::work tx(c);
  EXPECT_EQ(tx.exec("SELECT x FROM t")[0][0].as<int>(), 42);
  tx.commit();
  (*pg).reset();
  std::filesystem::remove_all(*dir);
}

TEST(LocalPostgres, ListensOnNoTcpPort) {
  auto& pg = btx::testing::PgServer::Get().server();
  pqxx::connection c(pg.ConnectionString());
  pqxx::work tx(c);
  EXPECT_EQ(tx.exec("SHOW listen_addresses")[0][0].as<std::string>(), "");
}

TEST(LocalPostgres, EmptyStateDirIsAnError) {
  PosixProcessLauncher launcher;
  auto pg = LocalPostgres::Start(LocalPostgresConfig{}, launcher);
  ASSERT_FALSE(pg.ok());
  EXPECT_EQ(pg.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace btx::storage
