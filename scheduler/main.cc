// btx-scheduler: the composition root of the scheduler daemon.
#include <sys/stat.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <thread>
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "absl/synchronization/mutex.h"
#include "btx/common/tls.h"
#include "btx/metrics/exposer.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/auth.h"
#include "btx/scheduler/server.h"
#include "input_check.h"
#include "btx/storage/database.h"
#include "btx/storage/db_clock.h"

namespace {
btx::scheduler::Scheduler* g_scheduler = nullptr;
void OnSignal(int) {
  // Shutdown from a signal handler is not safe; a detached thread does it.
  if (g_scheduler) std::thread([] { g_scheduler->Shutdown(); }).detach();
}

void WritePortFile(const std::string& path, int port) {
  // Renamed into place so a reader never sees a half-written number.
  std::ofstream(path + ".tmp") << port << "\n";
  std::filesystem::rename(path + ".tmp", path);
}

struct SecurityFlags {
  std::string cert, key, client_ca, tokens_file;
  bool allow_insecure_remote = false;
};

// Reads and checks every file before anything starts, so a bad path or a key that does not match
// its certificate stops the daemon with the file's name instead of failing handshakes later.
absl::StatusOr<btx::scheduler::SecurityConfig> LoadSecurity(const SecurityFlags& f) {
  btx::scheduler::SecurityConfig s;
  s.allow_insecure_remote = f.allow_insecure_remote;
  if (!f.cert.empty() || !f.key.empty()) {
    if (f.cert.empty() || f.key.empty()) return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
    auto pair = btx::tls::ReadKeyPair(f.cert, f.key);
    if (!pair.ok()) return pair.status();
    s.cert_pem = std::move(pair->cert_pem);
    s.key_pem = std::move(pair->key_pem);
    struct stat st {};
    if (::stat(f.key.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
      spdlog::warn("--tls-key {} is readable by other users (chmod 600 it)", f.key);
    }
  }
  if (!f.client_ca.empty()) {
    auto ca = btx::tls::ReadCertificates(f.client_ca);
    if (!ca.ok()) return ca.status();
    s.client_ca_pem = std::move(*ca);
  }
  if (!f.tokens_file.empty()) {
    auto ids = btx::scheduler::LoadIdentities(f.tokens_file);
    if (!ids.ok()) return ids.status();
    s.identities = std::move(*ids);
  }
  return s;
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"btx-scheduler: plans BTX pipelines and leases their jobs to workers"};
  btx::scheduler::SchedulerConfig cfg;
  std::string database_url, state_dir, artifact_root = "file:///tmp/btx-artifacts", port_file;
  std::string metrics_listen = "127.0.0.1:9090", metrics_port_file;
  int64_t lease_s = 30, heartbeat_s = 5;
  int db_connections = 16;
  int64_t progress_event_s = 10, retain_finished_days = 30, retention_interval_s = 300;
  SecurityFlags security;
  app.add_option("--listen", cfg.listen, "gRPC address")->capture_default_str();
  app.add_option("--database-url", database_url, "libpq connection string (or env BTX_DATABASE_URL)")->envname("BTX_DATABASE_URL");
  app.add_option("--state-dir", state_dir, "start a private PostgreSQL under this directory instead of --database-url");
  app.add_option("--artifact-root", artifact_root, "file:// URI of the shared artifact directory")->capture_default_str();
  app.add_option("--lease-seconds", lease_s, "job lease duration")->check(CLI::Range(1, 3600))->capture_default_str();
  app.add_option("--heartbeat-seconds", heartbeat_s, "worker heartbeat interval")->check(CLI::Range(1, 600))->capture_default_str();
  std::vector<std::string> data_roots;
  app.add_option("--data-root", data_roots,
                 "a directory under which pipelines may name seeds, tokenizers and data (repeatable; none: any path)");
  app.add_option("--port-file", port_file, "write the bound port here (for --listen host:0)");
  auto* metrics_opt = app.add_option("--metrics-listen", metrics_listen,
                                     "host:port serving Prometheus /metrics (port 0: any free port; 'off': none)")
                          ->capture_default_str();
  app.add_option("--metrics-port-file", metrics_port_file, "write the bound metrics port here");
  app.add_option("--db-connections", db_connections, "database connection pool size")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--max-streams-per-user", cfg.max_streams_per_user,
                 "Watch/Logs streams one caller may hold open on this replica (more: RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app.add_option("--max-streams", cfg.max_streams, "Watch/Logs streams open on this replica, all callers together")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app.add_option("--follower-db-connections", cfg.follower_db_connections,
                 "database connections for Watch/Logs streams, beside --db-connections (never shared with heartbeats)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  // Logs and events stay bounded (docs/reliability.md): defaults as in SchedulerConfig and RetentionPolicy.
  app.add_option("--progress-event-seconds", progress_event_s,
                 "write a job.progress event (what watch streams) at most this often per job; the latest "
                 "progress is always kept on the job (0: twice --heartbeat-seconds)")
      ->check(CLI::Range(0, 3600))
      ->capture_default_str();
  app.add_option("--retain-finished-days", retain_finished_days,
                 "delete the log lines and job events of pipelines finished this many days ago (0: keep them)")
      ->check(CLI::Range(0, 36500))
      ->capture_default_str();
  app.add_option("--max-log-lines-per-pipeline", cfg.retention.max_log_lines_per_pipeline,
                 "keep at most this many log lines per pipeline, running or not, the oldest deleted first (0: no cap)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--max-events-per-pipeline", cfg.retention.max_events_per_pipeline,
                 "keep at most this many job events per pipeline, the oldest deleted first (0: no cap)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40))
      ->capture_default_str();
  app.add_option("--retention-interval-seconds", retention_interval_s, "how often the reaper applies the retention policy")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  app.add_option("--tls-cert", security.cert, "serve TLS with this PEM certificate (chain)");
  app.add_option("--tls-key", security.key, "the PEM private key of --tls-cert");
  app.add_option("--tls-client-ca", security.client_ca,
                 "verify client certificates against these PEM roots; a verified certificate is a worker "
                 "unless --tokens-file gives it another role");
  app.add_option("--tokens-file", security.tokens_file,
                 "identities: lines 'sha256:<hex of the token> user|worker|admin NAME' or 'cert:<common name> ROLE NAME'");
  app.add_flag("--allow-insecure-remote", security.allow_insecure_remote,
               "serve without TLS or without authentication on an address other machines can reach");
  CLI11_PARSE(app, argc, argv);
  // Debian's Abseil checks every Mutex acquisition (gRPC takes many per call) for lock-order
  // cycles, a debugging aid that costs the daemon several percent of its CPU.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  auto sec = LoadSecurity(security);
  if (!sec.ok()) {
    std::cerr << "btx-scheduler: " << sec.status().message() << "\n";
    return 2;
  }
  cfg.security = std::move(*sec);
  if (auto s = btx::scheduler::CheckSecurity(cfg.listen, cfg.security); !s.ok()) {
    std::cerr << "btx-scheduler: " << s.message() << "\n";
    return 2;
  }
  if (const std::string warning = btx::scheduler::InsecurityWarning(cfg.listen, cfg.security); !warning.empty()) {
    spdlog::warn("{}", warning);
  } else {
    spdlog::info("TLS with authentication: {} token(s), client certificates {}", cfg.security.identities.tokens.size(),
                 cfg.security.client_ca_pem.empty() ? "not requested" : "verified against --tls-client-ca");
  }

  if (artifact_root.rfind("file:///", 0) != 0) {
    std::cerr << "btx-scheduler: --artifact-root '" << artifact_root << "': expected a file:///absolute/path URI\n";
    return 2;
  }
  cfg.artifact_root = artifact_root.substr(7);
  auto roots = btx::scheduler::NormaliseDataRoots(data_roots);
  if (!roots.ok()) {
    std::cerr << "btx-scheduler: " << roots.status().message() << "\n";
    return 2;
  }
  cfg.data_roots = std::move(*roots);
  if (cfg.data_roots.empty() && !cfg.security.identities.tokens.empty()) {
    spdlog::warn("no --data-root: users may name any file this host's workers can read (their keys included) in a "
                 "pipeline; set --data-root on a shared cluster");
  }
  cfg.lease = std::chrono::seconds(lease_s);
  cfg.heartbeat_interval = std::chrono::seconds(heartbeat_s);
  cfg.progress_event_interval = std::chrono::seconds(progress_event_s);
  cfg.retention.finished_age = std::chrono::hours(24 * retain_finished_days);
  cfg.retention_interval = std::chrono::seconds(retention_interval_s);

  if (database_url.empty() && state_dir.empty()) {
    std::cerr << "btx-scheduler: give --database-url (or BTX_DATABASE_URL) or --state-dir\n";
    return 2;
  }
  btx::PosixProcessLauncher launcher;
  btx::storage::DatabaseOptions db_options;
  db_options.url = database_url;
  db_options.local.state_dir = state_dir;
  db_options.connections = db_connections;
  auto db = btx::storage::OpenDatabase(std::move(db_options), launcher);
  if (!db.ok()) {
    std::cerr << "btx-scheduler: " << db.status().message() << "\n";
    return 1;
  }
  spdlog::info("database schema at version {}", (*db)->schema_version);
  std::filesystem::create_directories(cfg.artifact_root);
  btx::SystemClock host_clock;
  // Leases are compared across replicas: every replica keeps the database's time, not its host's.
  btx::storage::DatabaseClock clock(host_clock, *(*db)->pool);
  if (auto s = clock.Sync(); !s.ok()) {
    std::cerr << "btx-scheduler: " << s.message() << "\n";
    return 1;
  }
  if (std::chrono::abs(clock.offset()) > std::chrono::seconds(1)) {
    spdlog::warn("this host's clock is {} ms off the database's; leases use the database's time", clock.offset().count());
  }
  // Declared before the scheduler and the exposer, which both read it until they are gone.
  btx::metrics::Registry registry;
  std::unique_ptr<btx::metrics::Exposer> exposer;
  if (metrics_listen != "off" && !metrics_listen.empty()) {
    const size_t colon = metrics_listen.rfind(':');
    int metrics_port = -1;
    if (colon != std::string::npos) {
      try {
        metrics_port = std::stoi(metrics_listen.substr(colon + 1));
      } catch (const std::exception&) {
      }
    }
    if (metrics_port < 0 || metrics_port > 65535) {
      std::cerr << "btx-scheduler: --metrics-listen '" << metrics_listen << "': expected host:port or off\n";
      return 2;
    }
    try {
      exposer = std::make_unique<btx::metrics::Exposer>(registry, metrics_listen.substr(0, colon), metrics_port);
      spdlog::info("metrics on http://{}:{}/metrics", metrics_listen.substr(0, colon), exposer->port());
      if (!metrics_port_file.empty()) WritePortFile(metrics_port_file, exposer->port());
    } catch (const std::exception& e) {
      // The default port may well be taken (it is Prometheus's own); only an explicit request
      // for an address is worth refusing to start over.
      if (metrics_opt->count() > 0) {
        std::cerr << "btx-scheduler: " << e.what() << "\n";
        return 1;
      }
      spdlog::warn("{}; serving no metrics (give --metrics-listen to choose another address)", e.what());
    }
  }
  btx::scheduler::Scheduler scheduler(cfg, *(*db)->store, clock, (*db)->conninfo, &registry);
  auto port = scheduler.Start();
  if (!port.ok()) {
    std::cerr << "btx-scheduler: " << port.status().message() << "\n";
    return 1;
  }
  spdlog::info("btx-scheduler listening on port {}", *port);
  if (!port_file.empty()) WritePortFile(port_file, *port);
  std::atomic<bool> resync_stop{false};
  // Clocks drift; a failed re-sync keeps the last offset (the next one retries).
  std::thread resync([&] {
    for (int i = 0; !resync_stop.load(); ++i) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      if (i % 60 == 59) (void)clock.Sync();
    }
  });
  g_scheduler = &scheduler;
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  scheduler.Wait();
  scheduler.Shutdown();
  resync_stop = true;
  resync.join();
  return 0;
}
