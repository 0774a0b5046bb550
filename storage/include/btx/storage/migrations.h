// Versioned schema migrations, applied at start-up. A binary refuses a database whose schema is
// newer than the newest migration it knows: an old scheduler must not write into a new schema.
#pragma once

#include <pqxx/pqxx>

#include "absl/status/statusor.h"

namespace btx::storage {

struct Migration {
  int version;
  const char* name;
  const char* sql;
};

const std::vector<Migration>& AllMigrations();
int LatestSchemaVersion();

// Applies what is missing, under an advisory lock (several replicas may start at once). Returns the
// schema version afterwards.
absl::StatusOr<int> Migrate(pqxx::connection& conn);
absl::StatusOr<int> Migrate(pqxx::connection& conn, const std::vector<Migration>& migrations);

}  // namespace btx::storage
