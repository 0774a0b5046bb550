// The worker against a real scheduler and PostgreSQL, with a stand-in trainer: a shell script that
// speaks the btx-train protocol (progress on fd 3, exit codes 0/65/75, atomic publish with a
// manifest). The real btx-train runs in the end-to-end suite (tests/e2e). GPU hosts are faked
// (WorkerConfig::discover_capabilities); what each child was given is what the script records.
#include "btx/worker/worker.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "btx/common/artifact_store.h"
#include "btx/common/fs.h"
#include "btx/common/status.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/contract/files.h"
#include "btx/contract/job.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/auth.h"
#include "btx/scheduler/server.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.pb.h"
#include "pg_fixture.h"
#include "test_certs.h"

namespace btx::worker {
namespace {
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using json = nlohmann::json;

// Modes, read from a file beside the script so one test can switch behaviour between attempts.
constexpr char kFakeTrain[] = R"SH(#!/bin/bash
here=$(dirname "$0")
if [ "$1" = --store-server ]; then
  # A rank group's rendezvous store: says its port, serves until SIGTERM.
  mkdir -p "$here/seen"
  echo $$ > "$here/seen/store.pid"
  echo "store starting" >&2
  echo "port 4242"
  trap 'echo "store stopping"; exit 0' TERM
  while true; do sleep 0.05; done
fi
job=$2
mode=$(cat "$here/mode")
rank=${BTX_RANK:-0}
out=$(sed -n 's/^ *"output_dir": "\(.*\)",\{0,1\}$/\1/p' "$job")
name=$(sed -n 's/^ *"name": "\(.*\)",\{0,1\}$/\1/p' "$job" | head -n1)
echo "training $name in mode $mode"
echo "a warning on stderr" >&2
if [ "$rank" = 0 ]; then
  echo '{"event":"progress","step":1,"total_steps":4,"loss":3.5,"lr":0.001,"tokens_per_s":100,"tokens":10}' >&3
  ck="$(dirname "$out")/checkpoints/step-00000001"
  mkdir -p "$ck"
  echo "{\"event\":\"checkpoint\",\"step\":1,\"path\":\"$ck\"}" >&3
fi
case "$mode" in
  group)
    # Every rank records what it was given; rank 0 then publishes, the others end after their "last step".
    mkdir -p "$here/seen"
    printf 'rank=%s world=%s rendezvous=%s timeout=%s cuda=%s' "$BTX_RANK" "$BTX_WORLD_SIZE" "$BTX_RENDEZVOUS" \
      "${BTX_DIST_TIMEOUT_S-unset}" "${CUDA_VISIBLE_DEVICES-unset}" > "$here/seen/$name.rank$rank.tmp"
    mv "$here/seen/$name.rank$rank.tmp" "$here/seen/$name.rank$rank"
    cp "$job" "$here/seen/$name.json.$rank.tmp" && mv "$here/seen/$name.json.$rank.tmp" "$here/seen/$name.json"
    [ "$rank" = 0 ] || exit 0 ;;
  rankfail|rankhang)
    # rankfail: rank 1 fails once every rank is up; the others wait in a "collective" and exit 1 on
    # SIGTERM. rankhang: rank 0 fails once rank 1 is up, and rank 1 ignores SIGTERM (a stuck rank).
    mkdir -p "$here/seen"
    if [ "$mode" = rankhang ] && [ "$rank" = 1 ]; then trap '' TERM; else trap 'echo "rank $rank got SIGTERM"; exit 1' TERM; fi
    echo $$ > "$here/seen/rank$rank.pid.tmp" && mv "$here/seen/rank$rank.pid.tmp" "$here/seen/rank$rank.pid"
    failing=1; [ "$mode" = rankhang ] && failing=0
    if [ "$rank" = "$failing" ]; then
      for r in $(seq 0 $((BTX_WORLD_SIZE - 1))); do while [ ! -e "$here/seen/rank$r.pid" ]; do sleep 0.02; done; done
      echo "rank $rank lost its device" >&2
      exit 3
    fi
    while true; do sleep 0.05; done ;;
  hold)
    # Records what this child was given, then runs until the test creates $here/release: every job
    # started before that is running at once.
    mkdir -p "$here/seen"
    cp "$job" "$here/seen/$name.json.tmp" && mv "$here/seen/$name.json.tmp" "$here/seen/$name.json"
    printf '%s' "${CUDA_VISIBLE_DEVICES-unset}" > "$here/seen/$name.env.tmp"
    mv "$here/seen/$name.env.tmp" "$here/seen/$name.env"
    trap 'exit 75' TERM
    while [ ! -e "$here/release" ]; do sleep 0.05; done ;;
  invalid)
    echo "btx-train: invalid job: train.lr: must be > 0" >&2
    exit 65 ;;
  wait)
    trap 'echo "got SIGTERM, checkpointing"; exit 75' TERM
    while true; do sleep 0.05; done ;;
  crash)
    echo "segfault-ish" >&2
    exit 3 ;;
  badutf8)
    # Bytes that are not UTF-8, and a line whose 4096-byte cut falls inside a two-byte character;
    # then, once released, a crash whose last stderr line (the job's error) is not UTF-8 either.
    printf 'bad \xff\xfe bytes\n'
    printf '%4095s' '' | tr ' ' a; printf '\xc3\xa9 after the cut\n'
    trap 'exit 75' TERM
    while [ ! -e "$here/release" ]; do sleep 0.05; done
    printf 'broken \xc3\n' >&2
    exit 3 ;;
  env)
    # What this child can see of the worker: its own environment, and the worker's through /proc.
    mkdir -p "$here/seen"
    env > "$here/seen/$name.environ"
    { tr '\0' '\n' < "/proc/$PPID/environ"; tr '\0' ' ' < "/proc/$PPID/cmdline"; } > "$here/seen/$name.parent" 2>&1 ;;
esac
if [ -e "$out/manifest.sha256" ]; then
  # Published by an earlier attempt (btx-train verifies and reuses it; the worker verifies it after).
  echo "reusing $out"
  echo "{\"event\":\"done\",\"artifact\":\"$out\",\"metrics\":{\"valid_loss\":2.5}}" >&3
  exit 0
fi
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

