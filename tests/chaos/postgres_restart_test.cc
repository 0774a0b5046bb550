// PostgreSQL stopped and started again under load: while two workers train the experts, the
// database goes away (fast shutdown, or immediate, which is a crash as far as the data files are
// concerned) and comes back on the same socket. The scheduler must answer UNAVAILABLE meanwhile,
// not crash; its connection pool, LISTEN connection and the workers must pick up again by
// themselves; and the pipeline must finish with nothing lost and nothing done twice.
#include <iostream>
#include <set>

#include <gtest/gtest.h>

#include "btx/common/clock.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "chaos_util.h"
#include "pg_fixture.h"

namespace btx::chaos {
namespace {
using namespace std::chrono_literals;

grpc::StatusCode GetCode(e2e::Cluster& cluster, const std::string& id) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  v1::GetPipelineRequest req;
  req.set_id(id);
  v1::Pipeline resp;
  return cluster.pipelines().Get(&ctx, req, &resp).error_code();
}

grpc::StatusCode ListJobsCode(e2e::Cluster& cluster, const std::string& id) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  v1::ListJobsRequest req;
  req.set_pipeline_id(id);
  v1::ListJobsResponse resp;
  return cluster.pipelines().ListJobs(&ctx, req, &resp).error_code();
}

class PostgresRestartTest : public ::testing::TestWithParam<bool> {
 protected:
  // A lease far longer than the outage: riding it out must not cost a single attempt.
  PostgresRestartTest() : cluster_({.workers = 2, .lease_seconds = 20, .heartbeat_seconds = 1}) {}
  void SetUp() override {
    data_ = cluster_.dir() + "/data";
    e2e::MakeCorpora(data_, 60000);
    // As in production (durable): what the scheduler acknowledged must survive the immediate stop.
    btx::testing::PgServer::Get().set_synchronous_commit(true);
    auto s = cluster_.Start();
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(QueryInt(cluster_.conninfo(), "SELECT (current_setting('synchronous_commit') = 'on')::int"), 1);
  }
  void TearDown() override {
    // A failed test must not leave the shared server down for whatever runs next in this process.
    (void)btx::testing::PgServer::Get().Start();
    if (HasFailure()) std::cerr << cluster_.DaemonLogs() << "\n";
  }
  e2e::Cluster cluster_;
  std::string data_;
};

