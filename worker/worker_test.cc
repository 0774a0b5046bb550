// The worker against a real scheduler and PostgreSQL, with a stand-in trainer: a shell script that
// speaks the btx-train protocol (progress on fd 3, exit codes 0/65/75, atomic publish with a
// manifest). The real btx-train runs in the end-to-end suite (tests/e2e).
#include "btx/worker/worker.h"

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "btx/common/artifact_store.h"
#include "btx/common/fs.h"
#include "btx/common/uri.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/server.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "pg_fixture.h"

namespace btx::worker {
namespace {
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using json = nlohmann::json;

// Modes, read from a file beside the script so one test can switch behaviour between attempts.
constexpr char kFakeTrain[] = R"SH(#!/bin/bash
job=$2
here=$(dirname "$0")
mode=$(cat "$here/mode")
out=$(sed -n 's/^ *"output_dir": "\(.*\)",\{0,1\}$/\1/p' "$job")
name=$(sed -n 's/^ *"name": "\(.*\)",\{0,1\}$/\1/p' "$job" | head -n1)
echo "training $name in mode $mode"
echo "a warning on stderr" >&2
echo '{"event":"progress","step":1,"total_steps":4,"loss":3.5,"lr":0.001,"tokens_per_s":100,"tokens":10}' >&3
ck="$(dirname "$out")/checkpoints/step-00000001"
mkdir -p "$ck"
echo "{\"event\":\"checkpoint\",\"step\":1,\"path\":\"$ck\"}" >&3
case "$mode" in
  invalid)
    echo "btx-train: invalid job: train.lr: must be > 0" >&2
    exit 65 ;;
  wait)
    trap 'echo "got SIGTERM, checkpointing"; exit 75' TERM
    while true; do sleep 0.05; done ;;
  crash)
    echo "segfault-ish" >&2
    exit 3 ;;
esac
tmp="$out.tmp-$$"
mkdir -p "$tmp"
echo "weights of $name" > "$tmp/model.bin"
(cd "$tmp" && sha256sum model.bin > manifest.sha256)
[ "$mode" = corrupt ] && echo "tampered" >> "$tmp/model.bin"
mv "$tmp" "$out"
echo "{\"event\":\"done\",\"artifact\":\"$out\",\"metrics\":{\"valid_loss\":2.5}}" >&3
exit 0
)SH";

std::string Spec(int max_attempts) {
  return "name: wtest\n"
         "seed: {model: /models/seed}\n"
         "experts:\n"
         "  - {name: code, data: {train: [/d/code]}, steps: 3}\n"
         "merge: {method: btm}\n"
         "evaluate: {baselines: []}\n"
         "resources: {max_attempts: " +
         std::to_string(max_attempts) + "}\n";
}

class WorkerTest : public ::testing::Test {
 protected:
  WorkerTest() : conninfo_(btx::testing::NewMigratedDatabase()), pool_(conninfo_, 8), store_(pool_) {
    dir_ = *MakeTempDir("btx-worker-test");
    EXPECT_TRUE(WriteFileAtomic(dir_ + "/btx-train", kFakeTrain).ok());
    ::chmod((dir_ + "/btx-train").c_str(), 0755);
    SetMode("ok");
    scheduler::SchedulerConfig sc;
    sc.artifact_root = dir_ + "/artifacts";
    sc.lease = 5s;
    sc.heartbeat_interval = 100ms;
    sc.reap_interval = 200ms;
    sc.retry.base = 10ms;
    scheduler_ = std::make_unique<scheduler::Scheduler>(sc, store_, clock_, conninfo_);
    auto port = scheduler_->Start();
    EXPECT_TRUE(port.ok()) << port.status();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials());
    pipelines_ = v1::PipelineService::NewStub(channel_);
  }
  ~WorkerTest() override {
    StopWorker();
    scheduler_->Shutdown();
    fs::remove_all(dir_);
  }

  void SetMode(const std::string& mode) { ASSERT_TRUE(WriteFileAtomic(dir_ + "/mode", mode).ok()); }

  void StartWorker() {
    WorkerConfig wc;
    wc.name = "w1";
    wc.train_binary = dir_ + "/btx-train";
    wc.work_dir = dir_ + "/work";
    wc.threads_per_job = 1;
    wc.poll_wait = 2s;
    wc.stop_grace = 10s;
    registry_ = std::make_unique<metrics::Registry>();  // one per worker: metric names are unique per registry
    worker_ = std::make_unique<Worker>(wc, channel_, launcher_, clock_, registry_.get());
    thread_ = std::thread([this] { worker_->Run(); });
  }
  void StopWorker() {
    if (!worker_) return;
    worker_->Drain();
    thread_.join();
    worker_.reset();
  }

  std::string Submit(const std::string& spec) {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_spec(spec);
    v1::SubmitResponse resp;
    const grpc::Status s = pipelines_->Submit(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.pipeline().id();
  }
  storage::JobRecord Job(const std::string& pipeline, const std::string& name) {
    auto jobs = store_.ListJobs(pipeline, "", 100);
    EXPECT_TRUE(jobs.ok());
    for (const auto& j : *jobs) {
      if (j.name == name) return j;
    }
    ADD_FAILURE() << "no job " << name;
    return {};
  }
  // Polls the database (the system of record) until `pred` holds; fails after a generous deadline.
  template <typename Pred>
  bool Eventually(Pred pred, std::chrono::seconds limit = 60s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (pred()) return true;
      std::this_thread::sleep_for(10ms);
    }
    return pred();
  }
  std::string Logs(const std::string& job_id) {
    auto lines = store_.LogsAfter(job_id, 0, 1000);
    EXPECT_TRUE(lines.ok());
    std::string all;
    for (const auto& l : *lines) all += "[" + l.stream + "] " + l.line + "\n";
    return all;
  }

  SystemClock clock_;
  std::string conninfo_;
  storage::ConnectionPool pool_;
  storage::Store store_;
  std::string dir_;
  std::unique_ptr<scheduler::Scheduler> scheduler_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PipelineService::Stub> pipelines_;
  PosixProcessLauncher launcher_;
  std::unique_ptr<metrics::Registry> registry_;
  std::unique_ptr<Worker> worker_;
  std::thread thread_;
};

