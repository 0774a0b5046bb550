// Kills in the middle of a dispatch, at points chosen rather than hoped for: the test holds a row
// lock that the call's transaction needs, waits until PostgreSQL shows the call blocked on it,
// kills the process, then lets go. The call's statement was already sent whole, so the database
// finishes and commits it for a client that no longer exists:
//  1. the scheduler killed while an AcquireJob claim is in flight: the job is leased to a worker that
//     never hears of it; the lease must expire and the job run as attempt 2;
//  2. the scheduler killed while a Complete is in flight: the completion commits, its answer is lost,
//     the worker's retry against the restarted scheduler must not complete the job a second time;
//  3. a worker killed while its Complete is in flight: the job is done once, nothing reruns it.
// (scheduler/restart_test.cc kills the scheduler at a moment chosen by job count, so whether a call
// is in flight then is left to chance.)
#include <signal.h>

#include <filesystem>
#include <iostream>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "chaos_util.h"

namespace btx::chaos {
namespace {
using namespace std::chrono_literals;
namespace fs = std::filesystem;

// Sessions of this database blocked on a row lock while running `function` or its batched form
// (`function` + "s": the scheduler sends calls that arrive together as one).
int64_t BlockedIn(const std::string& conninfo, const std::string& function) {
  return QueryInt(conninfo,
                  "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                  "AND wait_event_type = 'Lock' AND (query LIKE '%' || $1 || '(%' OR query LIKE '%' || $1 || 's(%')",
                  function);
}

// The short lease also lets a lost claim expire soon.
class MidDispatchKillTest : public TwoWorkerChaosTest {
 protected:
  std::string JobState(const std::string& job_id) {
    auto j = cluster_.store().GetJob(job_id);
    return j.ok() ? j->state : "";
  }
  void KillScheduler() {
    cluster_.SignalScheduler(SIGKILL);
    EXPECT_EQ(cluster_.WaitScheduler(), 128 + SIGKILL);
  }
};

TEST_F(MidDispatchKillTest, KillsWithAClaimOrACompletionInFlightLoseNothingAndRepeatNothing) {
  const std::string db = cluster_.conninfo();
  ASSERT_TRUE(PollUntil([&] { return QueryInt(db, "SELECT count(*) FROM workers") == 2; }, 60s));
  // A seed pretrain long enough to hold the pipeline lock before it completes.
  const std::string spec = TinySpec(data_, 200, 8, 20);
  const auto planned = PlannedJobs(cluster_, spec);

  // --- 1. The scheduler dies while claims wait for the workers' rows (the claim's first write).
  pqxx::connection locker(db);
  auto hold_workers = std::make_unique<pqxx::work>(locker);
  hold_workers->exec("SELECT id FROM workers FOR UPDATE");
  auto id = cluster_.Submit(spec);
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(PollUntil([&] { return BlockedIn(db, "btx_claim_job") >= 1; }, 60s, 10ms)) << "no claim in flight";
  KillScheduler();
  hold_workers->commit();
  hold_workers.reset();
  storage::JobRecord seed;
  ASSERT_TRUE(PollUntil(
      [&] {
        auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
        if (!jobs.ok() || jobs->empty()) return false;
        seed = jobs->front();
        return true;
      },
      30s))
      << "the claim in flight did not commit after the scheduler died";
  ASSERT_EQ(seed.kind, "pretrain");
  ASSERT_EQ(seed.attempt, 1);
  ASSERT_TRUE(cluster_.StartScheduler().ok());

  // --- 2. The lost claim's lease expires and attempt 2 runs. The scheduler dies while that
  // attempt's Complete waits for the pipeline lock.
  ASSERT_TRUE(PollUntil(
      [&] {
        auto j = cluster_.store().GetJob(seed.id);
        return j.ok() && j->state == "LEASED" && j->attempt == 2;
      },
      60s, 10ms))
      << "the lease of the lost claim was never reaped";
  auto hold_pipeline = std::make_unique<pqxx::work>(locker);
  hold_pipeline->exec_params("SELECT 1 FROM pipelines WHERE id = $1::uuid FOR NO KEY UPDATE", *id);
  ASSERT_EQ(JobState(seed.id), "LEASED") << "attempt 2 finished before the lock was taken";
  ASSERT_TRUE(PollUntil([&] { return BlockedIn(db, "btx_complete_job") >= 1; }, 120s, 10ms)) << "no completion in flight";
  auto seed_now = cluster_.store().GetJob(seed.id);
  ASSERT_TRUE(seed_now.ok()) << seed_now.status();
  const int seed_worker = WorkerIndex(cluster_, seed_now->worker_id);
  KillScheduler();
  hold_pipeline->abort();
  hold_pipeline.reset();
  EXPECT_TRUE(PollUntil([&] { return JobState(seed.id) == "SUCCEEDED"; }, 30s))
      << "the completion in flight did not commit after the scheduler died";

  // The worker retries its Complete against the restarted scheduler, which refuses it as stale (or
  // it gives up once the lease is over); either way the job stays completed once. Claims wait
  // meanwhile (the workers' rows are held again), so that the only completion in flight in step 3
  // is an expert's.
  pqxx::connection worker_locker(db);
  hold_workers = std::make_unique<pqxx::work>(worker_locker);
  hold_workers->exec("SELECT id FROM workers FOR UPDATE");
  ASSERT_TRUE(cluster_.StartScheduler().ok());
  const std::string seed_log = Cat(cluster_.dir(), "/worker-", seed_worker, ".log");
  EXPECT_TRUE(PollUntil(
      [&] {
        return FileContains(seed_log, Cat("Complete of ", seed.name, " attempt 2 refused")) ||
               FileContains(seed_log, Cat("giving up on Complete of ", seed.name, " attempt 2"));
      },
      60s))
      << "the worker never retried its lost Complete";

  // --- 3. Both experts start; a worker whose Complete waits for the pipeline lock is killed.
  hold_pipeline = std::make_unique<pqxx::work>(locker);
  hold_pipeline->exec_params("SELECT 1 FROM pipelines WHERE id = $1::uuid FOR NO KEY UPDATE", *id);
  hold_workers->commit();
  hold_workers.reset();
  storage::JobRecord finished_branch;
  ASSERT_TRUE(PollUntil(
      [&] {
        // A worker logs that a job ended just before it calls Complete; the last step of the
        // progress reports comes earlier still (btx-train publishes after it), so it cannot tell
        // whose completion is the one blocked. Wait until every expert whose end is logged has its
        // completion blocked: each waits in a database call of its own, as the scheduler runs a
        // call at once while fewer than batches_in_flight are at the database.
        auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
        if (!jobs.ok()) return false;
        std::vector<storage::JobRecord> ended;
        for (const auto& j : *jobs) {
          const int w = WorkerIndex(cluster_, j.worker_id);
          if (j.kind == "branch" && w >= 0 &&
              FileContains(Cat(cluster_.dir(), "/worker-", w, ".log"),
                           Cat(j.name, " attempt ", j.attempt, " ended: exit 0, succeeded"))) {
            ended.push_back(j);
          }
        }
        if (ended.empty() || BlockedIn(db, "btx_complete_job") != static_cast<int64_t>(ended.size())) return false;
        finished_branch = ended.front();
        return true;
      },
      120s, 10ms))
      << "no expert's completion in flight";
  const int killed_worker = WorkerIndex(cluster_, finished_branch.worker_id);
  ASSERT_GE(killed_worker, 0);
  cluster_.SignalWorker(killed_worker, SIGKILL);
  EXPECT_EQ(cluster_.WaitWorker(killed_worker), 128 + SIGKILL);
  hold_pipeline->abort();
  hold_pipeline.reset();

  ASSERT_EQ(cluster_.WaitForPipeline(*id, 300s), "SUCCEEDED");
  ExpectCleanFinish(cluster_, *id, planned);
  const auto attempts = Attempts(db, *id);
  // 1: the claim that died with the scheduler was recorded, expired, and never ran anywhere.
  const auto seed_attempts = AttemptsOf(attempts, seed.name);
  ASSERT_EQ(seed_attempts.size(), 2u);
  EXPECT_EQ(seed_attempts[0].outcome, "LEASE_EXPIRED");
  EXPECT_EQ(seed_attempts[1].outcome, "SUCCEEDED");
  EXPECT_EQ(QueryInt(db, "SELECT count(*) FROM job_logs WHERE job_id = $1::uuid AND attempt = 1", seed.id), 0);
  for (int w = 0; w < 2; ++w) {
    EXPECT_FALSE(fs::exists(Cat(cluster_.dir(), "/work-", w, "/", seed.id, "-attempt-1"))) << "worker " << w;
  }
  // 3: the dead worker's completion stands; nothing was run again. Nor was anything else.
  const auto branch_attempts = AttemptsOf(attempts, finished_branch.name);
  ASSERT_EQ(branch_attempts.size(), 1u);
  EXPECT_EQ(branch_attempts[0].outcome, "SUCCEEDED");
  EXPECT_EQ(branch_attempts[0].worker, finished_branch.worker_id);
  for (const auto& a : attempts) {
    if (a.job != seed.name) {
      EXPECT_EQ(a.attempt, 1) << a.job << " ran again";
    }
  }
}

}  // namespace
}  // namespace btx::chaos