TEST_P(PostgresRestartTest, PipelineFinishesExactlyOnceAcrossTheRestart) {
  const bool immediate = GetParam();
  const std::string spec = TinySpec(data_, 6, 150, 20);
  const auto planned = PlannedJobs(cluster_, spec);
  ASSERT_EQ(planned.size(), 6u);
  auto id = cluster_.Submit(spec);
  ASSERT_TRUE(id.ok()) << id.status();

  // Under load: both experts training, one on each worker, each past its first step.
  ASSERT_TRUE(PollUntil(
      [&] {
        auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
        if (!jobs.ok()) return false;
        std::set<std::string> workers;
        for (const auto& j : *jobs) {
          if (j.kind == "branch" && Step(j) >= 1) workers.insert(j.worker_id);
        }
        return workers.size() == 2;
      },
      300s))
      << "the two experts never trained at the same time";

  const auto down_at = std::chrono::steady_clock::now();
  auto stopped = btx::testing::PgServer::Get().Stop(immediate);
  ASSERT_TRUE(stopped.ok()) << stopped;

  // During the outage every call that needs the database is refused as retryable.
  EXPECT_EQ(GetCode(cluster_, *id), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(ListJobsCode(cluster_, *id), grpc::StatusCode::UNAVAILABLE);
  auto lost_submit = cluster_.Submit(spec);
  EXPECT_EQ(lost_submit.status().code(), absl::StatusCode::kUnavailable) << lost_submit.status();
  {
    auto workers = v1::WorkerService::NewStub(
        grpc::CreateChannel(cluster_.scheduler_address(), grpc::InsecureChannelCredentials()));
    auto deadline = [](grpc::ClientContext& ctx) { ctx.set_deadline(std::chrono::system_clock::now() + 20s); };
    const std::string someone = "00000000-0000-4000-8000-000000000001";
    grpc::ClientContext c1, c2, c3;
    deadline(c1);
    deadline(c2);
    deadline(c3);
    v1::AcquireJobRequest acquire;
    acquire.set_worker_id(someone);
    v1::AcquireJobResponse acquired;
    EXPECT_EQ(workers->AcquireJob(&c1, acquire, &acquired).error_code(), grpc::StatusCode::UNAVAILABLE);
    v1::HeartbeatRequest beat;
    beat.set_worker_id(someone);
    v1::HeartbeatResponse beaten;
    EXPECT_EQ(workers->Heartbeat(&c2, beat, &beaten).error_code(), grpc::StatusCode::UNAVAILABLE);
    v1::CompleteRequest complete;
    complete.set_worker_id(someone);
    complete.set_job_id(someone);
    complete.set_attempt(1);
    complete.set_artifact_uri("file://" + cluster_.artifact_root() + "/x");
    v1::CompleteResponse completed;
    EXPECT_EQ(workers->Complete(&c3, complete, &completed).error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  // Both workers have felt it (their heartbeats fail) before the database comes back.
  const bool felt = PollUntil(
      [&] {
        return FileContains(cluster_.dir() + "/worker-0.log", "heartbeat failed") &&
               FileContains(cluster_.dir() + "/worker-1.log", "heartbeat failed");
      },
      30s);
  EXPECT_TRUE(felt) << "the workers never noticed the outage";
  EXPECT_FALSE(cluster_.PollScheduler().has_value()) << "the scheduler died with the database";

  auto started = btx::testing::PgServer::Get().Start();
  ASSERT_TRUE(started.ok()) << started;
  const auto up_at = std::chrono::steady_clock::now();
  // Served again at once, without restarting anything: the scheduler's pooled connections died
  // with the old server, and the pool replaces them instead of failing the next call on each.
  const grpc::StatusCode first = GetCode(cluster_, *id);
  EXPECT_EQ(first, grpc::StatusCode::OK) << "the first call after the restart failed";
  ASSERT_TRUE(PollUntil([&] { return GetCode(cluster_, *id) == grpc::StatusCode::OK; }, 60s, 20ms));
  const auto served_at = std::chrono::steady_clock::now();
  std::cerr << "database down for " << std::chrono::duration<double>(up_at - down_at).count()
            << " s; scheduler serving again " << std::chrono::duration<double>(served_at - up_at).count()
            << " s after the restart\n";

  // The scheduler's LISTEN session (other replicas' wake-ups) is back too.
  EXPECT_TRUE(PollUntil(
      [&] {
        return QueryInt(cluster_.conninfo(),
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'") >= 1;
      },
      30s))
      << "the scheduler never listened again";

  ASSERT_EQ(cluster_.WaitForPipeline(*id, 300s), "SUCCEEDED");
  ExpectCleanFinish(cluster_, *id, planned);
  // The outage was shorter than the lease: no job needed a second attempt.
  for (const auto& a : Attempts(cluster_.conninfo(), *id)) EXPECT_EQ(a.attempt, 1) << a.job << ": retried";
  // The refused submission left nothing behind; no daemon restarted.
  EXPECT_EQ(QueryInt(cluster_.conninfo(), "SELECT count(*) FROM pipelines"), 1);
  EXPECT_FALSE(cluster_.PollScheduler().has_value());
  EXPECT_FALSE(cluster_.PollWorker(0).has_value());
  EXPECT_FALSE(cluster_.PollWorker(1).has_value());
}

// The pool on its own, without traffic during the outage to flush out dead connections: every
// connection it holds idle is broken by the restart, and none of them may cost a caller an error.
TEST(PostgresRestartPoolTest, ConnectionsBrokenByARestartAreReplacedNotHandedOut) {
  const std::string conninfo = btx::testing::NewMigratedDatabase();
  constexpr int kSize = 4;
  storage::ConnectionPool pool(conninfo, kSize);
  storage::Store store(pool);
  auto worker = store.RegisterWorker("w", "host", "{}", "test", SystemClock().Now());
  ASSERT_TRUE(worker.ok()) << worker.status();
  {
    std::vector<storage::ConnectionPool::Lease> all;  // every slot opened, then returned idle
    for (int i = 0; i < kSize; ++i) {
      auto lease = pool.Acquire();
      ASSERT_TRUE(lease.ok()) << lease.status();
      all.push_back(std::move(*lease));
    }
  }
  ASSERT_TRUE(btx::testing::PgServer::Get().Stop(/*immediate=*/false).ok());
  auto started = btx::testing::PgServer::Get().Start();
  ASSERT_TRUE(started.ok()) << started;
  // A claim is a single statement outside a transaction: nothing in the client library retries it.
  for (int i = 0; i < 2 * kSize; ++i) {
    auto claim = store.ClaimJob(*worker, 0, std::chrono::seconds(10), SystemClock().Now());
    EXPECT_TRUE(claim.ok()) << "call " << i << ": " << claim.status();
  }
}

INSTANTIATE_TEST_SUITE_P(StopMode, PostgresRestartTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& info) { return info.param ? "Immediate" : "Fast"; });

}  // namespace
}  // namespace btx::chaos
