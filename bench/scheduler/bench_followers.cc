// Heartbeats beside Watch/Logs followers: W simulated workers (asynchronous gRPC clients in this
// process) each hold a leased job of a real Scheduler on a private PostgreSQL and heartbeat it,
// with a progress report and a log line, every --heartbeat-ms. The baseline, in the same run, is
// the same heartbeats with no follower; then F followers (Watch of a worker's pipeline, or Logs of
// its job, half each) stream what those heartbeats add while the heartbeats go on. Prints the
// heartbeat round trip (p50/p99) of both phases, their ratio, and the leases that expired.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <pqxx/pqxx>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/synchronization/mutex.h"

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/contract/job.h"
#include "btx/scheduler/server.h"
#include "btx/storage/database.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "bench_database.h"
#include "../../scheduler/follow.h"

namespace {
using Clock = std::chrono::steady_clock;
namespace v1 = btx::v1;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * (v.size() - 1))];
}

struct Worker {
  std::string id, job_id, pipeline_id;
  int attempt = 0;
  int64_t step = 0;
  bool in_flight = false;
  Clock::time_point due, sent;
  std::unique_ptr<grpc::ClientContext> ctx;
  v1::HeartbeatResponse resp;
  grpc::Status status;
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::HeartbeatResponse>> call;
};

struct Phase {
  std::vector<double> ms;
  int64_t errors = 0, lost = 0;
};

// Every worker heartbeats every `interval` (staggered) for `seconds`, on one client thread.
Phase Heartbeat(std::vector<Worker>& workers, std::vector<std::unique_ptr<v1::WorkerService::Stub>>& stubs,
                std::chrono::milliseconds interval, double seconds) {
  Phase out;
  grpc::CompletionQueue cq;
  const auto start = Clock::now();
  const auto stop = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (size_t i = 0; i < workers.size(); ++i) workers[i].due = start + interval * i / workers.size();
  int in_flight = 0;
  while (true) {
    const auto now = Clock::now();
    for (size_t i = 0; i < workers.size() && now < stop; ++i) {
      Worker& w = workers[i];
      if (w.in_flight || w.due > now) continue;
      w.in_flight = true;
      ++in_flight;
      w.ctx = std::make_unique<grpc::ClientContext>();
      w.ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      v1::HeartbeatRequest req;
      req.set_worker_id(w.id);
      auto* r = req.add_jobs();
      r->set_job_id(w.job_id);
      r->set_attempt(w.attempt);
      auto* p = r->mutable_progress();
      p->set_step(++w.step);
      p->set_total_steps(1000000);
      p->set_loss(2.0);
      auto* line = r->add_logs();
      line->set_stream("stdout");
      line->set_text(btx::Cat("step ", w.step));
      w.resp.Clear();
      w.sent = now;
      w.due = now + interval;
      w.call = stubs[i % stubs.size()]->PrepareAsyncHeartbeat(w.ctx.get(), req, &cq);
      w.call->StartCall();
      w.call->Finish(&w.resp, &w.status, &w);
    }
    if (now >= stop && in_flight == 0) break;
    void* tag;
    bool ok;
    const auto got = cq.AsyncNext(&tag, &ok, std::chrono::system_clock::now() + std::chrono::milliseconds(2));
    if (got != grpc::CompletionQueue::GOT_EVENT) continue;
    auto* w = static_cast<Worker*>(tag);
    w->in_flight = false;
    --in_flight;
    out.ms.push_back(Ms(Clock::now() - w->sent));
    if (!w->status.ok()) {
      ++out.errors;
    } else if (w->resp.jobs_size() != 1 || w->resp.jobs(0).directive() != v1::JOB_DIRECTIVE_CONTINUE) {
      ++out.lost;
    }
  }
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  return out;
}

// F streaming followers on their own thread; counts what they receive.
class FollowerLoad {
 public:
  FollowerLoad(int port, int followers, const std::vector<Worker>& workers) {
    for (int c = 0; c < 20; ++c) {
      grpc::ChannelArguments args;
      args.SetInt("btx_bench_channel", c);  // distinct args: separate TCP connections
      stubs_.push_back(v1::PipelineService::NewStub(
          grpc::CreateCustomChannel(btx::Cat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args)));
    }
    for (int i = 0; i < followers; ++i) streams_.push_back(std::make_unique<Stream>());
    for (int i = 0; i < followers; ++i) {
      Stream& s = *streams_[i];
      // Follower pairs: a Watch of a worker's pipeline and Logs of its job, spread over every worker.
      const Worker& w = workers[(i / 2) % workers.size()];
      auto& stub = *stubs_[i % stubs_.size()];
      if (i % 2 == 0) {
        v1::WatchRequest req;
        req.set_pipeline_id(w.pipeline_id);
        req.set_follow(true);
        s.watch = stub.PrepareAsyncWatch(&s.ctx, req, &cq_);
        s.watch->StartCall(&s);
      } else {
        v1::LogsRequest req;
        req.set_job_id(w.job_id);
        req.set_follow(true);
        s.logs = stub.PrepareAsyncLogs(&s.ctx, req, &cq_);
        s.logs->StartCall(&s);
      }
    }
    thread_ = std::thread([this] { Run(); });
  }
  ~FollowerLoad() {
    for (auto& s : streams_) s->ctx.TryCancel();
    if (thread_.joinable()) thread_.join();
  }
  int64_t messages() const { return messages_; }
  int started() const { return started_; }  // streams that received something
  int failed() const { return failed_; }

