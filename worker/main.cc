// btx-worker: the composition root of the worker daemon.
#include <sys/prctl.h>

#include <atomic>
#include <csignal>
#include <fstream>
#include <iostream>
#include <optional>
#include <thread>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "btx/common/secrets.h"
#include "btx/common/tls.h"
#include "btx/metrics/exposer.h"
#include "btx/metrics/metrics.h"
#include "btx/worker/worker.h"

namespace {

// "host:port" → (host, port); port 0 picks one. Empty = off.
bool ParseListen(const std::string& s, std::string& host, int& port) {
  const auto colon = s.rfind(':');
  if (colon == std::string::npos) return false;
  host = s.substr(0, colon);
  try {
    port = std::stoi(s.substr(colon + 1));
  } catch (...) {
    return false;
  }
  return port >= 0 && port < 65536 && !host.empty();
}

}  // namespace

int main(int argc, char** argv) {
  // Signals are taken synchronously by one thread (below): blocked before anything can start a thread
  // (gRPC does, when credentials are made), since a thread without the mask would take SIGTERM and die
  // of it instead of draining.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // The jobs run as this user: without this, any of them could read the token and the TLS key out of
  // /proc/<worker>/{environ,mem,fd}. (Also: no core dumps of the worker.)
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  // Out of the environment before anything else runs: children never get it, and /proc shows it no more.
  std::optional<std::string> env_token = btx::TakeSecretFromEnvironment("BTX_WORKER_TOKEN");

  CLI::App app{"btx-worker: runs BTX pipeline jobs leased from a btx-scheduler"};
  btx::worker::WorkerConfig cfg;
  cfg.discover_capabilities = btx::worker::DiscoverCapabilities;
  // /metrics is plain HTTP without authentication: this machine only, unless an address is given.
  std::string scheduler = "127.0.0.1:50051", metrics_listen = "127.0.0.1:9091", port_file;
  int64_t stop_grace_s = 60, poll_s = 20, dist_timeout_s = 0, gang_rendezvous_s = 600;
  app.add_option("--scheduler", scheduler, "scheduler gRPC address (or env BTX_SCHEDULER)")
      ->envname("BTX_SCHEDULER")
      ->capture_default_str();
  app.add_option("--name", cfg.name, "stable worker name (default: hostname)");
  app.add_option("--slots", cfg.slots, "jobs at once (0 = one per GPU, or 1 without GPUs)")->check(CLI::Range(0, 64));
  app.add_option("--threads-per-job", cfg.threads_per_job, "CPU threads per btx-train child (0 = cores / slots)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--work-dir", cfg.work_dir, "where JOB.json files and attempt logs go");
  app.add_option("--train-binary", cfg.train_binary, "btx-train executable (default: next to btx-worker)");
  app.add_option("--stop-grace-seconds", stop_grace_s, "SIGTERM → SIGKILL grace for a child told to stop")
      ->check(CLI::Range(1, 3600))
      ->capture_default_str();
  app.add_option("--dist-timeout-seconds", dist_timeout_s,
                 "multi-rank jobs: how long a rank waits on a dead or stuck peer (0 = btx-train's default)")
      ->check(CLI::Range(0, 86400))
      ->capture_default_str();
  app.add_option("--advertise-host", cfg.advertise_host,
                 "gang jobs: the address at which the other members' ranks reach this worker's rendezvous store and "
                 "Gloo when it is a gang's node 0 (default: this host's hostname; 127.0.0.1 when every member of a "
                 "gang runs on this machine)");
  app.add_option("--gang-rendezvous-timeout-seconds", gang_rendezvous_s,
                 "gang jobs: how long a member waits for node 0 to report its rendezvous store before its attempt "
                 "fails (retried)")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  app.add_option("--poll-seconds", poll_s, "AcquireJob long-poll timeout")->check(CLI::Range(1, 60))->capture_default_str();
  app.add_option("--metrics-listen", metrics_listen,
                 "host:port for /metrics (empty = off; 0.0.0.0:9091 for Prometheus on another machine)")
      ->capture_default_str();
  app.add_option("--metrics-port-file", port_file, "write the bound metrics port here");
  std::string token_file, token_on_argv;
  app.add_option("--token-file", token_file,
                 "file holding the worker's bearer token (env BTX_WORKER_TOKEN_FILE; or the token itself in env "
                 "BTX_WORKER_TOKEN)")
      ->envname("BTX_WORKER_TOKEN_FILE");
  // Gone: every user of the machine can read a command line (ps). Kept only to say so.
  CLI::Option* token_flag = app.add_option("--token", token_on_argv)->group("");
  btx::tls::ClientOptions tls;
  app.add_option("--tls-ca", tls.ca_file, "connect with TLS, trusting these PEM roots (env BTX_WORKER_TLS_CA)")
      ->envname("BTX_WORKER_TLS_CA");
  app.add_option("--tls-cert", tls.cert_file, "PEM client certificate for mutual TLS (env BTX_WORKER_TLS_CERT)")
      ->envname("BTX_WORKER_TLS_CERT");
  app.add_option("--tls-key", tls.key_file, "PEM private key of --tls-cert (env BTX_WORKER_TLS_KEY)")
      ->envname("BTX_WORKER_TLS_KEY");
  app.add_option("--tls-server-name", tls.server_name, "name to expect in the scheduler's certificate (default: its host)");
  CLI11_PARSE(app, argc, argv);
  if (token_flag->count() > 0) {
    std::cerr << "btx-worker: --token is not accepted: a command line is visible to every user of the machine. "
                 "Put the token in a file readable only by the worker and give --token-file FILE, or set "
                 "BTX_WORKER_TOKEN in its environment.\n";
    return 2;
  }
  if (!token_file.empty()) {
    if (env_token) {
      std::cerr << "btx-worker: both --token-file (or BTX_WORKER_TOKEN_FILE) and BTX_WORKER_TOKEN are set; give one\n";
      return 2;
    }
    std::string warning;
    auto token = btx::ReadSecretFile(token_file, &warning);
    if (!token.ok()) {
      std::cerr << "btx-worker: " << token.status().message() << "\n";
      return 2;
    }
    if (!warning.empty()) spdlog::warn("{}", warning);
    cfg.bearer_token = *std::move(token);
  } else if (env_token) {
    cfg.bearer_token = *std::move(env_token);
  }
  cfg.stop_grace = std::chrono::seconds(stop_grace_s);
  cfg.dist_timeout = std::chrono::seconds(dist_timeout_s);
  cfg.gang_rendezvous_timeout = std::chrono::seconds(gang_rendezvous_s);
  cfg.poll_wait = std::chrono::seconds(poll_s);

  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  // gRPC's default reconnect backoff grows to 120 s; a restarted scheduler should get its workers back in
  // seconds, well inside a job's lease.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 5000);
  if (!tls.server_name.empty() && !tls.enabled()) {
    std::cerr << "btx-worker: --tls-server-name needs TLS: give --tls-ca\n";
    return 2;
  }
  // Checked before anything starts: a bad file would otherwise show only as endless reconnects.
  auto credentials = btx::tls::ChannelCredentials(tls, args);
  if (!credentials.ok()) {
    std::cerr << "btx-worker: " << credentials.status().message() << "\n";
    return 2;
  }
  if (!tls.enabled()) {
    if (!btx::tls::IsLocalAddress(scheduler)) {
      spdlog::warn("connecting to {} without TLS{}; give --tls-ca (and --tls-cert/--tls-key) for a scheduler on another machine",
                   scheduler, cfg.bearer_token.empty() ? "" : ": the token travels in plain text");
    }
  } else if (tls.cert_file.empty() && cfg.bearer_token.empty()) {
    spdlog::warn("TLS without a client certificate or a token (--token-file, BTX_WORKER_TOKEN): the scheduler will "
                 "refuse this worker if it authenticates");
  }

  btx::metrics::Registry registry;
  std::unique_ptr<btx::metrics::Exposer> exposer;
  if (!metrics_listen.empty()) {
    std::string host;
    int port = 0;
    if (!ParseListen(metrics_listen, host, port)) {
      std::cerr << "btx-worker: --metrics-listen '" << metrics_listen << "': expected host:port\n";
      return 2;
    }
    try {
      exposer = std::make_unique<btx::metrics::Exposer>(registry, host, port);
    } catch (const std::exception& e) {
      std::cerr << "btx-worker: " << e.what() << "\n";
      return 1;
    }
    spdlog::info("metrics on {}:{}/metrics", host, exposer->port());
    if (!port_file.empty()) {
      std::ofstream(port_file + ".tmp") << exposer->port() << "\n";
      std::rename((port_file + ".tmp").c_str(), port_file.c_str());
    }
  }
  registry.AddGauge("btx_build_info", "build of this daemon", {"version", "component"}).WithLabels({"0.1.0", "worker"}).Set(1);

  auto channel = grpc::CreateCustomChannel(scheduler, *credentials, args);
  btx::PosixProcessLauncher launcher;
  btx::SystemClock clock;
  btx::worker::Worker worker(cfg, channel, launcher, clock, &registry);

  std::atomic<bool> signalled{false};
  std::thread signal_thread([&] {
    for (int n = 0;; ++n) {
      int sig = 0;
      if (sigwait(&signals, &sig) != 0) continue;
      if (sig == SIGUSR1) return;  // shutdown of this thread after Run returned
      signalled = true;
      if (n == 0) {
        spdlog::info("signal {}: draining (running jobs checkpoint, then exit); signal again to kill them", sig);
        worker.Drain();
      } else {
        spdlog::warn("signal {}: stopping now", sig);
        worker.Stop();
      }
    }
  });
  worker.Run();
  pthread_kill(signal_thread.native_handle(), SIGUSR1);
  signal_thread.join();
  // Run() returns unregistered, without a signal, only when the scheduler refused this worker
  // (credentials, role): a failure for the service manager to see.
  const bool refused = worker.worker_id().empty() && !signalled;
  spdlog::info("btx-worker exiting");
  return refused ? 1 : 0;
}
