// Two scheduler replicas on one database, many workers claiming from both at once: no attempt is
// ever handed to two workers and every job succeeds exactly once, through retries and expired
// leases. Real PostgreSQL, real gRPC over loopback, real clock (short leases and backoffs).
#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "btx/metrics/metrics.h"
#include "btx/scheduler/server.h"
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

struct Replica : testing::SchedulerStack {
  Replica(const std::string& conninfo, const Clock& clock, SchedulerConfig cfg)
      : SchedulerStack(conninfo, 8, clock, std::move(cfg), /*with_metrics=*/true) {}
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::PipelineService::Stub> pipelines;
  std::unique_ptr<v1::WorkerService::Stub> workers;
};

struct Handout {
  std::string job_id;
  int attempt;
  std::string worker_id;
  int replica;
};

TEST(ReplicaTest, ConcurrentWorkersOnTwoReplicasNeverShareAnAttempt) {
  const std::string conninfo = btx::testing::NewMigratedDatabase();
  SystemClock clock;
  SchedulerConfig cfg;
  cfg.artifact_root = "/tmp/btx-test-artifacts";
  cfg.lease = 1500ms;  // abandoned jobs come back quickly
  cfg.reap_interval = 100ms;
  cfg.metrics_refresh = 3600s;
  cfg.retry.base = 20ms;
  std::vector<std::unique_ptr<Replica>> replicas;
  for (int r = 0; r < 2; ++r) {
    replicas.push_back(std::make_unique<Replica>(conninfo, clock, cfg));
    auto port = replicas.back()->scheduler.Start();
    ASSERT_TRUE(port.ok()) << port.status();
    auto& rep = *replicas.back();
    rep.channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials());
    rep.pipelines = v1::PipelineService::NewStub(rep.channel);
    rep.workers = v1::WorkerService::NewStub(rep.channel);
  }

  // DAG pipelines through the API (half on each replica) and wide ones straight into the store,
  // so that many workers race for the same READY rows.
  int total_jobs = 0;
  for (int i = 0; i < 12; ++i) {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_spec(testing::kDagSpec);
    v1::SubmitResponse resp;
    ASSERT_TRUE(replicas[i % 2]->pipelines->Submit(&ctx, req, &resp).ok());
    total_jobs += resp.pipeline().jobs_size();
  }
  // Many small ones too: each ends with siblings completing at the same moment, which is where a
  // pipeline could miss its own completion.
  for (int i = 0; i < 34; ++i) {
    const int width = i < 4 ? 50 : 6;
    storage::NewPipeline p{.name = Cat("wide-", i), .spec_json = "{}"};
    for (int j = 0; j < width; ++j) p.jobs.push_back({.name = Cat("job-", j), .kind = "branch"});
    ASSERT_TRUE(replicas[0]->store.CreatePipeline(p, clock.Now()).ok());
    total_jobs += width;
  }

  std::mutex mu;
  std::vector<Handout> handouts;
  std::map<std::string, int> completions_ok;  // job -> Complete calls answered OK
  std::atomic<bool> done{false};
  std::atomic<int> rpc_errors{0};
  constexpr int kWorkers = 24;
  std::vector<std::thread> threads;
  for (int w = 0; w < kWorkers; ++w) {
    threads.emplace_back([&, w] {
      std::string worker_id;
      {
        grpc::ClientContext ctx;
        v1::RegisterRequest req;
        req.set_name(Cat("worker-", w));
        v1::RegisterResponse resp;
        if (!replicas[w % 2]->workers->Register(&ctx, req, &resp).ok()) {
          ++rpc_errors;
          return;
        }
        worker_id = resp.worker_id();
      }
      for (uint64_t call = 0; !done; ++call) {
        // Alternate replicas call by call: claims and completions cross replicas all the time.
        const int r = static_cast<int>((w + call) % 2);
        grpc::ClientContext ctx;
        v1::AcquireJobRequest req;
        req.set_worker_id(worker_id);
        req.set_wait_timeout_ms(200);
        v1::AcquireJobResponse resp;
        if (!replicas[r]->workers->AcquireJob(&ctx, req, &resp).ok()) {
          ++rpc_errors;
          continue;
        }
        if (!resp.has_job()) continue;
        const auto& job = resp.job();
        {
          std::lock_guard lock(mu);
          handouts.push_back({job.job_id(), job.attempt(), worker_id, r});
        }
        const size_t h = std::hash<std::string>{}(job.job_id());
        if (job.attempt() == 1 && h % 10 == 0) {
          grpc::ClientContext fctx;
          v1::FailRequest f;
          f.set_worker_id(worker_id);
          f.set_job_id(job.job_id());
          f.set_attempt(job.attempt());
          f.set_error("transient");
          f.set_retryable(true);
          v1::FailResponse fr;
          if (!replicas[1 - r]->workers->Fail(&fctx, f, &fr).ok()) ++rpc_errors;
          continue;
        }
        if (job.attempt() == 1 && h % 10 == 1) continue;  // "crash": the lease must expire
        grpc::ClientContext cctx;
        v1::CompleteRequest c;
        c.set_worker_id(worker_id);
        c.set_job_id(job.job_id());
        c.set_attempt(job.attempt());
        c.set_artifact_uri(job.output_uri());
        v1::CompleteResponse cr;
        const auto st = replicas[1 - r]->workers->Complete(&cctx, c, &cr);
        std::lock_guard lock(mu);
        if (st.ok()) {
          ++completions_ok[job.job_id()];
        } else if (st.error_code() != grpc::StatusCode::FAILED_PRECONDITION) {
          ++rpc_errors;  // fenced refusals are expected only after an expired lease
        }
      }
    });
  }
  const bool finished = PollUntil(
      [&] { return QueryInt(conninfo, "SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'") == 0; }, 120s, 50ms);
  done = true;
  for (auto& t : threads) t.join();
  ASSERT_TRUE(finished) << "jobs still unfinished after 120 s";
  EXPECT_EQ(rpc_errors.load(), 0);

  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM pipelines WHERE state <> 'SUCCEEDED'"), 0);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM jobs"), total_jobs);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM jobs WHERE state <> 'SUCCEEDED'"), 0);
  // Exactly one successful attempt per job, in the audit trail...
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM job_attempts WHERE outcome = 'SUCCEEDED'"), total_jobs);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(DISTINCT job_id) FROM job_attempts WHERE outcome = 'SUCCEEDED'"), total_jobs);
  // ...and as the workers saw it.
  EXPECT_EQ(static_cast<int>(completions_ok.size()), total_jobs);
  for (const auto& [job, n] : completions_ok) EXPECT_EQ(n, 1) << job;

  // Every attempt went to exactly one worker, and the database agrees on which.
  std::map<std::pair<std::string, int>, std::string> holder;
  std::set<int> replicas_used;
  for (const auto& h : handouts) {
    EXPECT_TRUE(holder.emplace(std::make_pair(h.job_id, h.attempt), h.worker_id).second)
        << "attempt " << h.attempt << " of job " << h.job_id << " handed out twice";
    replicas_used.insert(h.replica);
  }
  EXPECT_EQ(replicas_used.size(), 2u);
  EXPECT_EQ(QueryInt(conninfo, "SELECT count(*) FROM job_attempts"), static_cast<int64_t>(handouts.size()));
  {
    pqxx::connection c(conninfo);
    pqxx::nontransaction tx(c);
    for (const auto& r : tx.exec("SELECT job_id, attempt, worker_id FROM job_attempts")) {
      auto it = holder.find({r[0].as<std::string>(), r[1].as<int>()});
      ASSERT_NE(it, holder.end()) << "attempt in the database that no worker received";
      EXPECT_EQ(it->second, r[2].as<std::string>());
    }
  }
  EXPECT_GT(QueryInt(conninfo, "SELECT count(*) FROM job_attempts WHERE outcome = 'FAILED'"), 0);
  EXPECT_GT(QueryInt(conninfo, "SELECT count(*) FROM job_attempts WHERE outcome = 'LEASE_EXPIRED'"), 0);

  // The fleet-wide gauges agree across replicas; counters are per replica and add up.
  std::map<std::string, double> fleet[2];
  double claims = 0;
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(replicas[r]->scheduler.RefreshMetrics().ok());
    for (const auto& [k, v] : testing::ParseExposition(replicas[r]->registry.Serialize())) {
      if (k.rfind("btx_jobs{", 0) == 0 || k.rfind("btx_pipelines{", 0) == 0 || k == "btx_workers_connected") fleet[r][k] = v;
      if (k == "btx_claim_latency_seconds_count") claims += v;
    }
  }
  EXPECT_EQ(fleet[0], fleet[1]);
  EXPECT_EQ(fleet[0]["btx_jobs{state=\"SUCCEEDED\",kind=\"branch\"}"], 12 * 2 + 4 * 50 + 30 * 6);
  EXPECT_EQ(fleet[0]["btx_workers_connected"], kWorkers);
  EXPECT_EQ(claims, static_cast<double>(handouts.size()));
}

}  // namespace
}  // namespace btx::scheduler