 private:
  struct Stream {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientAsyncReader<v1::Event>> watch;
    std::unique_ptr<grpc::ClientAsyncReader<v1::LogLine>> logs;
    v1::Event event;
    v1::LogLine line;
    bool called = false, got = false, finishing = false;
    grpc::Status status;
  };
  void Run() {
    void* tag;
    bool ok;
    int live = static_cast<int>(streams_.size());
    while (live > 0 && cq_.Next(&tag, &ok)) {
      auto* s = static_cast<Stream*>(tag);
      if (s->finishing) {
        if (!s->status.ok() && s->status.error_code() != grpc::StatusCode::CANCELLED) ++failed_;
        --live;
        continue;
      }
      if (!ok) {
        s->finishing = true;
        if (s->watch) s->watch->Finish(&s->status, s);
        else s->logs->Finish(&s->status, s);
        continue;
      }
      // StartCall's completion carries no message; every later one does.
      if (s->called) {
        ++messages_;
        if (!s->got) ++started_;
        s->got = true;
      }
      s->called = true;
      if (s->watch) s->watch->Read(&s->event, s);
      else s->logs->Read(&s->line, s);
    }
    cq_.Shutdown();
    while (cq_.Next(&tag, &ok)) {
    }
  }

  std::vector<std::unique_ptr<v1::PipelineService::Stub>> stubs_;
  grpc::CompletionQueue cq_;
  std::vector<std::unique_ptr<Stream>> streams_;
  std::atomic<int64_t> messages_{0};
  std::atomic<int> started_{0}, failed_{0};
  std::thread thread_;
};

