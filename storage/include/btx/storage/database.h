// The database as a process opens it: a private PostgreSQL started under a state dir, or a server
// given by connection string; the schema migrated; a connection pool and the Store over it. The one
// way btx-scheduler, btxctl's embedded stack and the benchmarks get there.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "btx/common/process.h"
#include "btx/storage/local_postgres.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"

namespace btx::storage {

struct DatabaseOptions {
  std::string url;            // libpq connection string; empty: a private server under local.state_dir
  LocalPostgresConfig local;  // the private server (used when url is empty)
  int connections = 16;       // pool size
};

// Members are declared in the order they are built, so they are torn down in reverse: the store and
// the pool before the private server is stopped.
struct Database {
  std::unique_ptr<LocalPostgres> local;  // set when this process started (or reuses) a private server
  std::string conninfo;
  int schema_version = 0;
  std::unique_ptr<ConnectionPool> pool;
  std::unique_ptr<Store> store;
};

// Starts the private server when no url is given, connects, applies the schema migrations (refusing a
// database whose schema is newer than this binary's) and opens the pool. Errors: UNAVAILABLE when the
// server cannot be started or reached, FAILED_PRECONDITION for a newer schema, INTERNAL for a failed
// migration, INVALID_ARGUMENT when neither url nor local.state_dir is given; the message says which
// database (the state dir, or "the database at <url>" with no password shown).
absl::StatusOr<std::unique_ptr<Database>> OpenDatabase(DatabaseOptions options, ProcessLauncher& launcher);

}  // namespace btx::storage
