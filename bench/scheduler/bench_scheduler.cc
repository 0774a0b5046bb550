// Scheduler throughput: N simulated workers (asynchronous gRPC clients in this process) drain M
// trivial jobs from a real Scheduler on a private PostgreSQL; each worker claims (AcquireJob) and
// at once completes (Complete). The baseline, in the same run and on the same server with the same
// number of database connections, is the bare queue loop a scheduler is built on:
// BEGIN; SELECT ... FOR UPDATE SKIP LOCKED; UPDATE; COMMIT, then an UPDATE marking the row done.
#include <grpcpp/alarm.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <optional>
#include <pqxx/pqxx>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/synchronization/mutex.h"

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/contract/job.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/server.h"
#include "btx/storage/database.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "bench_database.h"

namespace {
using Clock = std::chrono::steady_clock;
namespace v1 = btx::v1;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

struct Result {
  double seconds = 0;
  int64_t jobs = 0;
  std::vector<double> claim_ms;
  int64_t errors = 0;
  double JobsPerSecond() const { return seconds > 0 ? jobs / seconds : 0; }
  double Percentile(double p) {
    if (claim_ms.empty()) return 0;
    std::sort(claim_ms.begin(), claim_ms.end());
    return claim_ms[static_cast<size_t>(p * (claim_ms.size() - 1))];
  }
};

// ---- baseline ----------------------------------------------------------------------------------

Result RunBare(const std::string& conninfo, int jobs, int connections) {
  {
    pqxx::connection c(conninfo);
    pqxx::work tx(c);
    tx.exec("DROP TABLE IF EXISTS bench_queue");
    // The same shape as the claim path of `jobs`: state, priority order, attempt, lease.
    tx.exec("CREATE TABLE bench_queue (id bigserial PRIMARY KEY, state text NOT NULL, priority int NOT NULL DEFAULT 0, "
            "created_at timestamptz NOT NULL DEFAULT now(), attempt int NOT NULL DEFAULT 0, worker int, "
            "lease_deadline timestamptz)");
    tx.exec("CREATE INDEX bench_queue_ready ON bench_queue (priority, created_at) WHERE state = 'READY'");
    tx.exec_params("INSERT INTO bench_queue (state) SELECT 'READY' FROM generate_series(1, $1)", jobs);
    tx.commit();
    pqxx::nontransaction(c).exec("VACUUM ANALYZE bench_queue");
  }
  Result r;
  std::mutex mu;
  std::atomic<int64_t> done{0};
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  std::atomic<int64_t> last_done_ns{0};
  for (int t = 0; t < connections; ++t) {
    threads.emplace_back([&, t] {
      std::vector<double> lat;
      pqxx::connection c(conninfo);
      c.prepare("claim", "SELECT id FROM bench_queue WHERE state = 'READY' ORDER BY priority, created_at LIMIT 1 "
                         "FOR UPDATE SKIP LOCKED");
      c.prepare("lease", "UPDATE bench_queue SET state = 'LEASED', attempt = attempt + 1, worker = $2, "
                         "lease_deadline = now() + interval '30 seconds' WHERE id = $1");
      c.prepare("finish", "UPDATE bench_queue SET state = 'SUCCEEDED', lease_deadline = NULL WHERE id = $1 AND "
                          "state = 'LEASED' AND worker = $2");
      while (true) {
        const auto t0 = Clock::now();
        int64_t id = 0;
        {
          pqxx::work tx(c);
          auto row = tx.exec_prepared("claim");
          if (row.empty()) break;
          id = row[0][0].as<int64_t>();
          tx.exec_prepared("lease", id, t);
          tx.commit();
        }
        lat.push_back(Ms(Clock::now() - t0));
        pqxx::nontransaction(c).exec_prepared("finish", id, t);
        done++;
        last_done_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
      }
      std::lock_guard lock(mu);
      r.claim_ms.insert(r.claim_ms.end(), lat.begin(), lat.end());
    });
  }
  for (auto& t : threads) t.join();
  r.seconds = last_done_ns / 1e9;
  r.jobs = done;
  return r;
}

// ---- the store alone: the scheduler's claim and complete transactions without gRPC ------------

Result RunStore(btx::storage::Store& store, int threads_n, int jobs) {
  Result r;
  std::mutex mu;
  std::atomic<int64_t> done{0}, errors{0}, last_done_ns{0};
  const auto start = Clock::now();
  btx::SystemClock clock;
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_n; ++t) {
    threads.emplace_back([&, t] {
      auto id = store.RegisterWorker(btx::Cat("store-", t), "bench", "{}", "", clock.Now());
      if (!id.ok()) {
        ++errors;
        return;
      }
      std::vector<double> lat;
      while (done < jobs) {
        const auto t0 = Clock::now();
        auto c = store.ClaimJob(*id, 0, std::chrono::seconds(60), clock.Now());
        if (!c.ok()) {
          ++errors;
          continue;
        }
        if (!c->has_value()) break;
        lat.push_back(Ms(Clock::now() - t0));
        if (!store.CompleteJob(*id, (*c)->job.id, (*c)->job.attempt, "file:///x", "", clock.Now()).ok()) ++errors;
        ++done;
        last_done_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
      }
      std::lock_guard lock(mu);
      r.claim_ms.insert(r.claim_ms.end(), lat.begin(), lat.end());
    });
  }
  for (auto& t : threads) t.join();
  r.seconds = last_done_ns / 1e9;
  r.jobs = done;
  r.errors = errors;
  return r;
}

