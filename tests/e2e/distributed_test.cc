// Rank groups end to end (label "distributed"): PostgreSQL, btx-scheduler and a btx-worker running the
// real btx-train as 2-rank CPU jobs over c10d Gloo. Once undisturbed, once with one rank killed by
// SIGKILL in the middle of training: the attempt fails as a group, and the retry resumes from the
// checkpoint (docs/reliability.md).
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <map>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "btx/common/artifact_store.h"
#include "btx/common/fs.h"
#include "btx/common/strings.h"
#include "cluster.h"

namespace btx::e2e {
namespace {
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace fs = std::filesystem;

// The e2e suite's tiny BTX pipeline, with every training job (pretrain, branches, finetune) as 2 CPU ranks.
std::string TwoRankSpec(const std::string& data, int branch_steps, int checkpoint_every) {
  return TinySpec("e2e-ranks", data, branch_steps, checkpoint_every, "{max_attempts: 3, ranks_per_job: 2}");
}

// The processes of one attempt of a job: its ranks and its rendezvous store.
struct Group {
  std::map<int, pid_t> ranks;
  pid_t store = 0;
};
Group FindGroup(const std::string& job_id, int attempt) {
  Group g;
  for (const auto& [rank, pid] : AttemptProcesses(job_id, attempt)) {
    if (rank < 0) {
      g.store = pid;
    } else {
      g.ranks[rank] = pid;
    }
  }
  return g;
}

class DistributedE2eTest : public ClusterTest {
 protected:
  DistributedE2eTest()
      : ClusterTest(ClusterOptions{.workers = 1, .lease_seconds = 5, .heartbeat_seconds = 1, .threads_per_job = 2,
                                   .worker_args = {"--dist-timeout-seconds", "60"}}) {}
  void SetUp() override {
    // A rank needs a CPU thread of its own: with fewer, submit refuses 2-rank jobs (and says so).
    if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "needs 2 CPU threads";
    ClusterTest::SetUp();
  }
};

TEST_F(DistributedE2eTest, TinyPipelineWithTwoRankTrainingJobsSucceeds) {
  auto id = cluster_.Submit(TwoRankSpec(data_, 8, 4));
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_EQ(cluster_.WaitForPipeline(*id, 800s), "SUCCEEDED");
  auto jobs = cluster_.store().ListJobs(*id, "", 100);
  ASSERT_TRUE(jobs.ok());
  FileArtifactStore artifacts(cluster_.artifact_root());
  for (const auto& j : *jobs) {
    EXPECT_EQ(j.state, "SUCCEEDED") << j.name << ": " << j.error;
    EXPECT_EQ(j.attempt, 1) << j.name << ": " << j.error;
    EXPECT_TRUE(artifacts.Fetch(j.artifact_uri).ok()) << j.name;
    const bool training = j.kind == "pretrain" || j.kind == "branch" || j.kind == "finetune";
    EXPECT_EQ(j.ranks, training ? 2 : 1) << j.name;
    if (j.kind != "branch") continue;
    // Both ranks ran and joined one group; rank 0 reported the progress of the whole job.
    const std::string logs = JobLogs(cluster_.store(), j.id);
    EXPECT_NE(logs.find("as 2 ranks"), std::string::npos) << logs;
    EXPECT_NE(logs.find("[stderr] btx-train: rank 0 of 2"), std::string::npos) << logs;
    EXPECT_NE(logs.find("[stderr] [rank 1] btx-train: rank 1 of 2"), std::string::npos) << logs;
    EXPECT_EQ(json::parse(j.progress_json).value("step", 0), 8) << j.progress_json;
    EXPECT_GT(json::parse(j.result_json).value("valid_loss", 0.0), 0.0) << j.result_json;
  }
}

TEST_F(DistributedE2eTest, OneRankKilledFailsTheGroupAndTheRetryResumesFromTheCheckpoint) {
  auto id = cluster_.Submit(TwoRankSpec(data_, 300, 20));
  ASSERT_TRUE(id.ok()) << id.status();
  // A branch job running as 2 ranks with a checkpoint behind it and steps still to go.
  std::string victim;
  Group group;
  const auto deadline = std::chrono::steady_clock::now() + 600s;
  while (victim.empty() && std::chrono::steady_clock::now() < deadline) {
    auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
    ASSERT_TRUE(jobs.ok());
    for (const auto& j : *jobs) {
      if (j.kind != "branch" || j.attempt != 1 || j.checkpoint_uri.empty() ||
          json::parse(j.progress_json).value("step", 0) >= 200) {
        continue;
      }
      group = FindGroup(j.id, 1);
      if (group.ranks.size() == 2 && group.store != 0) victim = j.id;
      break;
    }
    ASSERT_EQ(cluster_.store().GetPipeline(*id)->state, "RUNNING") << "pipeline ended before a rank could be killed";
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_FALSE(victim.empty()) << "no 2-rank branch job reached a checkpoint";
  ASSERT_EQ(::kill(group.ranks.at(1), SIGKILL), 0);

  // The attempt ends as a group: reported once, with the killed rank's error; no process of it is left.
  std::string error;
  const auto ended = std::chrono::steady_clock::now() + 120s;
  while (std::chrono::steady_clock::now() < ended) {
    auto attempts = Attempts(cluster_.conninfo(), *id);
    bool done = false;
    for (const auto& a : attempts) done |= a.job_id == victim && a.attempt == 1 && a.outcome != "RUNNING";
    if (done) break;
    std::this_thread::sleep_for(20ms);
  }
  auto attempts = Attempts(cluster_.conninfo(), *id);
  int first_attempts = 0;
  for (const auto& a : attempts) {
    if (a.job_id != victim || a.attempt != 1) continue;
    ++first_attempts;
    EXPECT_EQ(a.outcome, "FAILED");
  }
  EXPECT_EQ(first_attempts, 1);
  EXPECT_TRUE(Gone(group.ranks.at(0))) << "rank 0 of the failed attempt still runs";
  EXPECT_TRUE(Gone(group.ranks.at(1)));
  EXPECT_TRUE(Gone(group.store)) << "the failed attempt's rendezvous store still runs";

  ASSERT_EQ(cluster_.WaitForPipeline(*id, 800s), "SUCCEEDED");
  auto job = cluster_.store().GetJob(victim);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->attempt, 2);
  const std::string logs = JobLogs(cluster_.store(), victim);
  EXPECT_NE(logs.find("1 [worker] rank 1 of 2 failed: stopping the group"), std::string::npos) << logs;
  EXPECT_NE(logs.find("1 [worker] rank 1 of 2 exited with code 137"), std::string::npos) << logs;
  // Attempt 2 ran as a group again and resumed from attempt 1's checkpoint instead of starting over.
  EXPECT_NE(logs.find("2 [stderr] btx: resumed from"), std::string::npos) << logs;
  EXPECT_NE(logs.find("2 [stderr] [rank 1] btx: resumed from"), std::string::npos) << logs;
  auto events = cluster_.store().EventsAfter(*id, 0, 100000);
  ASSERT_TRUE(events.ok());
  bool reported = false;
  for (const auto& e : *events) {
    if (e.job_id == victim && e.payload_json.find("rank 1 of 2 killed by signal 9") != std::string::npos) reported = true;
  }
  EXPECT_TRUE(reported) << "the attempt's error does not name the killed rank";
}

}  // namespace
}  // namespace btx::e2e