TEST_F(WorkerTest, RunsPipelineToSuccessWithVerifiedArtifactsLogsAndProgress) {
  const std::string id = Submit(Spec(3));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }))
      << store_.GetPipeline(id)->state << " " << store_.GetPipeline(id)->error;
  for (const std::string name : {"branch/code", "merge", "eval"}) {
    const auto job = Job(id, name);
    EXPECT_EQ(job.state, "SUCCEEDED") << name;
    EXPECT_EQ(job.attempt, 1) << name;
    auto path = FileUriToPath(job.artifact_uri);
    ASSERT_TRUE(path.ok()) << job.artifact_uri;
    EXPECT_TRUE(FileArtifactStore::VerifyDir(*path).ok()) << *path;
    EXPECT_EQ(json::parse(job.result_json)["valid_loss"], 2.5);
    EXPECT_NE(job.checkpoint_uri.find("/checkpoints/step-00000001"), std::string::npos) << job.checkpoint_uri;
    const std::string logs = Logs(job.id);
    EXPECT_NE(logs.find("[stdout] training " + name + " in mode ok"), std::string::npos) << logs;
    EXPECT_NE(logs.find("[stderr] a warning on stderr"), std::string::npos) << logs;
    EXPECT_NE(logs.find("[worker] started "), std::string::npos) << logs;
    EXPECT_EQ(json::parse(job.progress_json).value("total_steps", 0), 4) << job.progress_json;
  }
  EXPECT_NE(registry_->Serialize().find("btx_worker_slots{worker=\"w1\"} 1"), std::string::npos) << registry_->Serialize();
}

TEST_F(WorkerTest, InvalidInputFailsOnceWithTheTrainersMessage) {
  SetMode("invalid");
  const std::string id = Submit(Spec(3));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "branch/code");
  EXPECT_EQ(job.state, "FAILED");
  EXPECT_EQ(job.attempt, 1);  // exit 65 is not retried
  EXPECT_NE(job.error.find("train.lr: must be > 0"), std::string::npos) << job.error;
}

TEST_F(WorkerTest, CrashIsRetriedUpToMaxAttempts) {
  SetMode("crash");
  const std::string id = Submit(Spec(2));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "branch/code");
  EXPECT_EQ(job.attempt, 2);
  EXPECT_NE(job.error.find("exited with code 3: segfault-ish"), std::string::npos) << job.error;
  EXPECT_NE(registry_->Serialize().find("btx_worker_child_restarts_total{worker=\"w1\"} 2"), std::string::npos);
}

TEST_F(WorkerTest, UnverifiableArtifactIsNeverReportedAsSuccess) {
  SetMode("corrupt");
  const std::string id = Submit(Spec(1));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "branch/code");
  EXPECT_EQ(job.state, "FAILED");
  EXPECT_NE(job.error.find("does not verify"), std::string::npos) << job.error;
  EXPECT_TRUE(job.artifact_uri.empty());
}

TEST_F(WorkerTest, RetryRemovesTornOutputAndSucceeds) {
  SetMode("corrupt");
  const std::string id = Submit(Spec(3));
  StartWorker();
  // The first attempt publishes a torn artifact; switch the trainer back so the retry can succeed.
  ASSERT_TRUE(Eventually([&] { return !Job(id, "branch/code").error.empty(); }));
  SetMode("ok");
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }));
  const auto job = Job(id, "branch/code");
  EXPECT_GE(job.attempt, 2);
  EXPECT_NE(Logs(job.id).find("removed unverifiable leftover output"), std::string::npos) << Logs(job.id);
  EXPECT_TRUE(FileArtifactStore::VerifyDir(*FileUriToPath(job.artifact_uri)).ok());
}

