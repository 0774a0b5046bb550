// A worker that stops responding past its lease — a frozen host, a stuck VM, SIGSTOP — and then
// comes back. Meanwhile the reaper gives its job to the other worker. Once it resumes, nothing it
// says about the old attempt may count: its heartbeat is answered LEASE_LOST, a late Complete or
// Fail is refused with FAILED_PRECONDITION, it kills the trainer it was supervising, and the job's
// result is the new attempt's.
#include <signal.h>

#include <cerrno>
#include <iostream>
#include <regex>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "chaos_util.h"

namespace btx::chaos {
namespace {
using namespace std::chrono_literals;

using e2e::Gone;

// The pid the worker logged for the child it started for `attempt`, or 0 while not yet reported.
pid_t ChildPid(e2e::Cluster& cluster, const std::string& job_id, int attempt) {
  auto logs = cluster.store().LogsAfter(job_id, 0, 10000);
  if (!logs.ok()) return 0;
  static const std::regex kStarted(R"(^started .*btx-train \(pid ([0-9]+)\))");
  for (const auto& l : *logs) {
    std::smatch m;
    if (l.attempt == attempt && std::regex_search(l.line, m, kStarted)) return static_cast<pid_t>(std::stol(m[1]));
  }
  return 0;
}

int64_t LogLines(e2e::Cluster& cluster, const std::string& job_id, int attempt) {
  return QueryInt(cluster.conninfo(), "SELECT count(*) FROM job_logs WHERE job_id = $1::uuid AND attempt = $2", job_id,
                  attempt);
}

class PausedWorkerTest : public TwoWorkerChaosTest {
 protected:
  void TearDown() override {
    // Never leave stopped processes behind a failed assertion.
    if (frozen_) {
      for (int i = 0; i < 2; ++i) cluster_.SignalWorker(i, SIGCONT);
      ::kill(child_, SIGCONT);
    }
    TwoWorkerChaosTest::TearDown();
  }
  pid_t child_ = 0;
  bool frozen_ = false;
};

TEST_F(PausedWorkerTest, LateReportsAreRefusedAndTheStaleTrainerIsKilled) {
  // The seed pretrain is long enough to be caught mid-way and runs alone, so the other worker is
  // idle and takes the job over as soon as the lease is reaped.
  const std::string spec = TinySpec(data_, 600, 8, 20);
  const auto planned = PlannedJobs(cluster_, spec);
  auto id = cluster_.Submit(spec);
  ASSERT_TRUE(id.ok()) << id.status();

  storage::JobRecord victim;
  ASSERT_TRUE(PollUntil(
      [&] {
        auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
        if (!jobs.ok()) return false;
        for (const auto& j : *jobs) {
          if (j.kind == "pretrain" && !j.checkpoint_uri.empty() && Step(j) <= 400) {
            victim = j;
            return true;
          }
        }
        return false;
      },
      300s, 20ms))
      << "the pretrain job never reported a checkpoint mid-way";
  ASSERT_EQ(victim.attempt, 1);
  const int paused = WorkerIndex(cluster_, victim.worker_id);
  ASSERT_GE(paused, 0);
  ASSERT_TRUE(PollUntil([&] { return (child_ = ChildPid(cluster_, victim.id, 1)) > 0; }, 30s));

  // Freeze the worker and its trainer together, as a host freeze would. A trainer left running
  // could finish during the pause, and whether there is a stale trainer to kill on resumption
  // would depend on timing.
  frozen_ = true;
  cluster_.SignalWorker(paused, SIGSTOP);
  ASSERT_EQ(::kill(child_, SIGSTOP), 0) << "btx-train pid " << child_;

  // Past the lease, the reaper requeues the job and the other worker claims attempt 2.
  storage::JobRecord taken;
  ASSERT_TRUE(PollUntil(
      [&] {
        auto j = cluster_.store().GetJob(victim.id);
        if (!j.ok() || j->state != "LEASED" || j->attempt != 2) return false;
        taken = *j;
        return true;
      },
      60s))
      << "the paused worker's lease was never reaped and re-leased";
  EXPECT_NE(taken.worker_id, victim.worker_id);
  auto attempts = AttemptsOf(Attempts(cluster_.conninfo(), *id), victim.name);
  ASSERT_GE(attempts.size(), 1u);
  EXPECT_EQ(attempts[0].outcome, "LEASE_EXPIRED");
  EXPECT_EQ(cluster_.PollWorker(paused), std::nullopt) << "a paused worker is not a dead one";

  // What the paused worker would say for attempt 1 if it were not stopped, said for it.
  auto workers = v1::WorkerService::NewStub(
      grpc::CreateChannel(cluster_.scheduler_address(), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::HeartbeatRequest req;
    req.set_worker_id(victim.worker_id);
    auto* r = req.add_jobs();
    r->set_job_id(victim.id);
    r->set_attempt(1);
    r->mutable_progress()->set_step(599);
    r->set_checkpoint_uri(PathToFileUri(cluster_.artifact_root() + "/stale"));
    v1::HeartbeatResponse resp;
    ASSERT_TRUE(workers->Heartbeat(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.jobs_size(), 1);
    EXPECT_EQ(resp.jobs(0).directive(), v1::JOB_DIRECTIVE_LEASE_LOST);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::CompleteRequest req;
    req.set_worker_id(victim.worker_id);
    req.set_job_id(victim.id);
    req.set_attempt(1);
    req.set_artifact_uri(PathToFileUri(cluster_.artifact_root() + "/stale"));
    v1::CompleteResponse resp;
    EXPECT_EQ(workers->Complete(&ctx, req, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::FailRequest req;
    req.set_worker_id(victim.worker_id);
    req.set_job_id(victim.id);
    req.set_attempt(1);
    req.set_error("late failure");
    req.set_retryable(true);
    v1::FailResponse resp;
    EXPECT_EQ(workers->Fail(&ctx, req, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  auto still = cluster_.store().GetJob(victim.id);
  ASSERT_TRUE(still.ok());
  EXPECT_EQ(still->state, "LEASED");
  EXPECT_EQ(still->attempt, 2);
  EXPECT_EQ(still->worker_id, taken.worker_id);
  EXPECT_EQ(still->checkpoint_uri.find("/stale"), std::string::npos) << "a stale heartbeat moved the checkpoint";
  const int64_t stale_lines = LogLines(cluster_, victim.id, 1);

  // Resume. The worker's next heartbeat is answered LEASE_LOST and it kills its trainer.
  cluster_.SignalWorker(paused, SIGCONT);
  ::kill(child_, SIGCONT);
  frozen_ = false;
  const std::string paused_log = Cat(cluster_.dir(), "/worker-", paused, ".log");
  EXPECT_TRUE(PollUntil([&] { return FileContains(paused_log, Cat("lease of ", victim.name, " attempt 1 lost; killing it")); },
                        30s))
      << "the resumed worker did not learn that it lost the lease";
  EXPECT_TRUE(PollUntil([&] { return Gone(child_); }, 30s)) << "stale btx-train " << child_ << " still runs";

  ASSERT_EQ(cluster_.WaitForPipeline(*id, 300s), "SUCCEEDED");
  ExpectCleanFinish(cluster_, *id, planned);
  auto job = cluster_.store().GetJob(victim.id);
  ASSERT_TRUE(job.ok());
  // The result is attempt 2's, done by the other worker, resumed from attempt 1's checkpoint.
  attempts = AttemptsOf(Attempts(cluster_.conninfo(), *id), victim.name);
  ASSERT_EQ(attempts.size(), 2u);
  EXPECT_EQ(attempts[0].outcome, "LEASE_EXPIRED");
  EXPECT_EQ(attempts[1].outcome, "SUCCEEDED");
  EXPECT_EQ(attempts[1].worker, taken.worker_id);
  EXPECT_EQ(job->attempt, 2);
  auto logs = cluster_.store().LogsAfter(victim.id, 0, 100000);
  ASSERT_TRUE(logs.ok());
  bool resumed = false;
  for (const auto& l : *logs) resumed |= l.attempt == 2 && l.line.find("resumed from") != std::string::npos;
  EXPECT_TRUE(resumed) << "attempt 2 started over instead of resuming from attempt 1's checkpoint";
  // The resumed worker's reports for attempt 1 (the log lines it had buffered) were all refused.
  EXPECT_EQ(LogLines(cluster_, victim.id, 1), stale_lines);
  // And the paused worker is back at work, not wedged.
  EXPECT_EQ(cluster_.PollWorker(paused), std::nullopt);
}

}  // namespace
}  // namespace btx::chaos
