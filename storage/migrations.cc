#include "btx/storage/migrations.h"

#include "btx/common/strings.h"

namespace btx::storage {
namespace {
// Arbitrary constant: the advisory lock key that serialises migrators.
constexpr int64_t kMigrationLockKey = 0x6274785f6d6967;  // "btx_mig"
}  // namespace

const std::vector<Migration>& AllMigrations() {
  static const std::vector<Migration> kAll = {
#include "migrations_embedded.inc"
  };
  return kAll;
}

int LatestSchemaVersion() { return AllMigrations().empty() ? 0 : AllMigrations().back().version; }

absl::StatusOr<int> Migrate(pqxx::connection& conn) { return Migrate(conn, AllMigrations()); }

absl::StatusOr<int> Migrate(pqxx::connection& conn, const std::vector<Migration>& migrations) {
  const int latest = migrations.empty() ? 0 : migrations.back().version;
  try {
    pqxx::work tx(conn);
    tx.exec_params("SELECT pg_advisory_xact_lock($1)", kMigrationLockKey);
    tx.exec(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())");
    int current = tx.exec("SELECT coalesce(max(version), 0) FROM schema_migrations")[0][0].as<int>();
    if (current > latest) {
      return absl::FailedPreconditionError(Cat(
          "database schema version ", current, " is newer than this binary's ", latest,
          "; run a btx release that knows schema ", current, " or newer"));
    }
    for (const auto& m : migrations) {
      if (m.version <= current) continue;
      tx.exec(m.sql);
      tx.exec_params("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, std::string(m.name));
      current = m.version;
    }
    tx.commit();
    return current;
  } catch (const std::exception& e) {
    return absl::InternalError(Cat("schema migration failed: ", e.what()));
  }
}

}  // namespace btx::storage
