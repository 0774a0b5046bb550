// One throwaway PostgreSQL server per test process (started on first use, stopped at exit); each
// test gets a fresh database so tests never see each other's rows.
#pragma once

#include <string>

#include "btx/storage/local_postgres.h"

namespace btx::testing {

class PgServer {
 public:
  static PgServer& Get();
  // Creates an empty database (no schema) and returns its connection string.
  std::string NewDatabase();
  storage::LocalPostgres& server() { return *pg_; }
  const std::string& state_dir() const { return dir_; }

 private:
  PgServer();
  std::string dir_;
  PosixProcessLauncher launcher_;
  std::unique_ptr<storage::LocalPostgres> pg_;
  int next_ = 0;
};

// A fresh, migrated database.
std::string NewMigratedDatabase();

}  // namespace btx::testing