// A host with `gpus` GPUs and no driver behind them.
Capabilities FakeGpuHost(int gpus) {
  Capabilities c;
  c.cpu_threads = 8;
  c.memory_bytes = int64_t{64} << 30;
  for (int i = 0; i < gpus; ++i) {
    c.gpu_memory_bytes.push_back(int64_t{80} << 30);
    c.gpu_names.push_back("Fake GPU");
  }
  return c;
}

// Every AcquireJob the worker sends, seen on its channel: what it said it had free. With `claim_as`
// set, the request goes out with that free_gpus instead (a scheduler that hands out more than the
// worker has).
class AcquireRecorder {
 public:
  explicit AcquireRecorder(std::optional<int> claim_as = std::nullopt) : claim_as_(claim_as) {}
  void Add(int free_gpus) {
    std::lock_guard lock(mu_);
    sent_.push_back(free_gpus);
  }
  std::vector<int> sent() const {
    std::lock_guard lock(mu_);
    return sent_;
  }
  std::optional<int> claim_as() const { return claim_as_; }

 private:
  const std::optional<int> claim_as_;
  mutable std::mutex mu_;
  std::vector<int> sent_;
};

class AcquireInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit AcquireInterceptor(AcquireRecorder& recorder) : recorder_(recorder) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      const auto* req = static_cast<const v1::AcquireJobRequest*>(methods->GetSendMessage());
      if (req != nullptr) {
        recorder_.Add(req->free_gpus());
        if (recorder_.claim_as()) {
          replaced_ = *req;
          replaced_.set_free_gpus(*recorder_.claim_as());
          methods->ModifySendMessage(&replaced_);
        }
      }
    }
    methods->Proceed();
  }

 private:
  AcquireRecorder& recorder_;
  v1::AcquireJobRequest replaced_;  // outlives the send, as ModifySendMessage requires
};

class AcquireInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit AcquireInterceptorFactory(AcquireRecorder& recorder) : recorder_(recorder) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo* info) override {
    if (std::string(info->method()) != "/btx.v1.WorkerService/AcquireJob") return nullptr;
    return new AcquireInterceptor(recorder_);
  }

 private:
  AcquireRecorder& recorder_;
};

// A spec btx-train's contract accepts, so that the JOB.json the worker writes can be parsed back as is.
constexpr char kBranchSpec[] = R"({"seed": "/models/seed", "data": {"train": ["/d/code"]}, "steps": 3})";

struct GpuJob {
  std::string name;
  int gpus = 0;
  int priority = 0;  // claimed lowest first
  int ranks = 1;
};

class WorkerTest : public ::testing::Test {
 protected:
  explicit WorkerTest(Duration lease = 5s)
      : lease_(lease), conninfo_(btx::testing::NewMigratedDatabase()), pool_(conninfo_, 8), store_(pool_) {
    dir_ = *MakeTempDir("btx-worker-test");
    EXPECT_TRUE(WriteFileAtomic(dir_ + "/btx-train", kFakeTrain).ok());
    ::chmod((dir_ + "/btx-train").c_str(), 0755);
    SetMode("ok");
    scheduler::SchedulerConfig sc;
    sc.artifact_root = dir_ + "/artifacts";
    sc.lease = lease_;
    sc.heartbeat_interval = 100ms;
    sc.reap_interval = std::min<Duration>(200ms, lease_ / 5);
    sc.retry.base = 10ms;
    sc.retry.max = 200ms;
    scheduler_ = std::make_unique<scheduler::Scheduler>(sc, store_, clock_, conninfo_);
    auto port = scheduler_->Start();
    EXPECT_TRUE(port.ok()) << port.status();
    address_ = "127.0.0.1:" + std::to_string(port.ok() ? *port : 0);
    channel_ = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    pipelines_ = v1::PipelineService::NewStub(channel_);
  }
  ~WorkerTest() override {
    StopWorker();
    scheduler_->Shutdown();
    fs::remove_all(dir_);
  }

  void SetMode(const std::string& mode) { ASSERT_TRUE(WriteFileAtomic(dir_ + "/mode", mode).ok()); }

  // `adjust` changes the defaults; with `recorder`, the worker's AcquireJob calls go through it.
  void StartWorker(const std::function<void(WorkerConfig&)>& adjust = {}, AcquireRecorder* recorder = nullptr) {
    WorkerConfig wc;
    wc.name = "w1";
    wc.train_binary = dir_ + "/btx-train";
    wc.work_dir = dir_ + "/work";
    wc.threads_per_job = 1;
    wc.poll_wait = 2s;
    wc.stop_grace = 10s;
    if (adjust) adjust(wc);
    auto channel = channel_;
    if (recorder != nullptr) {
      std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
      interceptors.push_back(std::make_unique<AcquireInterceptorFactory>(*recorder));
      channel = grpc::experimental::CreateCustomChannelWithInterceptors(address_, grpc::InsecureChannelCredentials(),
                                                                       grpc::ChannelArguments(), std::move(interceptors));
    }
    registry_ = std::make_unique<metrics::Registry>();  // one per worker: metric names are unique per registry
    worker_ = std::make_unique<Worker>(wc, channel, launcher_, clock_, registry_.get());
    thread_ = std::thread([this] { worker_->Run(); });
  }
  void StopWorker() {
    if (!worker_) return;
    worker_->Drain();
    thread_.join();
    worker_.reset();
  }

