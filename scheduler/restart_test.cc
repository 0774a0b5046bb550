// Kill -9 of a real btx-scheduler process while workers claim and complete, restart against the
// same database and port file: the run continues and finishes with nothing lost and nothing
// completed twice.
#include <signal.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/cleanup/cleanup.h"
#include <gtest/gtest.h>
#include <httplib.h>

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "pg_fixture.h"
#include "test_util.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
using testing::PollUntil;
using testing::QueryInt;
namespace v1 = btx::v1;

// Where the scheduler is now, as its port file says; workers re-read it when calls fail.
class Endpoint {
 public:
  explicit Endpoint(std::string port_file) : port_file_(std::move(port_file)) {}
  // The stub for the current port, or null while there is no port file.
  std::shared_ptr<v1::WorkerService::Stub> Workers() {
    std::ifstream in(port_file_);
    int port = 0;
    if (!(in >> port) || port <= 0) return nullptr;
    std::lock_guard lock(mu_);
    if (port != port_) {
      port_ = port;
      auto channel = grpc::CreateChannel(Cat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
      workers_ = v1::WorkerService::NewStub(channel);
      pipelines_ = v1::PipelineService::NewStub(channel);
    }
    return workers_;
  }
  std::shared_ptr<v1::PipelineService::Stub> Pipelines() {
    Workers();
    std::lock_guard lock(mu_);
    return pipelines_;
  }

 private:
  std::string port_file_;
  std::mutex mu_;
  int port_ = 0;
  std::shared_ptr<v1::WorkerService::Stub> workers_;
  std::shared_ptr<v1::PipelineService::Stub> pipelines_;
};

void WithDeadline(grpc::ClientContext& ctx, std::chrono::milliseconds d) {
  ctx.set_deadline(std::chrono::system_clock::now() + d);
}

std::string ReadAll(const std::string& path) {
  auto s = ReadFile(path);
  return s.ok() ? *s : "";
}

TEST(RestartTest, KilledSchedulerRestartsAndTheRunFinishesExactlyOnce) {
  const std::string conninfo = btx::testing::NewMigratedDatabase();
  auto dir = MakeTempDir("btx-restart-test-");
  ASSERT_TRUE(dir.ok());
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(*dir); };
  const std::string port_file = *dir + "/port", metrics_port_file = *dir + "/metrics-port", log = *dir + "/scheduler.log";
  ProcessSpec spec;
  spec.argv = {BTX_SCHEDULER_BIN, "--listen", "127.0.0.1:0", "--port-file", port_file, "--database-url", conninfo,
               "--artifact-root", "file://" + *dir + "/artifacts", "--metrics-listen", "127.0.0.1:0",
               "--metrics-port-file", metrics_port_file, "--lease-seconds", "3",
               "--heartbeat-seconds", "1"};
  spec.stdout_path = log;
  spec.stderr_path = log;
  PosixProcessLauncher launcher;
  auto proc = launcher.Launch(spec);
  ASSERT_TRUE(proc.ok()) << proc.status();
  Endpoint endpoint(port_file);
  ASSERT_TRUE(PollUntil([&] { return std::filesystem::exists(port_file); }, 60s)) << ReadAll(log);

  int total_jobs = 0;
  for (int i = 0; i < 30; ++i) {
    grpc::ClientContext ctx;
    WithDeadline(ctx, 10s);
    v1::SubmitRequest req;
    req.set_spec(testing::kDagSpec);
    v1::SubmitResponse resp;
    auto st = endpoint.Pipelines()->Submit(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    total_jobs += resp.pipeline().jobs_size();
  }
  {
    storage::ConnectionPool pool(conninfo, 1);
    storage::Store store(pool);
    storage::NewPipeline p{.name = "wide", .spec_json = "{}"};
    for (int j = 0; j < 150; ++j) p.jobs.push_back({.name = Cat("job-", j), .kind = "branch"});
    ASSERT_TRUE(store.CreatePipeline(p, SystemClock().Now()).ok());
    total_jobs += 150;
  }

  std::mutex mu;
  std::map<std::pair<std::string, int>, std::string> holder;  // (job, attempt) -> worker
  std::map<std::string, int> completions_ok;
  int duplicates = 0;
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < 16; ++w) {
    threads.emplace_back([&, w] {
      std::string worker_id;
      // Every call is retried until the scheduler answers: it may be dead or restarting.
      auto call = [&](const std::function<grpc::Status(v1::WorkerService::Stub&)>& rpc) {
        while (!done) {
          auto stub = endpoint.Workers();
          if (stub) {
            auto st = rpc(*stub);
            if (st.error_code() != grpc::StatusCode::UNAVAILABLE && st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED &&
                st.error_code() != grpc::StatusCode::CANCELLED) {
              return st;
            }
          }
          std::this_thread::sleep_for(20ms);  // back-off between reconnects, not a wait for state
        }
        return grpc::Status(grpc::StatusCode::CANCELLED, "test over");
      };
      v1::RegisterRequest reg;
      reg.set_name(Cat("worker-", w));
      v1::RegisterResponse reg_resp;
      if (!call([&](auto& s) {
             grpc::ClientContext ctx;
             WithDeadline(ctx, 5s);
             return s.Register(&ctx, reg, &reg_resp);
           }).ok()) {
        return;
      }
      worker_id = reg_resp.worker_id();
      while (!done) {
        v1::AcquireJobRequest req;
        req.set_worker_id(worker_id);
        req.set_wait_timeout_ms(300);
        v1::AcquireJobResponse resp;
        if (!call([&](auto& s) {
               grpc::ClientContext ctx;
               WithDeadline(ctx, 5s);
               return s.AcquireJob(&ctx, req, &resp);
             }).ok() ||
            !resp.has_job()) {
          continue;
        }
        const auto job = resp.job();
        {
          std::lock_guard lock(mu);
          duplicates += !holder.emplace(std::make_pair(job.job_id(), job.attempt()), worker_id).second;
        }
        // A heartbeat stands in for the work, then the fenced completion.
        v1::HeartbeatRequest hb;
        hb.set_worker_id(worker_id);
        auto* rep = hb.add_jobs();
        rep->set_job_id(job.job_id());
        rep->set_attempt(job.attempt());
        rep->mutable_progress()->set_step(1);
        rep->mutable_progress()->set_total_steps(1);
        v1::HeartbeatResponse hb_resp;
        call([&](auto& s) {
          grpc::ClientContext ctx;
          WithDeadline(ctx, 5s);
          return s.Heartbeat(&ctx, hb, &hb_resp);
        });
        v1::CompleteRequest c;
        c.set_worker_id(worker_id);
        c.set_job_id(job.job_id());
        c.set_attempt(job.attempt());
        c.set_artifact_uri(job.output_uri());
        v1::CompleteResponse cr;
        const auto st = call([&](auto& s) {
          grpc::ClientContext ctx;
          WithDeadline(ctx, 5s);
          return s.Complete(&ctx, c, &cr);
        });
        // FAILED_PRECONDITION: the completion committed before the kill and its answer was lost,
        // or the lease expired during the outage; either way the job is not completed twice.
        std::lock_guard lock(mu);
        if (st.ok()) ++completions_ok[job.job_id()];
      }
    });
  }