TEST_F(WorkerTest, CancelSignalsTheChildAndEndsCancelled) {
  SetMode("wait");
  const std::string id = Submit(Spec(3));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return json::parse(Job(id, "branch/code").progress_json).value("step", 0) == 1; }));
  grpc::ClientContext ctx;
  v1::CancelRequest req;
  req.set_id(id);
  v1::Pipeline resp;
  ASSERT_TRUE(pipelines_->Cancel(&ctx, req, &resp).ok());
  ASSERT_TRUE(Eventually([&] { return Job(id, "branch/code").state == "CANCELLED"; }));
  EXPECT_TRUE(Eventually([&] { return worker_->running_jobs() == 0; }));
  EXPECT_NE(Logs(Job(id, "branch/code").id).find("got SIGTERM, checkpointing"), std::string::npos);
}

TEST_F(WorkerTest, DrainInterruptsRunningJobSoItResumesElsewhere) {
  SetMode("wait");
  const std::string id = Submit(Spec(3));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return json::parse(Job(id, "branch/code").progress_json).value("step", 0) == 1; }));
  StopWorker();  // drains: SIGTERM, exit 75, reported as retryable
  const auto job = Job(id, "branch/code");
  EXPECT_TRUE(job.state == "READY" || job.state == "RETRY_WAIT") << job.state;
  EXPECT_NE(job.error.find("draining"), std::string::npos) << job.error;
  EXPECT_NE(job.checkpoint_uri.find("step-00000001"), std::string::npos) << job.checkpoint_uri;
  // A fresh worker picks it up as attempt 2 and finishes the pipeline.
  SetMode("ok");
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }));
  EXPECT_EQ(Job(id, "branch/code").attempt, 2);
}

TEST(ArtifactStoreTest, PublishFetchTamperAndTraversal) {
  const std::string root = *MakeTempDir("btx-artifacts");
  FileArtifactStore store(root);
  const std::string local = *MakeTempDir("btx-local");
  ASSERT_TRUE(WriteFileAtomic(local + "/a.bin", "abc").ok());
  fs::create_directories(local + "/sub");
  ASSERT_TRUE(WriteFileAtomic(local + "/sub/b.txt", "hello").ok());
  auto uri = store.Publish(local, "p1/branch-code/model");
  ASSERT_TRUE(uri.ok()) << uri.status();
  EXPECT_EQ(*uri, PathToFileUri(root + "/p1/branch-code/model"));
  EXPECT_FALSE(fs::exists(local));
  auto path = store.Fetch(*uri);
  ASSERT_TRUE(path.ok()) << path.status();
  // sha256("abc"), the standard test vector.
  EXPECT_NE(ReadFile(*path + "/manifest.sha256")->find("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a.bin"),
            std::string::npos);
  // Taken names are refused; nothing half-written appears.
  const std::string again = *MakeTempDir("btx-local");
  EXPECT_EQ(store.Publish(again, "p1/branch-code/model").status().code(), absl::StatusCode::kAlreadyExists);
  // Tampering is caught on fetch, naming the file.
  { std::ofstream(*path + "/sub/b.txt", std::ios::app) << "!"; }
  auto bad = store.Fetch(*uri);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(bad.status().message()).find("sub/b.txt"), std::string::npos) << bad.status();
  // An extra file is caught too.
  ASSERT_TRUE(WriteFileAtomic(*path + "/extra", "x").ok());
  EXPECT_NE(std::string(store.Fetch(*uri).status().message()).find("not in the manifest"), std::string::npos);
  // Traversal in names and URIs.
  EXPECT_EQ(store.Publish(again, "../escape").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Publish(again, "a/../../b").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(store.Fetch("file:///etc").ok());
  EXPECT_FALSE(store.Fetch(PathToFileUri(root + "/../x")).ok());
  EXPECT_FALSE(store.Fetch("s3://bucket/x").ok());
  // A manifest line pointing outside the dir is refused, not followed.
  const std::string evil = root + "/evil";
  fs::create_directories(evil);
  ASSERT_TRUE(WriteFileAtomic(evil + "/manifest.sha256", std::string(64, 'a') + "  ../../etc/passwd\n").ok());
  EXPECT_NE(std::string(FileArtifactStore::VerifyDir(evil).message()).find("escapes"), std::string::npos);
  EXPECT_TRUE(store.Remove(*uri).ok());
  EXPECT_FALSE(fs::exists(*path));
  fs::remove_all(root);
  fs::remove_all(again);
}

}  // namespace
}  // namespace btx::worker