  // Straight into the database: submit plans jobs of at most one GPU, the store takes any count.
  std::string CreatePipeline(const std::vector<GpuJob>& jobs, int max_attempts = 1) {
    storage::NewPipeline p;
    p.name = "gpus";
    p.spec_json = "{}";
    for (const auto& j : jobs) {
      p.jobs.push_back({.name = j.name, .kind = "branch", .spec_json = kBranchSpec, .depends_on = {},
                        .max_attempts = max_attempts, .gpus = j.gpus, .ranks = j.ranks, .priority = j.priority});
    }
    auto created = store_.CreatePipeline(p, clock_.Now());
    EXPECT_TRUE(created.ok()) << created.status();
    return created.ok() ? created->first.id : "";
  }
  // What the fake trainer recorded for job `name` ("" before it started): its CUDA_VISIBLE_DEVICES
  // ("unset" when it had none) and its JOB.json.
  std::string SeenEnv(const std::string& name) { return ReadFile(dir_ + "/seen/" + name + ".env").value_or(""); }
  std::string SeenJob(const std::string& name) { return ReadFile(dir_ + "/seen/" + name + ".json").value_or(""); }
  bool Started(const std::string& name) { return fs::exists(dir_ + "/seen/" + name + ".env"); }
  void Release() { ASSERT_TRUE(WriteFileAtomic(dir_ + "/release", "").ok()); }

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
  const Duration lease_;
  std::string conninfo_;
  std::string address_;
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
    EXPECT_TRUE(VerifyManifest(*path).ok()) << *path;
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
  EXPECT_TRUE(VerifyManifest(*FileUriToPath(job.artifact_uri)).ok());
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

// A drain is not the job's fault: on its only attempt (max_attempts 1) the job is requeued, not
// failed, and a fresh worker finishes it.
TEST_F(WorkerTest, DrainDoesNotUseUpTheLastAttempt) {
  SetMode("wait");
  const std::string id = Submit(Spec(1));
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return json::parse(Job(id, "branch/code").progress_json).value("step", 0) == 1; }));
  StopWorker();  // drains: SIGTERM, exit 75, reported as interrupted
  const auto job = Job(id, "branch/code");
  EXPECT_TRUE(job.state == "READY" || job.state == "RETRY_WAIT") << job.state << ": " << job.error;
  EXPECT_EQ(store_.GetPipeline(id)->state, "RUNNING");
  SetMode("ok");
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }));
  EXPECT_EQ(Job(id, "branch/code").attempt, 2);
}

// A fake 4-GPU host with more slots than GPUs: four 1-GPU jobs and a CPU job run at once, each GPU job
// on a device of its own; a fifth GPU job waits until a device is free, because the worker says it has
// none (free_gpus counts devices, not slots).
TEST_F(WorkerTest, GpuJobsRunAtOnceOnDistinctDevicesAndCpuJobsSeeNone) {
  SetMode("hold");
  const std::string id = CreatePipeline({{"g1", 1, 0}, {"g2", 1, 0}, {"g3", 1, 0}, {"g4", 1, 0},
                                         {"cpu", 0, 1}, {"g5", 1, 2}});
  AcquireRecorder recorder;
  StartWorker(
      [](WorkerConfig& wc) {
        wc.discover_capabilities = [] { return FakeGpuHost(4); };
        wc.slots = 6;
      },
      &recorder);
  auto zeros = [&] {
    const auto sent = recorder.sent();
    return std::count(sent.begin(), sent.end(), 0);
  };
  // The CPU job is claimed with free_gpus 0 (all four devices held); the call after it is the one
  // that must not get g5.
  ASSERT_TRUE(Eventually([&] {
    return Started("g1") && Started("g2") && Started("g3") && Started("g4") && Started("cpu") && zeros() >= 2;
  })) << "sent free_gpus: " << ::testing::PrintToString(recorder.sent());
  EXPECT_FALSE(Started("g5"));
  EXPECT_EQ(Job(id, "g5").state, "READY");
  EXPECT_EQ(worker_->running_jobs(), 5);

  std::set<std::string> devices;
  for (const std::string name : {"g1", "g2", "g3", "g4"}) {
    const std::string env = SeenEnv(name);
    EXPECT_TRUE(env == "0" || env == "1" || env == "2" || env == "3") << name << ": CUDA_VISIBLE_DEVICES=" << env;
    devices.insert(env);
    const auto job = json::parse(SeenJob(name));
    EXPECT_EQ(job["device"], "cuda") << name;
    EXPECT_EQ(job["kind"], "branch") << name;
    // What the worker writes is what the contract reads.
    auto parsed = contract::ParseJobFileText(SeenJob(name));
    EXPECT_TRUE(parsed.ok()) << parsed.status().message();
  }
  EXPECT_EQ(devices.size(), 4u) << "two jobs share a GPU";
  // A CPU job is shown no GPU at all, rather than inheriting the worker's.
  EXPECT_EQ(SeenEnv("cpu"), "");
  EXPECT_EQ(json::parse(SeenJob("cpu"))["device"], "cpu");

  Release();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }))
      << store_.GetPipeline(id)->state << " " << store_.GetPipeline(id)->error;
  const std::string g5 = SeenEnv("g5");
  EXPECT_TRUE(g5 == "0" || g5 == "1" || g5 == "2" || g5 == "3") << g5;
  EXPECT_NE(Logs(Job(id, "g5").id).find("on cuda (CUDA_VISIBLE_DEVICES=" + g5 + ")"), std::string::npos);
  // Every device comes back once its job has ended.
  ASSERT_TRUE(Eventually([&] { return !recorder.sent().empty() && recorder.sent().back() == 4; }));
  for (int free_gpus : recorder.sent()) EXPECT_TRUE(free_gpus >= 0 && free_gpus <= 4) << free_gpus;
}

// A 2-GPU job (the store takes any count) holds two distinct devices, shared with no other job; a 3-GPU
// job waits while only one is free.
TEST_F(WorkerTest, MultiGpuJobGetsThatManyDevicesOfItsOwn) {
  SetMode("hold");
  const std::string id = CreatePipeline({{"pair", 2, 0}, {"single", 1, 1}, {"triple", 3, 2}});
  AcquireRecorder recorder;
  StartWorker([](WorkerConfig& wc) { wc.discover_capabilities = [] { return FakeGpuHost(4); }; }, &recorder);
  ASSERT_TRUE(Eventually([&] {
    const auto sent = recorder.sent();
    return Started("pair") && Started("single") && std::count(sent.begin(), sent.end(), 1) >= 1;
  })) << "sent free_gpus: " << ::testing::PrintToString(recorder.sent());
  EXPECT_FALSE(Started("triple"));
  EXPECT_EQ(Job(id, "triple").state, "READY");

  const auto pair = Split(SeenEnv("pair"), ',');
  ASSERT_EQ(pair.size(), 2u) << SeenEnv("pair");
  EXPECT_NE(pair[0], pair[1]);
  const std::string single = SeenEnv("single");
  EXPECT_NE(single, pair[0]);
  EXPECT_NE(single, pair[1]);
  for (const auto& d : {pair[0], pair[1], single}) EXPECT_TRUE(d == "0" || d == "1" || d == "2" || d == "3") << d;
  EXPECT_EQ(json::parse(SeenJob("pair"))["device"], "cuda");

  Release();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }))
      << store_.GetPipeline(id)->state << " " << store_.GetPipeline(id)->error;
  const auto triple = Split(SeenEnv("triple"), ',');
  EXPECT_EQ(std::set<std::string>(triple.begin(), triple.end()).size(), 3u) << SeenEnv("triple");
  for (int free_gpus : recorder.sent()) EXPECT_TRUE(free_gpus >= 0 && free_gpus <= 4) << free_gpus;
}