int64_t Count(const std::string& conninfo, const std::string& sql) {
  pqxx::connection c(conninfo);
  return pqxx::nontransaction(c).exec(sql)[0][0].as<int64_t>();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"btx_bench_followers: heartbeat latency and lease expiries with and without Watch/Logs followers"};
  int workers_n = 200, followers_n = 2000, connections = 16, heartbeat_ms = 1000, lease_s = 10;
  double seconds = 20;
  btx::scheduler::SchedulerConfig defaults;
  int follower_connections = defaults.follower_db_connections;
  bool durable = false;
  app.add_option("--workers", workers_n, "simulated workers, each heartbeating one leased job")->capture_default_str();
  app.add_option("--followers", followers_n, "Watch/Logs streams (half each) in the second phase")->capture_default_str();
  app.add_option("--seconds", seconds, "length of each phase")->capture_default_str();
  app.add_option("--heartbeat-ms", heartbeat_ms, "each worker's heartbeat interval")->capture_default_str();
  app.add_option("--lease-seconds", lease_s, "lease duration")->capture_default_str();
  app.add_option("--db-connections", connections, "the scheduler's pool (heartbeats, claims)")->capture_default_str();
  app.add_option("--follower-db-connections", follower_connections, "the followers' own pool")->capture_default_str();
  app.add_flag("--durable", durable, "fsync on (default: off, a throwaway cluster)");
  CLI11_PARSE(app, argc, argv);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  btx::bench::BenchDatabase bench_db;
  if (auto s = btx::bench::OpenBenchDatabase(bench_db, "btx-bench-follow-", "", durable, connections); !s.ok()) {
    std::cerr << s << "\n";
    return 1;
  }
  const std::string conninfo = bench_db.db->conninfo;
  std::printf("btx_bench_followers: %d workers heartbeating every %d ms (lease %d s), %d followers, %d + %d database "
              "connections, %u CPUs, durable=%s\n",
              workers_n, heartbeat_ms, lease_s, followers_n, connections, follower_connections,
              std::thread::hardware_concurrency(), durable ? "true" : "false");

  btx::storage::ConnectionPool pool(conninfo, connections);
  btx::storage::Store store(pool);
  const auto now = btx::SystemClock().Now();
  for (int p = 0; p < workers_n; ++p) {
    btx::storage::NewPipeline np{.name = btx::Cat("bench-", p), .spec_json = "{}"};
    np.jobs.push_back({.name = "job", .kind = std::string(btx::contract::JobKindName(btx::contract::JobKind::kBranch))});
    if (auto s = store.CreatePipeline(np, now + std::chrono::milliseconds(p)); !s.ok()) {
      std::cerr << s.status() << "\n";
      return 1;
    }
  }
  btx::SystemClock clock;
  btx::scheduler::SchedulerConfig cfg;
  cfg.artifact_root = bench_db.dir + "/artifacts";
  cfg.lease = std::chrono::seconds(lease_s);
  cfg.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
  cfg.reap_interval = std::chrono::seconds(1);
  // No authentication here: every stream is the one anonymous caller's.
  cfg.max_streams_per_user = cfg.max_streams = std::max(followers_n, 1);
  cfg.follower_db_connections = follower_connections;
  btx::scheduler::Scheduler scheduler(cfg, store, clock, conninfo);
  auto port = scheduler.Start();
  if (!port.ok()) {
    std::cerr << port.status() << "\n";
    return 1;
  }

  std::vector<std::unique_ptr<v1::WorkerService::Stub>> stubs;
  std::vector<Worker> workers(workers_n);
  for (int i = 0; i < workers_n; ++i) {
    grpc::ChannelArguments args;
    args.SetInt("btx_bench_channel", 1000 + i);  // one TCP connection per worker, as separate processes have
    stubs.push_back(v1::WorkerService::NewStub(
        grpc::CreateCustomChannel(btx::Cat("127.0.0.1:", *port), grpc::InsecureChannelCredentials(), args)));
    grpc::ClientContext rctx;
    v1::RegisterRequest reg;
    reg.set_name(btx::Cat("sim-", i));
    reg.mutable_capabilities()->set_slots(1);
    v1::RegisterResponse rresp;
    if (auto st = stubs[i]->Register(&rctx, reg, &rresp); !st.ok()) {
      std::cerr << "register: " << st.error_message() << "\n";
      return 1;
    }
    workers[i].id = rresp.worker_id();
    grpc::ClientContext actx;
    v1::AcquireJobRequest acq;
    acq.set_worker_id(workers[i].id);
    v1::AcquireJobResponse aresp;
    if (auto st = stubs[i]->AcquireJob(&actx, acq, &aresp); !st.ok() || !aresp.has_job()) {
      std::cerr << "acquire: no job for worker " << i << " " << st.error_message() << "\n";
      return 1;
    }
    workers[i].job_id = aresp.job().job_id();
    workers[i].pipeline_id = aresp.job().pipeline_id();
    workers[i].attempt = aresp.job().attempt();
  }

  const auto interval = std::chrono::milliseconds(heartbeat_ms);
  auto report = [&](const char* name, const Phase& ph) {
    std::printf("%-16s %6zu heartbeats  p50 %7.2f ms  p99 %7.2f ms  max %7.2f ms  (%lld errors, %lld not CONTINUE)\n", name,
                ph.ms.size(), Percentile(ph.ms, 0.5), Percentile(ph.ms, 0.99), Percentile(ph.ms, 1.0),
                static_cast<long long>(ph.errors), static_cast<long long>(ph.lost));
  };
  const Phase bare = Heartbeat(workers, stubs, interval, seconds);
  report("no followers:", bare);

  auto* f = scheduler.followers();
  const auto t0 = Clock::now();
  FollowerLoad load(*port, followers_n, workers);
  // The streams are open once each received its first row (every pipeline and job has some by now);
  // heartbeats go on meanwhile, or the leases would lapse while thousands of streams connect.
  Phase opening = Heartbeat(workers, stubs, interval, 0.5);
  while (load.started() + load.failed() < followers_n && Clock::now() - t0 < std::chrono::seconds(120)) {
    Phase more = Heartbeat(workers, stubs, interval, 0.5);
    opening.ms.insert(opening.ms.end(), more.ms.begin(), more.ms.end());
    opening.errors += more.errors;
    opening.lost += more.lost;
  }
  std::printf("%d followers open in %.1f s (%d refused or failed)\n", load.started(),
              std::chrono::duration<double>(Clock::now() - t0).count(), load.failed());
  report("while opening:", opening);
  const int64_t msgs0 = load.messages();
  const uint64_t q0 = f->queries(), r0 = f->feed_reads(), p0 = f->passes();
  const Phase busy = Heartbeat(workers, stubs, interval, seconds);
  const int64_t msgs = load.messages() - msgs0;
  const uint64_t queries = f->queries() - q0, reads = f->feed_reads() - r0, passes = f->passes() - p0;
  report("with followers:", busy);
  std::printf("followers received %lld messages (%.0f/s); follower database statements %llu (%.0f/s): %llu shared "
              "reads over %llu passes, %zu feeds\n",
              static_cast<long long>(msgs), msgs / seconds, static_cast<unsigned long long>(queries), queries / seconds,
              static_cast<unsigned long long>(reads), static_cast<unsigned long long>(passes), f->feeds());
  scheduler.Shutdown();
  const int64_t expired = Count(conninfo, "SELECT count(*) FROM events WHERE type = 'job.lease_expired'");
  const double ratio = Percentile(bare.ms, 0.99) > 0 ? Percentile(busy.ms, 0.99) / Percentile(bare.ms, 0.99) : 0;
  std::printf("heartbeat p99 with / without followers: %.2f; leases expired: %lld\n", ratio,
              static_cast<long long>(expired));
  const bool p99_ok = Percentile(busy.ms, 0.99) < 50, none_expired = expired == 0 && busy.lost == 0 && bare.lost == 0;
  std::printf("targets: heartbeat p99 < 50 ms with followers %s; no lease expires %s\n", p99_ok ? "met" : "MISSED",
              none_expired ? "met" : "MISSED");
  return 0;
}
