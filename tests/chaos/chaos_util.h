// Shared by the chaos tests: the pipeline they run, waiting on state with deadlines, and the final
// state every fault must leave behind (checked in the database and on disk, not taken from logs).
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <pqxx/pqxx>

#include "btx/common/artifact_store.h"
#include "btx/common/fs.h"
#include "cluster.h"

namespace btx::chaos {

// A BTX pipeline small enough for 2 busy CPU cores: a seed pretrain, two experts, merge, router
// finetune, evaluation (6 jobs). Step counts set how long the fault has to land in a job.
inline std::string TinySpec(const std::string& data, int pretrain_steps, int branch_steps, int checkpoint_every,
                            int max_attempts = 3) {
  const std::string d = data;
  return "name: chaos-tiny\n"
         "seed:\n"
         "  init: {preset: tiny}\n"
         "  pretrain: {data: {train: [" + d + "/code/train.txt, " + d + "/math/train.txt, " + d +
         "/prose/train.txt]}, steps: " + std::to_string(pretrain_steps) + "}\n"
         "experts:\n"
         "  - {name: code, data: {train: " + d + "/code/train.txt, valid: " + d + "/code/valid.txt}, steps: " +
         std::to_string(branch_steps) + "}\n"
         "  - {name: math, data: {train: " + d + "/math/train.txt, valid: " + d + "/math/valid.txt}, steps: " +
         std::to_string(branch_steps) + "}\n"
         "train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, checkpoint_every: " +
         std::to_string(checkpoint_every) + ", log_every: 1, valid_tokens: 2048}\n"
         "merge: {method: btx, keep_seed_expert: true, router_init: random}\n"
         "finetune: {top_k: 2, steps: 4}\n"
         "evaluate: {baselines: [seed, experts], max_tokens: 2048}\n"
         "resources: {max_attempts: " + std::to_string(max_attempts) + "}\n";
}

// Polls `done` until it holds or `limit` passes. The sleep is only the polling period.
inline bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds limit,
                      std::chrono::milliseconds every = std::chrono::milliseconds(50)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(every);
  }
  return done();
}

// One integer from a query on a fresh connection; -1 when the database cannot be reached.
template <typename... Args>
int64_t QueryInt(const std::string& conninfo, const std::string& sql, Args&&... args) {
  try {
    pqxx::connection c(conninfo);
    pqxx::nontransaction tx(c);
    auto r = tx.exec_params(sql, std::forward<Args>(args)...);
    return r.empty() || r[0][0].is_null() ? 0 : r[0][0].template as<int64_t>();
  } catch (const std::exception&) {
    return -1;
  }
}

using e2e::AttemptRow;
using e2e::Attempts;

inline std::vector<AttemptRow> AttemptsOf(const std::vector<AttemptRow>& all, const std::string& job_name) {
  std::vector<AttemptRow> out;
  for (const auto& a : all) {
    if (a.job == job_name) out.push_back(a);
  }
  return out;
}

// The jobs the scheduler plans for `spec` (a dry run), by name.
inline std::vector<std::string> PlannedJobs(e2e::Cluster& cluster, const std::string& spec) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::SubmitRequest req;
  req.set_spec(spec);
  req.set_dry_run(true);
  v1::SubmitResponse resp;
  std::vector<std::string> names;
  if (!cluster.pipelines().Submit(&ctx, req, &resp).ok()) return names;
  for (const auto& j : resp.pipeline().jobs()) names.push_back(j.name());
  std::sort(names.begin(), names.end());
  return names;
}

// What every fault must leave behind once the pipeline has finished: no job lost (the planned
// jobs, all SUCCEEDED), exactly one SUCCEEDED attempt per job and it is the job's current attempt,
// no attempt left open, and every artifact matching its sha256 manifest.
inline void ExpectCleanFinish(e2e::Cluster& cluster, const std::string& pipeline_id,
                              const std::vector<std::string>& planned) {
  auto pipeline = cluster.store().GetPipeline(pipeline_id);
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  EXPECT_EQ(pipeline->state, "SUCCEEDED") << pipeline->error;
  auto jobs = cluster.store().ListJobs(pipeline_id, "", 1000);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  std::vector<std::string> names;
  std::map<std::string, int> current_attempt;
  FileArtifactStore artifacts(cluster.artifact_root());
  for (const auto& j : *jobs) {
    names.push_back(j.name);
    current_attempt[j.name] = j.attempt;
    EXPECT_EQ(j.state, "SUCCEEDED") << j.name << ": " << j.error;
    auto dir = artifacts.Fetch(j.artifact_uri);  // verifies every file against manifest.sha256
    EXPECT_TRUE(dir.ok()) << j.name << ": " << dir.status();
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, planned) << "jobs lost or added";
  std::map<std::string, int> successes;
  for (const auto& a : Attempts(cluster.conninfo(), pipeline_id)) {
    EXPECT_NE(a.outcome, "RUNNING") << a.job << " attempt " << a.attempt << " was never closed";
    if (a.outcome != "SUCCEEDED") continue;
    ++successes[a.job];
    EXPECT_EQ(a.attempt, current_attempt[a.job]) << a.job << ": a stale attempt succeeded";
  }
  for (const auto& n : planned) EXPECT_EQ(successes[n], 1) << n << ": SUCCEEDED attempts";
}

// The training step a running job last reported (0 before its first report).
inline int64_t Step(const storage::JobRecord& job) {
  const auto progress = nlohmann::json::parse(job.progress_json, nullptr, false);
  return progress.is_object() ? progress.value("step", int64_t{0}) : 0;
}

// Index of the cluster worker (named w<i>) behind a worker id, or -1.
inline int WorkerIndex(e2e::Cluster& cluster, const std::string& worker_id) {
  auto workers = cluster.store().ListWorkers();
  if (!workers.ok()) return -1;
  for (const auto& w : *workers) {
    if (w.id == worker_id && w.name.size() > 1 && w.name[0] == 'w') return std::stoi(w.name.substr(1));
  }
  return -1;
}

inline bool FileContains(const std::string& path, const std::string& needle) {
  auto text = ReadFile(path);
  return text.ok() && text->find(needle) != std::string::npos;
}

// Two workers on a short lease (heartbeats every second): the reaper, which runs every 2 s, notices a
// silent worker within about 7 s. 5 s rather than the e2e suite's 3 s leaves the daemons that keep
// running some slack when CI runs tests side by side on busy cores. Corpora are made, daemons started.
class TwoWorkerChaosTest : public ::testing::Test {
 protected:
  TwoWorkerChaosTest() : cluster_({.workers = 2, .lease_seconds = 5, .heartbeat_seconds = 1}) {}
  void SetUp() override {
    data_ = cluster_.dir() + "/data";
    e2e::MakeCorpora(data_, 60000);
    auto s = cluster_.Start();
    ASSERT_TRUE(s.ok()) << s;
  }
  void TearDown() override {
    if (HasFailure()) std::cerr << cluster_.DaemonLogs() << "\n";
  }
  e2e::Cluster cluster_;
  std::string data_;
};

}  // namespace btx::chaos