// A scheduler that assigns more GPUs than the worker has free (here: one that claims as if it had 8)
// gets the attempt back with the reason; the job never runs on fewer devices than it asked for.
TEST_F(WorkerTest, AssignmentNeedingMoreGpusThanFreeIsFailedBackNotRunOnFewer) {
  SetMode("hold");
  const std::string id = CreatePipeline({{"pair", 2, 0}});
  AcquireRecorder recorder(/*claim_as=*/8);
  StartWorker([](WorkerConfig& wc) { wc.discover_capabilities = [] { return FakeGpuHost(1); }; }, &recorder);
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "pair");
  EXPECT_NE(job.error.find("needs 2 GPUs but this worker has 1 free (of 1); it is not run on fewer"), std::string::npos)
      << job.error;
  EXPECT_FALSE(Started("pair"));
  EXPECT_EQ(recorder.sent().front(), 1);
}

// Rank groups (docs/btx-train-protocol.md, "Several ranks"): the fake trainer plays the rendezvous
// store (`--store-server 0` prints `port 4242`) and every rank records what it was given.
bool Gone(const std::string& pid_file) {
  auto text = ReadFile(pid_file);
  if (!text.ok()) return false;
  const pid_t pid = static_cast<pid_t>(std::stol(*text));
  return ::kill(pid, 0) != 0 && errno == ESRCH;
}

// A CPU job of 3 ranks shares its slot's 6 threads (2 each); a 2-GPU job runs 2 ranks of one device
// each. Every rank gets the rendezvous and its rank; rank 0 alone reports progress and publishes; every
// rank's lines reach the job's log, the others' prefixed with their rank; the store is stopped at the end.
TEST_F(WorkerTest, RankGroupGivesEachRankItsDeviceAndThreadsAndLogsEveryRank) {
  SetMode("group");
  const std::string id = CreatePipeline({{.name = "grp", .gpus = 0, .priority = 0, .ranks = 3},
                                         {.name = "gpair", .gpus = 2, .priority = 1, .ranks = 2}});
  StartWorker([](WorkerConfig& wc) {
    wc.discover_capabilities = [] { return FakeGpuHost(4); };
    wc.slots = 2;
    wc.threads_per_job = 6;
    wc.dist_timeout = 7s;
  });
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }))
      << store_.GetPipeline(id)->state << " " << store_.GetPipeline(id)->error << "\n" << Logs(Job(id, "grp").id);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(ReadFile(Cat(dir_, "/seen/grp.rank", r)).value_or(""),
              Cat("rank=", r, " world=3 rendezvous=127.0.0.1:4242 timeout=7 cuda="));
  }
  EXPECT_EQ(json::parse(SeenJob("grp"))["threads"], 2);
  EXPECT_EQ(json::parse(SeenJob("grp"))["device"], "cpu");
  std::set<std::string> devices;
  for (int r = 0; r < 2; ++r) {
    const std::string seen = ReadFile(Cat(dir_, "/seen/gpair.rank", r)).value_or("");
    const std::string cuda = seen.substr(seen.find("cuda=") + 5);
    EXPECT_TRUE(cuda == "0" || cuda == "1" || cuda == "2" || cuda == "3") << seen;
    devices.insert(cuda);
  }
  EXPECT_EQ(devices.size(), 2u) << "two ranks share a GPU";
  EXPECT_EQ(json::parse(SeenJob("gpair"))["threads"], 3);
  EXPECT_EQ(json::parse(SeenJob("gpair"))["device"], "cuda");

  const auto job = Job(id, "grp");
  EXPECT_EQ(job.attempt, 1);
  EXPECT_EQ(json::parse(job.progress_json).value("total_steps", 0), 4) << job.progress_json;
  EXPECT_TRUE(VerifyManifest(*FileUriToPath(job.artifact_uri)).ok());
  const std::string logs = Logs(job.id);
  for (const std::string line :
       {"[stdout] training grp in mode group", "[stdout] [rank 1] training grp in mode group",
        "[stderr] [rank 2] a warning on stderr", "[stderr] [rendezvous] store starting",
        "[stdout] [rendezvous] store stopping", "as 3 ranks", "with 2 threads per rank"}) {
    EXPECT_NE(logs.find(line), std::string::npos) << line << "\n" << logs;
  }
}

// One rank failing fails the attempt as a group: the others are stopped (SIGTERM), the store too, and
// the job is reported once, with the failing rank's own error.
TEST_F(WorkerTest, RankFailureStopsTheWholeGroupAndReportsThatRanksError) {
  SetMode("rankfail");
  const std::string id = CreatePipeline({{.name = "grp", .gpus = 0, .priority = 0, .ranks = 3}});
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "grp");
  EXPECT_EQ(job.attempt, 1);
  EXPECT_NE(job.error.find("btx-train rank 1 of 3 exited with code 3: rank 1 lost its device"), std::string::npos)
      << job.error;
  const std::string logs = Logs(job.id);
  for (const std::string line : {"[stderr] [rank 1] rank 1 lost its device", "[stdout] rank 0 got SIGTERM",
                                 "[stdout] [rank 2] rank 2 got SIGTERM", "[worker] rank 1 of 3 failed: stopping the group",
                                 "[stdout] [rendezvous] store stopping"}) {
    EXPECT_NE(logs.find(line), std::string::npos) << line << "\n" << logs;
  }
  for (const std::string f : {"rank0.pid", "rank1.pid", "rank2.pid", "store.pid"}) {
    EXPECT_TRUE(Gone(dir_ + "/seen/" + f)) << f << " still running";
  }
  EXPECT_EQ(worker_->running_jobs(), 0);
}

// A rank that does not stop (stuck outside a collective, SIGTERM ignored) is killed after the grace.
TEST_F(WorkerTest, StuckRankIsKilledAfterTheGraceWhenItsGroupFails) {
  SetMode("rankhang");
  const std::string id = CreatePipeline({{.name = "grp", .gpus = 0, .priority = 0, .ranks = 2}});
  StartWorker([](WorkerConfig& wc) { wc.stop_grace = 200ms; });
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "grp");
  EXPECT_NE(job.error.find("btx-train rank 0 of 2 exited with code 3: rank 0 lost its device"), std::string::npos)
      << job.error;
  EXPECT_NE(Logs(job.id).find("after the group was told to end: SIGKILL"), std::string::npos) << Logs(job.id);
  EXPECT_NE(Logs(job.id).find("[worker] rank 1 of 2 exited with code 137"), std::string::npos) << Logs(job.id);
  for (const std::string f : {"rank0.pid", "rank1.pid", "store.pid"}) EXPECT_TRUE(Gone(dir_ + "/seen/" + f)) << f;
}

