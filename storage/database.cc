#include "btx/storage/database.h"

#include <pqxx/pqxx>

#include "btx/common/strings.h"
#include "btx/storage/migrations.h"

namespace btx::storage {

absl::StatusOr<std::unique_ptr<Database>> OpenDatabase(DatabaseOptions options, ProcessLauncher& launcher) {
  auto db = std::make_unique<Database>();
  if (options.url.empty()) {
    if (options.local.state_dir.empty()) {
      return absl::InvalidArgumentError("give a database connection string, or a state dir for a private PostgreSQL");
    }
    const std::string dir = options.local.state_dir;
    auto pg = LocalPostgres::Start(std::move(options.local), launcher);
    if (!pg.ok()) return absl::UnavailableError(Cat("cannot start PostgreSQL in ", dir, ": ", pg.status().message()));
    db->local = std::move(*pg);
    db->conninfo = db->local->ConnectionString();
  } else {
    db->conninfo = std::move(options.url);
  }
  try {
    pqxx::connection conn(db->conninfo);
    auto version = Migrate(conn);
    if (!version.ok()) return version.status();
    db->schema_version = *version;
  } catch (const std::exception& e) {
    return absl::UnavailableError(Cat("cannot connect to the database: ", e.what()));
  }
  db->pool = std::make_unique<ConnectionPool>(db->conninfo, options.connections);
  db->store = std::make_unique<Store>(*db->pool);
  return db;
}

}  // namespace btx::storage