// ---- scheduler -------------------------------------------------------------------------------

struct SimWorker {
  std::string id;
  std::unique_ptr<v1::WorkerService::Stub> stub;
  bool completing = false;
  bool waiting = false;           // open loop: its alarm is set for the next claim's scheduled time
  Clock::time_point sent;
  Clock::time_point next_at;      // open loop: when its next claim is due
  grpc::Alarm alarm;
  std::unique_ptr<grpc::ClientContext> ctx;
  v1::AcquireJobResponse acquired;
  v1::CompleteResponse completed;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::AcquireJobResponse>> acquire_call;
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::CompleteResponse>> complete_call;
};

// rpc_only: every AcquireJob names a worker id that is not a UUID, which the scheduler refuses before any
// database work; `jobs` answers are counted. What is left is the cost of a gRPC call.
// offered_rate > 0: open loop. Claims are due at that rate in all (each worker one every workers/rate seconds,
// the workers' schedules evenly staggered), whatever the answers take; a claim's latency counts from when it was
// due, so a scheduler that falls behind its load is charged for the wait too (no coordinated omission).
Result RunScheduler(int port, int workers, int jobs, int client_threads, int connections, bool rpc_only = false,
                    double offered_rate = 0) {
  // By default one channel (one TCP connection) per worker, as separate worker processes have.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (int i = 0; i < connections; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("btx_bench_channel", i);  // distinct args: no subchannel sharing
    channels.push_back(grpc::CreateCustomChannel(btx::Cat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args));
  }
  std::vector<std::unique_ptr<SimWorker>> sims;
  for (int i = 0; i < workers; ++i) {
    auto w = std::make_unique<SimWorker>();
    w->stub = v1::WorkerService::NewStub(channels[i % channels.size()]);
    grpc::ClientContext ctx;
    v1::RegisterRequest req;
    req.set_name(btx::Cat("sim-", i));
    req.mutable_capabilities()->set_slots(1);
    v1::RegisterResponse resp;
    auto st = w->stub->Register(&ctx, req, &resp);
    if (!st.ok()) throw std::runtime_error("register: " + st.error_message());
    w->id = resp.worker_id();
    sims.push_back(std::move(w));
  }

  Result r;
  std::mutex mu;
  std::atomic<int64_t> done{0}, errors{0};
  std::atomic<int64_t> last_done_ns{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < client_threads; ++t) {
    threads.emplace_back([&, t] {
      grpc::CompletionQueue cq;
      std::vector<double> lat;
      int active = 0;
      const auto period = std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(offered_rate > 0 ? workers / offered_rate : 0));
      auto acquire = [&](SimWorker* w) {
        w->completing = false;
        w->waiting = false;
        w->ctx = std::make_unique<grpc::ClientContext>();
        v1::AcquireJobRequest req;
        req.set_worker_id(rpc_only ? std::string("not-a-uuid") : w->id);
        req.set_wait_timeout_ms(1000);
        w->acquired.Clear();
        w->sent = offered_rate > 0 ? w->next_at : Clock::now();
        w->acquire_call = w->stub->PrepareAsyncAcquireJob(w->ctx.get(), req, &cq);
        w->acquire_call->StartCall();
        w->acquire_call->Finish(&w->acquired, &w->status, w);
      };
      auto complete = [&](SimWorker* w) {
        w->completing = true;
        w->ctx = std::make_unique<grpc::ClientContext>();
        v1::CompleteRequest req;
        req.set_worker_id(w->id);
        req.set_job_id(w->acquired.job().job_id());
        req.set_attempt(w->acquired.job().attempt());
        req.set_artifact_uri(w->acquired.job().output_uri());
        w->complete_call = w->stub->PrepareAsyncComplete(w->ctx.get(), req, &cq);
        w->complete_call->StartCall();
        w->complete_call->Finish(&w->completed, &w->status, w);
      };
      // Open loop: the next claim when it is due (at once when already late).
      auto acquire_when_due = [&](SimWorker* w) {
        if (offered_rate <= 0) return acquire(w);
        w->next_at += period;
        if (w->next_at <= Clock::now()) return acquire(w);
        w->waiting = true;
        // gRPC's alarms take the system clock.
        w->alarm.Set(&cq, std::chrono::system_clock::now() + (w->next_at - Clock::now()), w);
      };
      for (size_t i = t; i < sims.size(); i += client_threads) {
        SimWorker* w = sims[i].get();
        w->next_at = start + period * static_cast<int64_t>(i) / workers - period;
        acquire_when_due(w);
        ++active;
      }
      void* tag;
      bool ok;
      while (active > 0 && cq.Next(&tag, &ok)) {
        auto* w = static_cast<SimWorker*>(tag);
        if (w->waiting) {
          acquire(w);
          continue;
        }
        if (!w->completing) {
          if (w->status.ok() && w->acquired.has_job()) {
            lat.push_back(Ms(Clock::now() - w->sent));
            complete(w);
            continue;
          }
          if (rpc_only) {
            if (w->status.error_code() != grpc::StatusCode::INVALID_ARGUMENT) ++errors;
            ++done;
            last_done_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
          } else if (!w->status.ok()) {
            ++errors;
          }
        } else {
          if (w->status.ok()) {
            ++done;
            last_done_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
          } else {
            ++errors;
          }
        }
        if (done < jobs) {
          acquire_when_due(w);
        } else {
          --active;
        }
      }
      cq.Shutdown();
      while (cq.Next(&tag, &ok)) {
      }
      std::lock_guard lock(mu);
      r.claim_ms.insert(r.claim_ms.end(), lat.begin(), lat.end());
    });
  }
  for (auto& t : threads) t.join();
  r.seconds = last_done_ns / 1e9;
  r.jobs = done;
  r.errors = errors;
  return r;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// Submits `jobs` through the store, starts a real Scheduler and drains them with simulated workers