// A cancel reaches every rank of the group, not only rank 0.
TEST_F(WorkerTest, CancelStopsEveryRankOfTheGroup) {
  SetMode("wait");
  const std::string id = CreatePipeline({{.name = "grp", .gpus = 0, .priority = 0, .ranks = 2}});
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return json::parse(Job(id, "grp").progress_json).value("step", 0) == 1; }));
  grpc::ClientContext ctx;
  v1::CancelRequest req;
  req.set_id(id);
  v1::Pipeline resp;
  ASSERT_TRUE(pipelines_->Cancel(&ctx, req, &resp).ok());
  ASSERT_TRUE(Eventually([&] { return Job(id, "grp").state == "CANCELLED"; }));
  EXPECT_TRUE(Eventually([&] { return worker_->running_jobs() == 0; }));
  const std::string logs = Logs(Job(id, "grp").id);
  EXPECT_NE(logs.find("[stdout] got SIGTERM, checkpointing"), std::string::npos) << logs;
  EXPECT_NE(logs.find("[stdout] [rank 1] got SIGTERM, checkpointing"), std::string::npos) << logs;
  EXPECT_NE(logs.find("[stdout] [rendezvous] store stopping"), std::string::npos) << logs;
}

// A drain stops every rank (each checkpoints and exits 75): the attempt is interrupted, not failed, and
// the next worker runs the group again.
TEST_F(WorkerTest, DrainStopsEveryRankAndTheGroupRunsAgainElsewhere) {
  SetMode("wait");
  const std::string id = CreatePipeline({{.name = "grp", .gpus = 0, .priority = 0, .ranks = 2}});
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return json::parse(Job(id, "grp").progress_json).value("step", 0) == 1; }));
  StopWorker();
  auto job = Job(id, "grp");
  EXPECT_TRUE(job.state == "READY" || job.state == "RETRY_WAIT") << job.state << ": " << job.error;
  EXPECT_NE(job.error.find("draining"), std::string::npos) << job.error;
  const std::string logs = Logs(job.id);
  EXPECT_NE(logs.find("[stdout] got SIGTERM, checkpointing"), std::string::npos) << logs;
  EXPECT_NE(logs.find("[stdout] [rank 1] got SIGTERM, checkpointing"), std::string::npos) << logs;
  SetMode("group");
  StartWorker();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }));
  EXPECT_EQ(Job(id, "grp").attempt, 2);
}

// btx-train's output is bytes, protobuf string fields must be UTF-8: a line that is not, or a 4096-byte
// cut inside a character, made every heartbeat of the worker fail (and then its jobs were killed for
// want of a lease), and a stderr line that is not made the Fail carrying it fail. The worker replaces
// what is not UTF-8 with U+FFFD and cuts only between characters.
TEST_F(WorkerTest, OutputThatIsNotUtf8NeverFailsAHeartbeatOrTheFailCarryingIt) {
  SetMode("badutf8");
  const std::string id = Submit(Spec(1));
  StartWorker();
  const std::string fffd = "\xEF\xBF\xBD";
  // Carried by heartbeats while the job runs.
  ASSERT_TRUE(Eventually([&] {
    const auto job = Job(id, "branch/code");
    return (job.state == "LEASED" || job.state == "RUNNING") &&
           Logs(job.id).find("bad " + fffd + fffd + " bytes") != std::string::npos;
  }, 30s)) << Job(id, "branch/code").state << "\n" << Logs(Job(id, "branch/code").id);
  const std::string logs = Logs(Job(id, "branch/code").id);
  EXPECT_NE(logs.find("[stdout] " + std::string(4095, 'a') + " …[truncated]\n"), std::string::npos) << logs;
  Release();
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "FAILED"; }));
  const auto job = Job(id, "branch/code");
  EXPECT_EQ(job.attempt, 1);
  EXPECT_NE(job.error.find("btx-train exited with code 3: broken " + fffd), std::string::npos) << job.error;
  EXPECT_NE(registry_->Serialize().find("btx_worker_heartbeat_failures_total{worker=\"w1\"} 0"), std::string::npos)
      << registry_->Serialize();
}

// Waits in the worker's manifest check until the test lets it go (a 14 GB model takes minutes to hash).
class VerifyGate {
 public:
  absl::Status Verify(const std::string& dir) {
    std::unique_lock lock(mu_);
    entered_ = true;
    cv_.notify_all();
    // Bounded, so that a test that fails never leaves the worker stuck here.
    cv_.wait_for(lock, 120s, [&] { return released_; });
    lock.unlock();
    return ToAbsl(VerifyManifest(dir));
  }
  bool WaitEntered(std::chrono::seconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return entered_; });
  }
  void Release() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false, released_ = false;
};

class ShortLeaseWorkerTest : public WorkerTest {
 protected:
  ShortLeaseWorkerTest() : WorkerTest(1s) {}
};

// The output of a finished job is hashed before Complete; heartbeats must renew the job's lease all
// the while, or a job whose output takes longer to hash than a lease (a 7B model: 14 GB) fails every
// attempt.
TEST_F(ShortLeaseWorkerTest, LeaseIsRenewedWhileTheOutputIsVerified) {
  const std::string id = CreatePipeline({{"big", 0, 0}}, /*max_attempts=*/1);
  auto gate = std::make_shared<VerifyGate>();
  StartWorker([gate](WorkerConfig& wc) { wc.verify_artifact = [gate](const std::string& dir) { return gate->Verify(dir); }; });
  ASSERT_TRUE(gate->WaitEntered(60s));
  const TimePoint entered = clock_.Now();
  // Four leases into the verification the job is still this attempt's, with a deadline renewed since.
  const bool renewed = Eventually([&] {
    const auto job = Job(id, "big");
    return (job.state == "LEASED" || job.state == "RUNNING") && job.attempt == 1 && job.lease_deadline &&
           *job.lease_deadline > entered + 4 * lease_;
  }, 30s);
  gate->Release();
  const auto during = Job(id, "big");
  ASSERT_TRUE(renewed) << during.state << " attempt " << during.attempt << ": " << during.error;
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }))
      << store_.GetPipeline(id)->state << " " << Job(id, "big").error;
  EXPECT_EQ(Job(id, "big").attempt, 1);
}