  // Kill while the run is in full swing.
  const int64_t kill_at = total_jobs * 3 / 10;
  ASSERT_TRUE(PollUntil([&] { return QueryInt(conninfo, "SELECT count(*) FROM jobs WHERE state = 'SUCCEEDED'") >= kill_at; },
                        120s, 5ms));
  (*proc)->Signal(SIGKILL);
  EXPECT_EQ((*proc)->Wait(), 128 + SIGKILL);
  const int64_t running_at_kill = QueryInt(conninfo, "SELECT count(*) FROM pipelines WHERE state = 'RUNNING'");
  const int64_t succeeded_at_kill = QueryInt(conninfo, "SELECT count(*) FROM jobs WHERE state = 'SUCCEEDED'");
  std::filesystem::remove(port_file);
  std::filesystem::remove(metrics_port_file);
  auto again = launcher.Launch(spec);
  ASSERT_TRUE(again.ok()) << again.status();

  const bool finished = PollUntil(
      [&] { return QueryInt(conninfo, "SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'") == 0; }, 180s, 50ms);
  done = true;
  for (auto& t : threads) t.join();
  // The restarted daemon's gauges come from the database: they show the whole run, not just what
  // it served itself (refreshed every few seconds, hence polled).
  std::string scrape;
  const bool gauges_caught_up = finished && PollUntil(
      [&] {
        std::ifstream in(metrics_port_file);
        int port = 0;
        if (!(in >> port)) return false;
        httplib::Client http("127.0.0.1", port);
        auto res = http.Get("/metrics");
        if (!res || res->status != 200) return false;
        scrape = res->body;
        auto m = testing::ParseExposition(scrape);
        return m["btx_jobs{state=\"SUCCEEDED\",kind=\"branch\"}"] == 30 * 2 + 150 &&
               m["btx_pipelines{state=\"SUCCEEDED\"}"] == 31 && m["btx_pipelines{state=\"RUNNING\"}"] == 0;
      },
      30s, 100ms);
  EXPECT_TRUE(gauges_caught_up) << scrape;
  (*again)->Signal(SIGTERM);
  EXPECT_EQ((*again)->Wait(), 0) << ReadAll(log);
  ASSERT_TRUE(finished) << ReadAll(log);
  EXPECT_GT(running_at_kill, 0) << "the kill came after the run had finished";
  EXPECT_LT(succeeded_at_kill, total_jobs);

  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM pipelines WHERE state <> 'SUCCEEDED'"), 0);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM jobs"), total_jobs);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'"), 0);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM job_attempts WHERE outcome = 'SUCCEEDED'"), total_jobs);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(DISTINCT job_id) FROM job_attempts WHERE outcome = 'SUCCEEDED'"), total_jobs);
  EXPECT_EQ(duplicates, 0);
  for (const auto& [job, n] : completions_ok) EXPECT_EQ(n, 1) << job;
  // Every attempt a worker received is the one the database recorded for it. (The database may
  // hold a few more: claims whose answer died with the killed process; their leases expired.)
  {
    pqxx::connection conn(conninfo);
    pqxx::nontransaction tx(conn);
    std::map<std::pair<std::string, int>, std::string> recorded;
    for (const auto& r : tx.exec("SELECT job_id, attempt, worker_id FROM job_attempts")) {
      recorded[{r[0].as<std::string>(), r[1].as<int>()}] = r[2].as<std::string>();
    }
    for (const auto& [key, worker] : holder) {
      auto it = recorded.find(key);
      ASSERT_NE(it, recorded.end()) << "attempt " << key.second << " of " << key.first << " was never recorded";
      EXPECT_EQ(it->second, worker);
    }
    EXPECT_LE(recorded.size() - holder.size(), 16u) << "at most one lost claim per worker";
  }
}

}  // namespace
}  // namespace btx::scheduler
