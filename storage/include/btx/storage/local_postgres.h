// A private PostgreSQL server under a state directory: initdb on first use, pg_ctl start/stop,
// unix socket only (no TCP port to collide with). Used by the embedded default and by tests.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "btx/common/process.h"

namespace btx::storage {

struct LocalPostgresConfig {
  std::string state_dir{};   // data in <state_dir>/pgdata, socket in <state_dir>/run
  int port = 5432;           // only names the socket file: nothing listens on TCP
  std::string bin_dir{};     // empty: found via PATH (pg_ctl) or /usr/lib/postgresql/<newest>/bin
  std::string run_as_user{}; // when running as root (PostgreSQL refuses root): default "postgres"
  bool durable = true;       // false: fsync=off, for throwaway test clusters
  std::string database = "btx";
};

class LocalPostgres {
 public:
  // Initialises the cluster if needed and starts it (reusing one already running on this dir).
  static absl::StatusOr<std::unique_ptr<LocalPostgres>> Start(LocalPostgresConfig config, ProcessLauncher& launcher);
  ~LocalPostgres();  // stops the server if this object started it

  absl::Status Stop();
  // Whether Stop() and the destructor stop the server: by default only one this object started. A server
  // reused from a process that is gone (a killed btxctl) is adopted with `true`, so it is not left behind.
  void set_stop_on_exit(bool stop) { started_by_us_ = stop; }
  // Stops without waiting for clients (a crash-like "immediate" shutdown), for fault tests.
  absl::Status StopImmediate();
  absl::Status Restart();
  // libpq connection string for `database` (or another database on the same server).
  std::string ConnectionString(const std::string& database = "") const;
  absl::Status CreateDatabase(const std::string& name);
  const LocalPostgresConfig& config() const { return config_; }

 private:
  LocalPostgres(LocalPostgresConfig config, ProcessLauncher& launcher) : config_(std::move(config)), launcher_(launcher) {}
  absl::Status InitIfNeeded();
  absl::Status StartServer();
  absl::Status PgCtl(const std::vector<std::string>& args);
  ProcessSpec AsServerUser(std::vector<std::string> argv) const;

  LocalPostgresConfig config_;
  ProcessLauncher& launcher_;
  std::optional<uid_t> uid_;
  std::optional<gid_t> gid_;
  bool started_by_us_ = false;
};

}  // namespace btx::storage
