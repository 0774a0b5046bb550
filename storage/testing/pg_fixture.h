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
  // Fault injection for chaos tests: stops the server while clients are connected (fast: backends
  // are terminated; immediate: no shutdown checkpoint, so the next start runs crash recovery) and
  // starts it again with the same data, socket and port, so connection strings stay valid. Start()
  // is a no-op unless Stop() came first.
  absl::Status Stop(bool immediate);
  absl::Status Start();
  // The server runs with synchronous_commit=off for speed: an immediate stop then loses the last
  // commits even though they were acknowledged. A test that stops it that way and counts on every
  // acknowledged commit turns it on for the databases created from then on.
  void set_synchronous_commit(bool on) { synchronous_commit_ = on; }
  const std::string& state_dir() const { return dir_; }

 private:
  PgServer();
  // Stops the server and removes its data directory: every test process starts one, and a
  // suite run would otherwise leave ~50 MB behind per process.
  ~PgServer();
  std::string dir_;
  PosixProcessLauncher launcher_;
  std::unique_ptr<storage::LocalPostgres> pg_;
  int next_ = 0;
  bool stopped_ = false;
  bool synchronous_commit_ = false;
};

// A fresh, migrated database.
std::string NewMigratedDatabase();

}  // namespace btx::testing
