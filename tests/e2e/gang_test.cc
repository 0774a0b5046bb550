// Gangs end to end (label "gang"): PostgreSQL, btx-scheduler and three btx-worker processes on
// loopback, running the tiny BTX pipeline with every training job spanning two workers
// (nodes_per_job: 2, one Gloo rank each). Its result equals the same pipeline run on one worker with
// two ranks; two gangs that together need four workers finish on three; a member killed mid-step ends
// the attempt everywhere and the retry resumes; a scheduler restart mid-gang loses nothing
// (docs/reliability.md, "Gangs").
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <pqxx/pqxx>

#include "btx/common/artifact_store.h"
#include "btx/common/fs.h"
#include "btx/common/strings.h"
#include "cluster.h"

namespace btx::e2e {
namespace {
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace fs = std::filesystem;

// Loss per step of one attempt of a job, as its heartbeats stored them.
std::map<int64_t, double> Losses(const std::string& conninfo, const std::string& job_id) {
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  std::map<int64_t, double> out;
  for (const auto& r : tx.exec_params("SELECT step, loss FROM job_metrics WHERE job_id = $1::uuid ORDER BY attempt, step", job_id)) {
    out[r[0].as<int64_t>()] = r[1].as<double>();
  }
  return out;
}

class GangE2eTest : public ClusterTest {
 protected:
  GangE2eTest()
      : ClusterTest(ClusterOptions{.workers = 3, .lease_seconds = 5, .heartbeat_seconds = 1, .threads_per_job = 1,
                                   // Not 127.0.0.1: the ranks take the path of a gang across hosts (the store and
                                   // Gloo reached at the advertised address, BTX_LOCAL_ADDR), still on loopback.
                                   .worker_args = {"--dist-timeout-seconds", "30", "--advertise-host", "127.0.0.2"}}) {}
  // The cluster index of a worker id (workers are named w<index>).
  int IndexOf(const std::string& worker_id) {
    auto workers = cluster_.store().ListWorkers();
    for (const auto& w : *workers) {
      if (w.id == worker_id) return std::stoi(w.name.substr(1));
    }
    return -1;
  }
  // Every job succeeded with exactly one SUCCEEDED attempt, its current one; every artifact verifies.
  void ExpectFinishedExactlyOnce(const std::string& pipeline_id) {
    auto jobs = cluster_.store().ListJobs(pipeline_id, "", 100);
    ASSERT_TRUE(jobs.ok());
    FileArtifactStore artifacts(cluster_.artifact_root());
    for (const auto& j : *jobs) {
      EXPECT_EQ(j.state, "SUCCEEDED") << j.name << ": " << j.error;
      EXPECT_TRUE(artifacts.Fetch(j.artifact_uri).ok()) << j.name;
      int succeeded = 0;
      for (const auto& a : Attempts(cluster_.conninfo(), pipeline_id)) {
        if (a.job_id != j.id) continue;
        EXPECT_NE(a.outcome, "RUNNING") << j.name << " attempt " << a.attempt;
        if (a.outcome == "SUCCEEDED") {
          ++succeeded;
          EXPECT_EQ(a.attempt, j.attempt) << j.name;
        }
      }
      EXPECT_EQ(succeeded, 1) << j.name;
    }
  }
};

// The same pipeline as a 2-node gang (one rank per worker) and on one worker as 2 ranks: the same world
// and global batch, so the same losses. Its two branch gangs need four workers and there are three:
// they run one after the other, both finish.
TEST_F(GangE2eTest, TwoNodeJobsEqualTheOneNodeRunAndTwoGangsShareThreeWorkers) {
  auto gang = cluster_.Submit(TinySpec("e2e-gang", data_, 8, 4, "{max_attempts: 3, nodes_per_job: 2}"));
  ASSERT_TRUE(gang.ok()) << gang.status();
  auto single = cluster_.Submit(TinySpec("e2e-one-node", data_, 8, 4, "{max_attempts: 3, ranks_per_job: 2}"));
  ASSERT_TRUE(single.ok()) << single.status();
  ASSERT_EQ(cluster_.WaitForPipeline(*gang, 900s), "SUCCEEDED");
  ASSERT_EQ(cluster_.WaitForPipeline(*single, 900s), "SUCCEEDED");
  ExpectFinishedExactlyOnce(*gang);
  ExpectFinishedExactlyOnce(*single);

  auto gang_jobs = cluster_.store().ListJobs(*gang, "", 100);
  auto single_jobs = cluster_.store().ListJobs(*single, "", 100);
  ASSERT_TRUE(gang_jobs.ok() && single_jobs.ok());
  std::map<std::string, storage::JobRecord> reference;
  int compared = 0;
  for (const auto& j : *single_jobs) reference[j.name] = j;
  for (const auto& j : *gang_jobs) {
    const bool training = j.kind == "pretrain" || j.kind == "branch" || j.kind == "finetune";
    EXPECT_EQ(j.nodes, training ? 2 : 1) << j.name;
    if (!training) continue;
    // Both members ran: node 1's ranks log as global rank 1, node 0 reported the progress.
    const std::string logs = JobLogs(cluster_.store(), j.id);
    EXPECT_NE(logs.find("[stderr] btx-train: rank 0 of 2"), std::string::npos) << logs;
    EXPECT_NE(logs.find("[rank 1] btx-train: rank 1 of 2"), std::string::npos) << logs;
    // Equal to the one-node run within the distributed tolerance (docs/btx-train-protocol.md).
    ASSERT_TRUE(reference.count(j.name)) << j.name;
    const auto a = Losses(cluster_.conninfo(), j.id), b = Losses(cluster_.conninfo(), reference.at(j.name).id);
    ASSERT_FALSE(a.empty()) << j.name;
    for (const auto& [step, loss] : a) {
      auto other = b.find(step);
      if (other == b.end()) continue;  // heartbeats sample steps: compare those both runs reported
      ++compared;
      EXPECT_NEAR(loss, other->second, 1e-4 * std::max(1.0, std::abs(loss))) << j.name << " step " << step;
    }
    // The end of training, every step in: the validation loss of the result.
    const double va = json::parse(j.result_json).value("valid_loss", 0.0);
    const double vb = json::parse(reference.at(j.name).result_json).value("valid_loss", 0.0);
    if (j.kind == "branch") {
      EXPECT_GT(va, 0.0) << j.result_json;
    }
    EXPECT_NEAR(va, vb, 1e-4 * std::max(1.0, va)) << j.name;
  }
  EXPECT_GE(compared, 4);
  // The leased events name both members of each gang.
  auto events = cluster_.store().EventsAfter(*gang, 0, 100000);
  ASSERT_TRUE(events.ok());
  int gang_leases = 0;
  for (const auto& e : *events) {
    if (e.type != "job.leased") continue;
    const json p = json::parse(e.payload_json);
    if (p.contains("members")) {
      ++gang_leases;
      EXPECT_EQ(p["members"].size(), 2u) << e.payload_json;
    }
  }
  EXPECT_EQ(gang_leases, 4);  // pretrain, two branches, finetune
}

TEST_F(GangE2eTest, AMemberKilledMidStepEndsTheAttemptEverywhereAndTheRetryResumes) {
  auto id = cluster_.Submit(TinySpec("e2e-gang-kill", data_, 600, 20, "{max_attempts: 3, nodes_per_job: 2}"));
  ASSERT_TRUE(id.ok()) << id.status();
  // A branch gang with a checkpoint behind it and steps to go: kill the worker of its node 1.
  std::string victim;
  std::map<int, pid_t> procs;
  int member_index = -1;
  const auto deadline = std::chrono::steady_clock::now() + 600s;
  while (victim.empty() && std::chrono::steady_clock::now() < deadline) {
    auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
    ASSERT_TRUE(jobs.ok());
    for (auto& j : *jobs) {
      if (j.kind != "branch" || j.attempt != 1 || j.checkpoint_uri.empty() ||
          json::parse(j.progress_json).value("step", 0) >= 400) {
        continue;
      }
      std::vector<storage::JobRecord> one = {j};
      ASSERT_TRUE(cluster_.store().DescribeGangs(one, std::chrono::system_clock::now()).ok());
      procs = AttemptProcesses(j.id, 1);
      if (one[0].members.size() == 2 && procs.count(0) && procs.count(1) && procs.count(-1)) {
        victim = j.id;
        member_index = IndexOf(one[0].members[1].worker_id);
      }
      break;
    }
    ASSERT_EQ(cluster_.store().GetPipeline(*id)->state, "RUNNING") << "pipeline ended before a member could be killed";
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_FALSE(victim.empty()) << "no branch gang reached a checkpoint";
  ASSERT_GE(member_index, 0);
  cluster_.SignalWorker(member_index, SIGKILL);
  cluster_.WaitWorker(member_index);

  // Attempt 1 ends for the whole gang: closed once, and no process of it is left on any worker.
  const auto ended = std::chrono::steady_clock::now() + 180s;
  bool closed = false;
  while (!closed && std::chrono::steady_clock::now() < ended) {
    for (const auto& a : Attempts(cluster_.conninfo(), *id)) closed |= a.job_id == victim && a.attempt == 1 && a.outcome != "RUNNING";
    if (!closed) std::this_thread::sleep_for(50ms);
  }
  ASSERT_TRUE(closed) << "attempt 1 never ended";
  const auto gone_by = std::chrono::steady_clock::now() + 60s;
  auto all_gone = [&] {
    for (const auto& [rank, pid] : procs) {
      if (!Gone(pid)) return false;
    }
    return true;
  };
  while (!all_gone() && std::chrono::steady_clock::now() < gone_by) std::this_thread::sleep_for(50ms);
  for (const auto& [rank, pid] : procs) EXPECT_TRUE(Gone(pid)) << (rank < 0 ? std::string("the store") : Cat("rank ", rank)) << " of attempt 1 still runs";

  ASSERT_EQ(cluster_.WaitForPipeline(*id, 900s), "SUCCEEDED");
  ExpectFinishedExactlyOnce(*id);
  auto job = cluster_.store().GetJob(victim);
  ASSERT_TRUE(job.ok());
  EXPECT_GE(job->attempt, 2);
  int first = 0;
  for (const auto& a : Attempts(cluster_.conninfo(), *id)) {
    if (a.job_id != victim || a.attempt != 1) continue;
    ++first;
    EXPECT_TRUE(a.outcome == "FAILED" || a.outcome == "LEASE_EXPIRED") << a.outcome;
  }
  EXPECT_EQ(first, 1);
  // The retry ran as a gang on the two workers left and resumed from attempt 1's checkpoint on both.
  const std::string logs = JobLogs(cluster_.store(), victim);
  EXPECT_NE(logs.find(Cat(job->attempt, " [stderr] btx: resumed from")), std::string::npos) << logs;
  EXPECT_NE(logs.find(Cat(job->attempt, " [stderr] [rank 1] btx: resumed from")), std::string::npos) << logs;
}

TEST_F(GangE2eTest, SchedulerRestartMidGangLosesNothing) {
  auto id = cluster_.Submit(TinySpec("e2e-gang-restart", data_, 120, 20, "{max_attempts: 3, nodes_per_job: 2}"));
  ASSERT_TRUE(id.ok()) << id.status();
  bool running = false;
  const auto deadline = std::chrono::steady_clock::now() + 600s;
  while (!running && std::chrono::steady_clock::now() < deadline) {
    auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
    ASSERT_TRUE(jobs.ok());
    for (const auto& j : *jobs) running |= j.kind == "branch" && json::parse(j.progress_json).value("step", 0) >= 5;
    if (!running) std::this_thread::sleep_for(20ms);
  }
  ASSERT_TRUE(running) << "no branch gang started";
  cluster_.SignalScheduler(SIGKILL);
  cluster_.WaitScheduler();
  ASSERT_TRUE(cluster_.StartScheduler().ok());
  ASSERT_EQ(cluster_.WaitForPipeline(*id, 900s), "SUCCEEDED");
  ExpectFinishedExactlyOnce(*id);
}

}  // namespace
}  // namespace btx::e2e