// Threads of this process, and thread stacks mapped in it. glibc unmaps (or caches, up to 40 MiB) the
// stack of a thread only once it has been joined: a thread that has ended without being joined is no
// task any more, but its stack stays.
size_t Tasks() { return static_cast<size_t>(std::distance(fs::directory_iterator("/proc/self/task"), {})); }
size_t ThreadStacks() {
  // A thread stack: an anonymous read-write mapping right above a one-page inaccessible guard.
  std::ifstream maps("/proc/self/maps");
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  size_t stacks = 0;
  uintptr_t prev_end = 0;
  bool prev_guard = false;
  for (std::string line; std::getline(maps, line);) {
    std::istringstream in(line);
    std::string range, perms, offset, dev, path;
    unsigned long inode = 0;
    in >> range >> perms >> offset >> dev >> inode >> path;
    const auto dash = range.find('-');
    const uintptr_t start = std::stoull(range.substr(0, dash), nullptr, 16);
    const uintptr_t end = std::stoull(range.substr(dash + 1), nullptr, 16);
    const bool anonymous = inode == 0 && path.empty();
    if (anonymous && perms == "rw-p" && prev_guard && prev_end == start) ++stacks;
    prev_guard = anonymous && perms == "---p" && end - start == page;
    prev_end = end;
  }
  return stacks;
}

// Each job is supervised by a thread of its own; those must be joined once done, or a long-lived
// worker accumulates one (a stack, and a std::thread) per job it ever ran.
TEST_F(WorkerTest, SupervisorThreadsAreJoinedSoThreadsStayBoundedOverManyJobs) {
  constexpr int kJobs = 200;
  std::vector<GpuJob> jobs;
  for (int i = 0; i < kJobs; ++i) jobs.push_back({Cat("j", i), 0, 0});
  const std::string id = CreatePipeline(jobs);
  const size_t tasks_before = Tasks();
  StartWorker([](WorkerConfig& wc) {
    wc.discover_capabilities = [] { return FakeGpuHost(0); };
    wc.slots = 3;
  });
  size_t max_tasks = 0, max_unjoined = 0;
  auto sample = [&] {
    const size_t tasks = Tasks(), stacks = ThreadStacks();
    max_tasks = std::max(max_tasks, tasks);
    max_unjoined = std::max(max_unjoined, stacks > tasks ? stacks - tasks : 0);
  };
  ASSERT_TRUE(Eventually([&] {
    sample();
    return store_.GetPipeline(id)->state == "SUCCEEDED";
  }, 300s)) << store_.GetPipeline(id)->jobs_succeeded << " of " << kJobs << " jobs done";
  sample();
  // Per job at most a supervisor and a pipe reader (3 slots), the worker's own few, gRPC's pools.
  EXPECT_LE(max_tasks, tasks_before + 40) << "threads before the worker: " << tasks_before;
  // Stacks without a thread: glibc's cache of freed stacks (40 MiB, five 8 MiB stacks), not one per job.
  EXPECT_LE(max_unjoined, 8u) << "thread stacks beyond live threads after " << kJobs << " jobs";
}

// A read error is no proof that a published output is bad (EIO, ESTALE, EACCES, or here EWOULDBLOCK:
// another process holds a lease on the file). The worker must fail the attempt, keep the output, and let
// a later attempt use it; only a positive finding (digest mismatch, missing or unlisted file) removes it.
TEST_F(WorkerTest, ReadErrorOnAPublishedOutputFailsTheAttemptAndNeverRemovesIt) {
  const std::string id = CreatePipeline({{"pub", 0, 0}}, /*max_attempts=*/100);
  const std::string out = Cat(dir_, "/artifacts/", id, "/pub/model");
  const std::string weights = "published weights\n";
  fs::create_directories(out);
  ASSERT_TRUE(WriteFileAtomic(out + "/model.bin", weights).ok());
  ASSERT_TRUE(WriteFileAtomic(out + "/manifest.sha256", Sha256Hex(weights.data(), weights.size()) + "  model.bin\n").ok());
  ASSERT_TRUE(VerifyManifest(out).ok());
  // A write lease: until it is given up, every other open of model.bin with O_NONBLOCK (as the manifest
  // check opens files) fails with EWOULDBLOCK. Its break is signalled with SIGIO, ignored here.
  std::signal(SIGIO, SIG_IGN);
  const int fd = ::open((out + "/model.bin").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  if (::fcntl(fd, F_SETLEASE, F_WRLCK) != 0) {
    ::close(fd);
    GTEST_SKIP() << "no file leases here: " << std::strerror(errno);
  }
  StartWorker();
  ASSERT_TRUE(Eventually([&] {
    const auto job = Job(id, "pub");
    return !job.error.empty() || job.state == "SUCCEEDED";
  }, 60s));
  const auto failed = Job(id, "pub");
  EXPECT_NE(failed.error.find("cannot verify"), std::string::npos) << failed.state << ": " << failed.error;
  // Still there (looked at without opening it: an open would wait for the lease to break).
  std::error_code ec;
  EXPECT_EQ(fs::file_size(out + "/model.bin", ec), weights.size()) << ec.message();
  ::fcntl(fd, F_SETLEASE, F_UNLCK);
  ::close(fd);
  EXPECT_EQ(ReadFile(out + "/model.bin").value_or("(gone)"), weights);
  // Readable again: the next attempt reuses the output as it was published.
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }))
      << store_.GetPipeline(id)->state << " " << Job(id, "pub").error;
  const auto job = Job(id, "pub");
  EXPECT_GE(job.attempt, 2);
  EXPECT_EQ(ReadFile(out + "/model.bin").value_or("(gone)"), weights);
  EXPECT_NE(Logs(job.id).find("[stdout] reusing " + out), std::string::npos) << Logs(job.id);
  EXPECT_EQ(Logs(job.id).find("removed"), std::string::npos) << Logs(job.id);
}

