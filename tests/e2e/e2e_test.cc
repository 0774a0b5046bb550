// End to end across processes: PostgreSQL, btx-scheduler and two btx-workers running the real
// btx-train on a tiny BTX pipeline — once undisturbed, once with a worker killed by SIGKILL in the
// middle of training an expert.
#include <signal.h>

#include <filesystem>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "btx/common/artifact_store.h"
#include "btx/common/fs.h"
#include "btx/common/uri.h"
#include "cluster.h"

namespace btx::e2e {
namespace {
using namespace std::chrono_literals;
using json = nlohmann::json;

// A BTX pipeline small enough for 2 CPU cores: pretrain a tiny seed, branch two experts with
// frequent checkpoints, merge, router-finetune, evaluate against the seed and the experts.
std::string TinySpec(const std::string& data, int branch_steps, int checkpoint_every = 4) {
  return R"(
name: e2e-tiny
seed:
  init: {preset: tiny}
  pretrain: {data: {train: [)" + data + "/code/train.txt, " + data + "/math/train.txt, " + data +
         R"(/prose/train.txt]}, steps: 6}
experts:
  - {name: code, data: {train: )" + data + "/code/train.txt, valid: " + data + "/code/valid.txt}, steps: " +
         std::to_string(branch_steps) + R"(}
  - {name: math, data: {train: )" + data + "/math/train.txt, valid: " + data + "/math/valid.txt}, steps: " +
         std::to_string(branch_steps) + R"(}
train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, checkpoint_every: )" + std::to_string(checkpoint_every) +
         R"(, log_every: 1, valid_tokens: 2048}
merge: {method: btx, keep_seed_expert: true, router_init: random}
finetune: {top_k: 2, steps: 4}
evaluate: {baselines: [seed, experts], max_tokens: 2048}
resources: {max_attempts: 3}
)";
}

void ExpectEveryArtifactVerifies(Cluster& cluster, const std::string& id) {
  auto jobs = cluster.store().ListJobs(id, "", 100);
  ASSERT_TRUE(jobs.ok());
  FileArtifactStore artifacts(cluster.artifact_root());
  for (const auto& j : *jobs) {
    EXPECT_EQ(j.state, "SUCCEEDED") << j.name << ": " << j.error;
    auto dir = artifacts.Fetch(j.artifact_uri);
    EXPECT_TRUE(dir.ok()) << j.name << ": " << dir.status();
  }
}

using E2eTest = ClusterTest;

TEST_F(E2eTest, TinyPipelineRunsToCompletionAcrossTwoWorkers) {
  auto id = cluster_.Submit(TinySpec(data_, 8));
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_EQ(cluster_.WaitForPipeline(*id, 600s), "SUCCEEDED");
  ExpectEveryArtifactVerifies(cluster_, *id);
  // Exactly one attempt per job, each completed once.
  for (const auto& a : Attempts(cluster_.conninfo(), *id)) {
    EXPECT_EQ(a.attempt, 1) << a.job;
    EXPECT_EQ(a.outcome, "SUCCEEDED") << a.job;
  }
  // The evaluation table: every model on every domain, with finite losses.
  auto jobs = cluster_.store().ListJobs(*id, "", 100);
  for (const auto& j : *jobs) {
    if (j.name != "eval") continue;
    const json r = json::parse(j.result_json);
    for (const std::string model : {"btx", "seed", "expert/code", "expert/math"}) {
      ASSERT_TRUE(r["models"].contains(model)) << j.result_json;
      EXPECT_GT(r["models"][model]["avg_loss"].get<double>(), 0.0) << model;
      EXPECT_LT(r["models"][model]["avg_loss"].get<double>(), 10.0) << model;
    }
  }
}

TEST_F(E2eTest, WorkerKilledMidBranchResumesFromCheckpointOnTheOtherWorker) {
  // Long enough (a few seconds per branch) that heartbeats report checkpoints before it ends.
  auto id = cluster_.Submit(TinySpec(data_, 400, 20));
  ASSERT_TRUE(id.ok()) << id.status();
  // Wait until a branch job is running with a checkpoint behind it, then kill its worker outright.
  std::string victim_job, victim_worker;
  const auto deadline = std::chrono::steady_clock::now() + 300s;
  while (victim_job.empty() && std::chrono::steady_clock::now() < deadline) {
    auto jobs = cluster_.store().ListJobs(*id, "LEASED", 100);
    ASSERT_TRUE(jobs.ok());
    for (const auto& j : *jobs) {
      if (j.kind == "branch" && !j.checkpoint_uri.empty() && json::parse(j.progress_json).value("step", 0) < 300) {
        victim_job = j.id;
        victim_worker = j.worker_id;
        break;
      }
    }
    ASSERT_EQ(cluster_.store().GetPipeline(*id)->state, "RUNNING") << "pipeline ended before a worker could be killed";
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_FALSE(victim_job.empty()) << "no branch job reached a checkpoint";
  auto workers = cluster_.store().ListWorkers();
  ASSERT_TRUE(workers.ok());
  int victim_index = -1;
  for (const auto& w : *workers) {
    if (w.id == victim_worker) victim_index = w.name == "w0" ? 0 : 1;
  }
  ASSERT_GE(victim_index, 0);
  cluster_.SignalWorker(victim_index, SIGKILL);
  EXPECT_EQ(cluster_.WaitWorker(victim_index), 128 + SIGKILL);

  ASSERT_EQ(cluster_.WaitForPipeline(*id, 600s), "SUCCEEDED");
  ExpectEveryArtifactVerifies(cluster_, *id);
  auto job = cluster_.store().GetJob(victim_job);
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->attempt, 2);
  EXPECT_NE(job->worker_id, victim_worker);
  // Attempt 2 resumed from attempt 1's checkpoint instead of starting over.
  auto logs = cluster_.store().LogsAfter(victim_job, 0, 100000);
  ASSERT_TRUE(logs.ok());
  bool resumed = false;
  for (const auto& l : *logs) resumed |= l.attempt == 2 && l.line.find("resumed from") != std::string::npos;
  EXPECT_TRUE(resumed) << "attempt 2 did not resume from a checkpoint";
  // Nothing completed twice: per job exactly one SUCCEEDED attempt; the killed one is not a success.
  std::map<std::string, int> successes;
  for (const auto& a : Attempts(cluster_.conninfo(), *id)) {
    if (a.outcome == "SUCCEEDED") ++successes[a.job];
    if (a.worker == victim_worker && a.job == job->name) {
      EXPECT_NE(a.outcome, "SUCCEEDED");
    }
  }
  for (const auto& [name, n] : successes) EXPECT_EQ(n, 1) << name;
  EXPECT_EQ(successes.size(), cluster_.store().ListJobs(*id, "", 100)->size());
}

}  // namespace
}  // namespace btx::e2e
