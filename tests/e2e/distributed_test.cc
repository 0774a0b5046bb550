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
  return R"(
name: e2e-ranks
seed:
  init: {preset: tiny}
  pretrain: {data: {train: [)" + data + "/code/train.txt, " + data + R"(/math/train.txt]}, steps: 4}
experts:
  - {name: code, data: {train: )" + data + "/code/train.txt, valid: " + data + "/code/valid.txt}, steps: " +
         std::to_string(branch_steps) + R"(}
  - {name: math, data: {train: )" + data + "/math/train.txt, valid: " + data + "/math/valid.txt}, steps: " +
         std::to_string(branch_steps) + R"(}
train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, checkpoint_every: )" + std::to_string(checkpoint_every) +
         R"(, log_every: 1, valid_tokens: 2048, threads: 1}
merge: {method: btx, keep_seed_expert: true, router_init: random}
finetune: {top_k: 2, steps: 4}
evaluate: {baselines: [seed, experts], max_tokens: 2048}
resources: {max_attempts: 3, ranks_per_job: 2}
)";
}

std::string ReadProc(pid_t pid, const char* what) {
  auto text = ReadFile(Cat("/proc/", pid, "/", what));
  std::string s = text.ok() ? *text : "";
  for (char& c : s) {
    if (c == '\0') c = '\n';
  }
  return s;
}

// The processes of one attempt of a job, found through /proc: its ranks (btx-train --job <attempt
// dir>/JOB.json, told their rank by BTX_RANK) and its rendezvous store (run in the attempt dir).
struct Group {
  std::map<int, pid_t> ranks;
  pid_t store = 0;
};
Group FindGroup(const std::string& job_id, int attempt) {
  Group g;
  const std::string attempt_dir = Cat(job_id, "-attempt-", attempt);
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename();
    if (name.empty() || !std::isdigit(static_cast<unsigned char>(name[0]))) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    const std::string cmd = ReadProc(pid, "cmdline");
    if (cmd.find("btx-train") == std::string::npos) continue;
    if (cmd.find("--store-server") != std::string::npos) {
      std::error_code ec;
      if (fs::read_symlink(Cat("/proc/", pid, "/cwd"), ec).filename() == attempt_dir) g.store = pid;
      continue;
    }
    if (cmd.find(attempt_dir + "/JOB.json") == std::string::npos) continue;
    const std::string env = ReadProc(pid, "environ");
    const size_t at = env.find("\nBTX_RANK=");
    if (at != std::string::npos) g.ranks[std::stoi(env.substr(at + 10))] = pid;
  }
  return g;
}

bool Gone(pid_t pid) { return ::kill(pid, 0) != 0 && errno == ESRCH; }

class DistributedE2eTest : public ::testing::Test {
 protected:
  DistributedE2eTest() : cluster_(ClusterOptions{.workers = 1, .lease_seconds = 5, .heartbeat_seconds = 1,
                                                 .threads_per_job = 2, .worker_args = {"--dist-timeout-seconds", "60"}}) {}
  void SetUp() override {
    // A rank needs a CPU thread of its own: with fewer, submit refuses 2-rank jobs (and says so).
    if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "needs 2 CPU threads";
    data_ = cluster_.dir() + "/data";
    MakeCorpora(data_, 60000);
    auto s = cluster_.Start();
    ASSERT_TRUE(s.ok()) << s;
  }
  void TearDown() override {
    if (HasFailure()) std::cerr << cluster_.DaemonLogs() << "\n";
  }
  std::string AllLogs(const std::string& job_id) {
    auto logs = cluster_.store().LogsAfter(job_id, 0, 100000);
    std::string out;
    if (logs.ok()) {
      for (const auto& l : *logs) out += Cat(l.attempt, " [", l.stream, "] ", l.line, "\n");
    }
    return out;
  }
  Cluster cluster_;
  std::string data_;
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
    const std::string logs = AllLogs(j.id);
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
  const std::string logs = AllLogs(victim);
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