// A variable set in the test process for as long as it lives.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) { ::setenv(name, value.c_str(), 1); }
  ~ScopedEnv() { ::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

constexpr char kWorkerToken[] = "worker-token-3f9a1c7e5b";

// btx-train runs whatever the job says; it must not be able to take the worker's credentials.
TEST_F(WorkerTest, TheJobNeverSeesTheWorkersToken) {
  ScopedEnv worker_token("BTX_WORKER_TOKEN", kWorkerToken);
  ScopedEnv user_token("BTX_TOKEN", "user-token-8d2e6f");
  SetMode("env");
  const std::string id = CreatePipeline({{"envjob", 0, 0}});
  StartWorker([](WorkerConfig& wc) { wc.bearer_token = kWorkerToken; });
  ASSERT_TRUE(Eventually([&] { return store_.GetPipeline(id)->state == "SUCCEEDED"; }));
  const std::string env = ReadFile(dir_ + "/seen/envjob.environ").value_or("");
  ASSERT_NE(env.find("CUDA_VISIBLE_DEVICES="), std::string::npos) << env;
  EXPECT_EQ(env.find(kWorkerToken), std::string::npos) << env;
  EXPECT_EQ(env.find("BTX_WORKER_TOKEN"), std::string::npos) << env;
  EXPECT_EQ(env.find("user-token-8d2e6f"), std::string::npos) << env;
}

// The btx-worker daemon itself, as a process: its flags, and what its children can see of it.
class WorkerDaemonTest : public WorkerTest {
 protected:
  ~WorkerDaemonTest() override {
    for (auto& p : daemons_) p->Signal(SIGKILL);
    daemons_.clear();
    if (tls_scheduler_) tls_scheduler_->Shutdown();
  }

  // A second scheduler on the same database, serving TLS, whose only credential is the worker token.
  void StartTlsScheduler() {
    fs::create_directories(dir_ + "/pki");
    ca_ = std::make_unique<btx::testing::TestCa>(dir_ + "/pki", "test");
    const auto server = ca_->IssueServer("scheduler");
    scheduler::SchedulerConfig sc;
    sc.artifact_root = dir_ + "/artifacts";
    sc.lease = 5s;
    sc.heartbeat_interval = 100ms;
    sc.reap_interval = 200ms;
    sc.security.cert_pem = server.cert_pem;
    sc.security.key_pem = server.key_pem;
    auto identities = scheduler::ParseIdentities(scheduler::TokenDigest(kWorkerToken) + " worker daemons\n", "test");
    ASSERT_TRUE(identities.ok()) << identities.status();
    sc.security.identities = *identities;
    tls_scheduler_ = std::make_unique<scheduler::Scheduler>(sc, store_, clock_, conninfo_);
    auto port = tls_scheduler_->Start();
    ASSERT_TRUE(port.ok()) << port.status();
    tls_address_ = "127.0.0.1:" + std::to_string(*port);
  }

  // btx-worker with these flags (after the usual ones) and extra environment; output to <name>.log.
  Process* Launch(const std::string& name, std::vector<std::string> flags,
                  std::vector<std::pair<std::string, std::string>> env = {}) {
    ProcessSpec ps;
    ps.argv = {BTX_WORKER_BINARY, "--name", name, "--work-dir", dir_ + "/work-" + name, "--train-binary",
               dir_ + "/btx-train", "--threads-per-job", "1", "--poll-seconds", "1"};
    ps.argv.insert(ps.argv.end(), flags.begin(), flags.end());
    ps.env = std::move(env);
    ps.stdout_path = ps.stderr_path = DaemonLog(name);
    auto p = launcher_.Launch(ps);
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return nullptr;
    daemons_.push_back(std::move(*p));
    return daemons_.back().get();
  }
  std::string DaemonLog(const std::string& name) { return dir_ + "/" + name + ".log"; }
  bool Finished(const std::string& pipeline) {
    const std::string state = store_.GetPipeline(pipeline)->state;
    return state == "SUCCEEDED" || state == "FAILED" || state == "CANCELLED";
  }
  // Its exit code, or nullopt when it is still running at the deadline (then it is killed).
  std::optional<int> WaitExit(Process& p, std::chrono::seconds limit = 30s) {
    std::optional<int> code;
    Eventually([&] { return (code = p.Poll()).has_value(); }, limit);
    if (!code) p.Signal(SIGKILL);
    return code;
  }
  std::vector<std::string> TlsFlags() { return {"--scheduler", tls_address_, "--tls-ca", ca_->cert_file(), "--metrics-listen", ""}; }

  std::unique_ptr<btx::testing::TestCa> ca_;
  std::unique_ptr<scheduler::Scheduler> tls_scheduler_;
  std::string tls_address_;
  std::vector<std::unique_ptr<Process>> daemons_;
};

// A token on the command line is readable by every user of the machine (ps, /proc/PID/cmdline): the
// worker takes it from a file or its environment only, and no job it runs can read it, neither in its
// own environment nor in the worker's (/proc/PPID/environ).
TEST_F(WorkerDaemonTest, TokenComesFromAFileOrTheEnvironmentNeverArgvAndNoJobCanReadIt) {
  StartTlsScheduler();
  SetMode("env");
  // On the command line: refused before anything starts.
  {
    Process* p = Launch("argv", {"--token", kWorkerToken, "--scheduler", tls_address_, "--tls-ca", ca_->cert_file(),
                                 "--metrics-listen", ""});
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(WaitExit(*p), std::optional<int>(2)) << ReadFile(DaemonLog("argv")).value_or("");
    EXPECT_NE(ReadFile(DaemonLog("argv")).value_or("").find("--token-file"), std::string::npos)
        << ReadFile(DaemonLog("argv")).value_or("");
  }
  // From the environment.
  {
    // Attempts to spare: a worker that has just exited may still have had a long poll open, and be given
    // a job it never runs.
    const std::string id = CreatePipeline({{"envjob", 0, 0}}, /*max_attempts=*/3);
    Process* p = Launch("by-env", TlsFlags(), {{"BTX_WORKER_TOKEN", kWorkerToken}});
    ASSERT_NE(p, nullptr);
    ASSERT_TRUE(Eventually([&] { return Finished(id) || p->Poll().has_value(); })) << ReadFile(DaemonLog("by-env")).value_or("");
    ASSERT_EQ(store_.GetPipeline(id)->state, "SUCCEEDED") << Job(id, "envjob").error << "\n" << ReadFile(DaemonLog("by-env")).value_or("");
    const std::string env = ReadFile(dir_ + "/seen/envjob.environ").value_or("(none)");
    const std::string parent = ReadFile(dir_ + "/seen/envjob.parent").value_or("(none)");
    EXPECT_EQ(env.find(kWorkerToken), std::string::npos) << env;
    EXPECT_EQ(parent.find(kWorkerToken), std::string::npos) << parent;
    p->Signal(SIGTERM);
    EXPECT_EQ(WaitExit(*p), std::optional<int>(0)) << ReadFile(DaemonLog("by-env")).value_or("");
  }
  // From a file.
  {
    ASSERT_TRUE(WriteFileAtomic(dir_ + "/token", std::string(kWorkerToken) + "\n").ok());
    ::chmod((dir_ + "/token").c_str(), 0600);
    const std::string id = CreatePipeline({{"filejob", 0, 0}}, /*max_attempts=*/3);
    std::vector<std::string> flags = TlsFlags();
    flags.insert(flags.end(), {"--token-file", dir_ + "/token"});
    Process* p = Launch("by-file", flags);
    ASSERT_NE(p, nullptr);
    ASSERT_TRUE(Eventually([&] { return Finished(id) || p->Poll().has_value(); })) << ReadFile(DaemonLog("by-file")).value_or("");
    ASSERT_EQ(store_.GetPipeline(id)->state, "SUCCEEDED") << Job(id, "filejob").error << "\n" << ReadFile(DaemonLog("by-file")).value_or("");
    const std::string env = ReadFile(dir_ + "/seen/filejob.environ").value_or("(none)");
    const std::string parent = ReadFile(dir_ + "/seen/filejob.parent").value_or("(none)");
    EXPECT_EQ(env.find(kWorkerToken), std::string::npos) << env;
    EXPECT_EQ(parent.find(kWorkerToken), std::string::npos) << parent;
    p->Signal(SIGTERM);
    EXPECT_EQ(WaitExit(*p), std::optional<int>(0)) << ReadFile(DaemonLog("by-file")).value_or("");
  }
  // A file with the wrong token: the scheduler refuses the worker, which exits 1.
  {
    ASSERT_TRUE(WriteFileAtomic(dir_ + "/wrong-token", "not-the-token\n").ok());
    std::vector<std::string> flags = TlsFlags();
    flags.insert(flags.end(), {"--token-file", dir_ + "/wrong-token"});
    Process* p = Launch("wrong", flags);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(WaitExit(*p), std::optional<int>(1)) << ReadFile(DaemonLog("wrong")).value_or("");
  }
}

// The local address a TCP socket listening on `port` is bound to ("127.0.0.1", "0.0.0.0"), from
// /proc/net/tcp; empty when there is none.
std::string ListeningAddress(int port) {
  std::ifstream tcp("/proc/net/tcp");
  std::string line;
  std::getline(tcp, line);  // header
  while (std::getline(tcp, line)) {
    std::istringstream in(line);
    std::string slot, local, remote, state;
    in >> slot >> local >> remote >> state;
    const auto colon = local.find(':');
    if (state != "0A" || colon == std::string::npos || std::stoi(local.substr(colon + 1), nullptr, 16) != port) continue;
    const uint32_t a = static_cast<uint32_t>(std::stoul(local.substr(0, colon), nullptr, 16));  // host order of a LE dump
    return Cat(a & 255, ".", (a >> 8) & 255, ".", (a >> 16) & 255, ".", a >> 24);
  }
  return "";
}

// /metrics is plain HTTP without authentication: by default only this machine can reach it.
TEST_F(WorkerDaemonTest, MetricsListenOnLoopbackUnlessToldOtherwise) {
  auto bound = [&](const std::string& name, std::vector<std::string> flags) -> std::string {
    const std::string port_file = dir_ + "/" + name + ".port";
    flags.insert(flags.end(), {"--scheduler", "127.0.0.1:1", "--metrics-port-file", port_file});
    Process* p = Launch(name, flags);
    if (p == nullptr) return "(not started)";
    std::optional<int> port;
    Eventually([&] {
      if (auto text = ReadFile(port_file); text.ok() && !text->empty()) port = std::stoi(*text);
      return port.has_value() || p->Poll().has_value();
    });
    const std::string address = port ? ListeningAddress(*port) : "(exited: " + ReadFile(DaemonLog(name)).value_or("") + ")";
    p->Signal(SIGTERM);
    EXPECT_EQ(WaitExit(*p), std::optional<int>(0)) << ReadFile(DaemonLog(name)).value_or("");
    return address;
  };
  const std::string by_default = bound("default", {});
  if (by_default.find("9091") != std::string::npos && by_default.find("in use") != std::string::npos) {
    GTEST_SKIP() << "port 9091 is taken on this machine: " << by_default;
  }
  EXPECT_EQ(by_default, "127.0.0.1");
  EXPECT_EQ(bound("everywhere", {"--metrics-listen", "0.0.0.0:0"}), "0.0.0.0");
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
  EXPECT_NE(VerifyManifest(evil).message().find("escapes"), std::string::npos);
  // A symlink is refused wherever it is: in a published artifact, or in a directory to publish.
  fs::create_symlink("/etc/passwd", *path + "/link");
  ASSERT_TRUE(fs::remove(*path + "/extra"));
  auto linked = store.Fetch(*uri);
  EXPECT_EQ(linked.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(linked.status().message()).find("symlink"), std::string::npos) << linked.status();
  const std::string with_link = *MakeTempDir("btx-local");
  fs::create_symlink("/etc/passwd", with_link + "/passwd");
  EXPECT_EQ(store.Publish(with_link, "p1/linked/model").status().code(), absl::StatusCode::kDataLoss);
  // A FIFO under a listed name fails verification instead of blocking the reader.
  const std::string fifo_dir = root + "/fifo";
  fs::create_directories(fifo_dir);
  ASSERT_EQ(::mkfifo((fifo_dir + "/model.bin").c_str(), 0644), 0);
  ASSERT_TRUE(WriteFileAtomic(fifo_dir + "/manifest.sha256", std::string(64, 'a') + "  model.bin\n").ok());
  EXPECT_EQ(VerifyManifest(fifo_dir).code(), StatusCode::kDataLoss);
  EXPECT_TRUE(store.Remove(*uri).ok());
  EXPECT_FALSE(fs::exists(*path));
  fs::remove_all(root);
  fs::remove_all(again);
  fs::remove_all(with_link);
}

}  // namespace
}  // namespace btx::worker