// (or, for phase "store", with the store's transactions alone); nullopt after printing an error.
std::optional<Result> RunSchedulerPhase(const std::string& conninfo, const std::string& dir, const std::string& phase,
                                        int workers, int jobs, int per_pipeline, int connections, int client_threads,
                                        int grpc_connections, int max_batch, int batches_in_flight, bool no_metrics,
                                        double offered_rate = 0) {
  btx::storage::ConnectionPool pool(conninfo, connections);
  btx::storage::Store store(pool);
  const auto now = btx::SystemClock().Now();
  const auto t0 = Clock::now();
  for (int made = 0, p = 0; made < jobs && phase != "rpc"; ++p) {
    btx::storage::NewPipeline np{.name = btx::Cat("bench-", p), .spec_json = "{}"};
    for (int j = 0; j < per_pipeline && made < jobs; ++j, ++made) {
      np.jobs.push_back({.name = btx::Cat("job-", j), .kind = std::string(btx::contract::JobKindName(btx::contract::JobKind::kBranch))});
    }
    // Distinct creation times keep the claim order pipeline by pipeline, as real submissions.
    auto s = store.CreatePipeline(np, now + std::chrono::milliseconds(p));
    if (!s.ok()) {
      std::cerr << s.status() << "\n";
      return std::nullopt;
    }
  }
  const double submit_s = std::chrono::duration<double>(Clock::now() - t0).count();
  {
    pqxx::connection c(conninfo);
    pqxx::nontransaction(c).exec("VACUUM ANALYZE");
  }
  btx::SystemClock clock;
  btx::metrics::Registry registry;
  btx::scheduler::SchedulerConfig cfg;
  cfg.artifact_root = dir + "/artifacts";
  cfg.lease = std::chrono::seconds(60);
  cfg.max_batch = max_batch;
  cfg.batches_in_flight = batches_in_flight;
  btx::scheduler::Scheduler scheduler(cfg, store, clock, conninfo, no_metrics ? nullptr : &registry);
  auto port = scheduler.Start();
  if (!port.ok()) {
    std::cerr << port.status() << "\n";
    return std::nullopt;
  }
  if (phase != "rpc") std::fprintf(stderr, "submitted %d jobs in %.1f s; draining...\n", jobs, submit_s);
  if (phase == "store") {
    auto st = RunStore(store, connections, jobs);
    std::printf("store only (no gRPC): %6.0f jobs/s   claim p50 %6.2f ms  p99 %6.2f ms   (%d threads, %lld errors)\n",
                st.JobsPerSecond(), st.Percentile(0.5), st.Percentile(0.99), connections,
                static_cast<long long>(st.errors));
    return st;
  }
  if (phase == "rpc") {
    Result r = RunScheduler(*port, workers, jobs, client_threads, grpc_connections > 0 ? grpc_connections : workers,
                            /*rpc_only=*/true);
    std::printf("gRPC alone:           %6.0f calls/s   (%d workers, AcquireJob refused before the database, %lld "
                "unexpected answers)\n",
                r.JobsPerSecond(), workers, static_cast<long long>(r.errors));
    return r;
  }
  Result sched = RunScheduler(*port, workers, jobs, client_threads, grpc_connections > 0 ? grpc_connections : workers,
                              /*rpc_only=*/false, offered_rate);
  scheduler.Shutdown();
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  const auto succeeded = tx.exec("SELECT count(*) FROM job_attempts WHERE outcome = 'SUCCEEDED'")[0][0].as<int64_t>();
  const auto distinct = tx.exec("SELECT count(DISTINCT job_id) FROM job_attempts WHERE outcome = 'SUCCEEDED'")[0][0].as<int64_t>();
  std::printf("submit (store, %d pipelines): %.1f s\n", (jobs + per_pipeline - 1) / per_pipeline, submit_s);
  std::printf("scheduler (gRPC%s):%s %6.0f jobs/s   claim p50 %6.2f ms  p99 %6.2f ms   (%d workers, %lld RPC errors, "
              "%lld jobs succeeded once)\n",
              offered_rate > 0 ? ", open loop" : "", offered_rate > 0 ? "" : "     ",
              sched.JobsPerSecond(), sched.Percentile(0.5), sched.Percentile(0.99), workers,
              static_cast<long long>(sched.errors), static_cast<long long>(distinct));
  if (succeeded != jobs || distinct != jobs) {
    std::printf("ERROR: %lld successful attempts for %lld jobs; expected %d\n", static_cast<long long>(succeeded),
                static_cast<long long>(distinct), jobs);
    return std::nullopt;
  }
  return sched;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"btx_bench_scheduler: scheduler jobs/s and claim latency vs a bare SKIP LOCKED loop"};
  int workers = 200, jobs = 20000, per_pipeline = 10, connections = 16, client_threads = 1, grpc_connections = 0;
  int rounds = 3;
  bool durable = false, no_metrics = false;
  double open_fraction = 0, open_seconds = 20;
  btx::scheduler::SchedulerConfig sched_defaults;
  int max_batch = sched_defaults.max_batch, batches_in_flight = sched_defaults.batches_in_flight;
  std::string phase = "both", database_url;
  app.add_option("--workers", workers, "simulated workers")->capture_default_str();
  app.add_option("--jobs", jobs, "jobs to drain")->capture_default_str();
  app.add_option("--jobs-per-pipeline", per_pipeline, "independent jobs per pipeline")->capture_default_str();
  app.add_option("--db-connections", connections, "scheduler pool size = baseline connections")->capture_default_str();
  app.add_option("--client-threads", client_threads, "threads driving the simulated workers")->capture_default_str();
  app.add_option("--grpc-connections", grpc_connections, "TCP connections the workers share (default: one each)");
  app.add_option("--max-batch", max_batch, "claims/completions per database call (1: no batching)")->capture_default_str();
  app.add_option("--batches-in-flight", batches_in_flight, "database calls per kind at once")->capture_default_str();
  app.add_option("--rounds", rounds, "alternating rounds of bare loop and scheduler; figures are their medians")
      ->capture_default_str()
      ->check(CLI::Range(1, 50));
  app.add_flag("--durable", durable, "fsync on (default: off, a throwaway cluster)");
  app.add_option("--open-loop", open_fraction,
                 "after the rounds, offer this fraction of the scheduler's median jobs/s as an open-loop load (0: no)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--open-loop-seconds", open_seconds, "length of the open-loop run")->check(CLI::Range(1.0, 3600.0));
  app.add_flag("--no-metrics", no_metrics, "run the scheduler without a metrics registry (to see what metrics cost)");
  app.add_option("--database-url", database_url, "an existing, empty database instead of a private server");
  app.add_option("--phase", phase, "both | scheduler | bare | store (the scheduler's transactions without gRPC) | rpc (gRPC calls "
                 "without the database)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  // As btx-scheduler does: Debian's Abseil checks every Mutex acquisition for lock-order cycles.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  btx::bench::BenchDatabase bench_db;
  if (auto s = btx::bench::OpenBenchDatabase(bench_db, "btx-bench-sched-", database_url, durable, connections); !s.ok()) {
    std::cerr << s << "\n";
    return 1;
  }
  const std::string conninfo = bench_db.db->conninfo;
  const bool pg = bench_db.db->local != nullptr;
  std::printf("btx_bench_scheduler: %d workers, %d jobs (%d per pipeline), %d database connections, %u CPUs\n", workers,
              jobs, per_pipeline, connections, std::thread::hardware_concurrency());
  if (pg) {
    std::printf("PostgreSQL: private LocalPostgres (unix socket), durable=%s%s\n", durable ? "true" : "false",
                durable ? "" : " (fsync off, synchronous_commit off)");
  } else {
    std::printf("PostgreSQL: %s\n", database_url.c_str());
  }

  // Rounds alternate the bare loop and the scheduler on fresh tables: the machine's speed drifts by
  // 10-15% over a minute here, so a ratio is only taken between neighbours, and the median of the
  // rounds' ratios is the figure.
  std::vector<double> ratios, sched_rates, sched_p99;
  for (int round = 1; round <= rounds; ++round) {
    if (rounds > 1) std::printf("round %d of %d\n", round, rounds);
    Result bare, sched;
    if (phase == "both" || phase == "bare") {
      bare = RunBare(conninfo, jobs, connections);
      std::printf("bare SKIP LOCKED loop: %6.0f jobs/s   claim p50 %6.2f ms  p99 %6.2f ms   (%d connections)\n",
                  bare.JobsPerSecond(), bare.Percentile(0.5), bare.Percentile(0.99), connections);
    }
    if (phase == "both" || phase == "scheduler" || phase == "store" || phase == "rpc") {
      if (round > 1) {
        pqxx::connection c(conninfo);
        pqxx::nontransaction(c).exec("TRUNCATE pipelines, workers CASCADE");
      }
      auto r = RunSchedulerPhase(conninfo, bench_db.dir, phase, workers, jobs, per_pipeline, connections, client_threads,
                                 grpc_connections, max_batch, batches_in_flight, no_metrics);
      if (!r) return 1;
      sched = *r;
      sched_rates.push_back(sched.JobsPerSecond());
      sched_p99.push_back(sched.Percentile(0.99));
    }
    if (phase == "both") {
      ratios.push_back(sched.JobsPerSecond() / bare.JobsPerSecond());
      std::printf("ratio scheduler / bare: %.2f\n", ratios.back());
    }
  }
  if (phase == "both") {
    const double ratio = Median(ratios), rate = Median(sched_rates), p99 = Median(sched_p99);
    if (rounds > 1) {
      std::printf("median of %d rounds: scheduler %.0f jobs/s, claim p99 %.2f ms, ratio %.2f (min %.2f, max %.2f)\n",
                  rounds, rate, p99, ratio, *std::min_element(ratios.begin(), ratios.end()),
                  *std::max_element(ratios.begin(), ratios.end()));
    }
    std::printf("targets: >= 2000 jobs/s %s; >= 0.5 of bare %s (closed-loop p99 %.2f ms: workers claim again at once, "
                "so it is queueing at saturation, not the latency of a load)\n",
                rate >= 2000 ? "met" : "MISSED", ratio >= 0.5 ? "met" : "MISSED", p99);
  }
  if (open_fraction > 0 && !sched_rates.empty()) {
    const double offered = open_fraction * Median(sched_rates);
    const int open_jobs = static_cast<int>(offered * open_seconds);
    std::printf("open loop: %.0f jobs/s offered (%.2f of the median %.0f jobs/s) for %.0f s, %d jobs\n", offered,
                open_fraction, Median(sched_rates), open_seconds, open_jobs);
    {
      pqxx::connection c(conninfo);
      pqxx::nontransaction(c).exec("TRUNCATE pipelines, workers CASCADE");
    }
    auto r = RunSchedulerPhase(conninfo, bench_db.dir, "scheduler", workers, open_jobs, per_pipeline, connections, client_threads,
                               grpc_connections, max_batch, batches_in_flight, no_metrics, offered);
    if (!r) return 1;
    std::printf("target (open loop at %.2f of the maximum): claim p99 < 20 ms %s (%.2f ms, from each claim's due time)\n",
                open_fraction, r->Percentile(0.99) < 20 ? "met" : "MISSED", r->Percentile(0.99));
  }
  return 0;
}
