#include "pg_fixture.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <pqxx/pqxx>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "btx/common/fs.h"
#include "btx/storage/migrations.h"

namespace btx::testing {

PgServer& PgServer::Get() {
  static PgServer* server = [] {
    auto* s = new PgServer();
    std::atexit([] { delete &PgServer::Get(); });
    return s;
  }();
  return *server;
}

PgServer::PgServer() {
  auto dir = MakeTempDir("btx-pg-test-");
  if (!dir.ok()) throw std::runtime_error(std::string(dir.status().message()));
  dir_ = *dir;
  storage::LocalPostgresConfig cfg;
  cfg.state_dir = dir_;
  cfg.durable = false;
  auto pg = storage::LocalPostgres::Start(cfg, launcher_);
  if (!pg.ok()) throw std::runtime_error(Cat("cannot start test PostgreSQL: ", pg.status().message()));
  pg_ = std::move(*pg);
}

PgServer::~PgServer() {
  pg_.reset();
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

std::string PgServer::NewDatabase() {
  std::string name = Cat("t_", ::getpid(), "_", next_++);
  auto s = pg_->CreateDatabase(name);
  if (!s.ok()) throw std::runtime_error(std::string(s.message()));
  if (synchronous_commit_) {
    // A database's setting outranks the server's command line, for every session opened after it.
    pqxx::connection c(pg_->ConnectionString("postgres"));
    pqxx::nontransaction tx(c);
    tx.exec("ALTER DATABASE " + tx.quote_name(name) + " SET synchronous_commit = on");
  }
  return pg_->ConnectionString(name);
}

absl::Status PgServer::Stop(bool immediate) {
  stopped_ = true;
  return immediate ? pg_->StopImmediate() : pg_->Stop();
}

absl::Status PgServer::Start() {
  if (!stopped_) return absl::OkStatus();
  // Restart() of a stopped server is a plain start with the same configuration.
  auto s = pg_->Restart();
  if (s.ok()) stopped_ = false;
  return s;
}

std::string NewMigratedDatabase() {
  std::string conninfo = PgServer::Get().NewDatabase();
  pqxx::connection c(conninfo);
  auto v = storage::Migrate(c);
  if (!v.ok()) throw std::runtime_error(std::string(v.status().message()));
  return conninfo;
}

}  // namespace btx::testing

// Stop the server even when a test calls exit; the atexit handler above deletes it.
