// Gang jobs (resources.nodes > 1) on the worker side: node 0 starts the rendezvous store and reports it
// until acknowledged, a member k > 0 waits for it and runs its global ranks, and reports nothing when they
// all end well. JobRunner directly, and the Worker against a fake WorkerService (the scheduler's gang
// bookkeeping is tested with the scheduler). The trainer is a shell script that records what each rank
// was given. Nothing here sleeps to wait for state: tests wait on condition variables, woken by the
// clock (JobRunner) or by each RPC the fake serves (Worker).
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/time_util.h>
#include <gtest/gtest.h>

#include "btx/common/fs.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/contract/files.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "btx/worker/worker.h"
#include "job_runner.h"

namespace btx::worker {
namespace {
using namespace std::chrono_literals;
namespace fs = std::filesystem;
using google::protobuf::util::TimeUtil;

// mode ok: every rank records its environment and ends (global rank 0 publishes); fail: global rank 3
// fails once rank 2 is up, the others wait for SIGTERM and exit 1; hold: every rank runs until
// $here/release exists (exit 75 on SIGTERM).
constexpr char kFakeTrain[] = R"SH(#!/bin/bash
here=$(dirname "$0")
mkdir -p "$here/seen"
if [ "$1" = --store-server ]; then
  echo $$ > "$here/seen/store.pid"
  echo "port 4242"
  trap 'exit 0' TERM
  while true; do sleep 0.05; done
fi
job=$2
mode=$(cat "$here/mode")
rank=${BTX_RANK:-0}
out=$(sed -n 's/^ *"output_dir": "\(.*\)",\{0,1\}$/\1/p' "$job")
printf 'rank=%s world=%s rendezvous=%s progress=%s' "$BTX_RANK" "$BTX_WORLD_SIZE" "$BTX_RENDEZVOUS" "$4" > "$here/seen/rank$rank.tmp"
mv "$here/seen/rank$rank.tmp" "$here/seen/rank$rank"
echo "rank $rank up"
case "$mode" in
  fail)
    trap 'echo "rank $rank got SIGTERM"; exit 1' TERM
    if [ "$rank" = 3 ]; then
      while [ ! -e "$here/seen/rank2" ]; do sleep 0.02; done
      echo "rank 3 lost its device" >&2
      exit 3
    fi
    while true; do sleep 0.05; done ;;
  hold)
    trap 'exit 75' TERM
    while [ ! -e "$here/release" ]; do sleep 0.05; done ;;
esac
[ "$rank" = 0 ] || exit 0
tmp="$out.tmp-$$"
mkdir -p "$tmp"
echo "weights" > "$tmp/model.bin"
(cd "$tmp" && sha256sum model.bin > manifest.sha256)
mv "$tmp" "$out"
echo "{\"event\":\"done\",\"artifact\":\"$out\",\"metrics\":{\"valid_loss\":2.5}}" >&3
exit 0
)SH";

constexpr char kBranchSpec[] = R"({"seed": "/models/seed", "data": {"train": ["/d/code"]}, "steps": 3})";
constexpr char kNode0[] = "10.0.0.5:29500";  // node 0's store, as a scheduler hands it to the members

// The system clock, waking whoever waits for it to be read: a JobRunner waiting for the rendezvous reads
// it (at least once a second) after it has logged that it waits.
class NotifyingClock final : public Clock {
 public:
  TimePoint Now() const override {
    {
      std::lock_guard lock(mu_);
      ++calls_;
    }
    cv_.notify_all();
    return std::chrono::system_clock::now();
  }
  // Blocks until Now() has been called more than *seen times (then updates *seen), or until `deadline`.
  bool AwaitCall(uint64_t* seen, std::chrono::steady_clock::time_point deadline) const {
    std::unique_lock lock(mu_);
    if (!cv_.wait_until(lock, deadline, [&] { return calls_ > *seen; })) return false;
    *seen = calls_;
    return true;
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  mutable uint64_t calls_ = 0;
};

std::string Text(const v1::JobReport& r) {
  std::string all;
  for (const auto& l : r.logs()) all += Cat("[", l.stream(), "] ", l.text(), "\n");
  return all;
}

class GangFixture {
 protected:
  GangFixture() {
    dir_ = *MakeTempDir("btx-gang-test");
    EXPECT_TRUE(WriteFileAtomic(dir_ + "/btx-train", kFakeTrain).ok());
    ::chmod((dir_ + "/btx-train").c_str(), 0755);
    SetMode("ok");
  }
  ~GangFixture() { fs::remove_all(dir_); }

  void SetMode(const std::string& mode) { ASSERT_TRUE(WriteFileAtomic(dir_ + "/mode", mode).ok()); }
  std::string Seen(const std::string& what) { return ReadFile(dir_ + "/seen/" + what).value_or(""); }
  std::string OutputDir() const { return dir_ + "/artifacts/model"; }

  v1::JobAssignment Assignment(int node_rank, int nodes, int ranks, const std::string& rendezvous = "") const {
    v1::JobAssignment a;
    a.set_job_id("job-1");
    a.set_attempt(1);
    a.set_pipeline_id("p-1");
    a.set_pipeline_name("gang");
    a.set_name("branch/code");
    a.set_kind(v1::JOB_KIND_BRANCH);
    a.set_spec_json(kBranchSpec);
    a.set_output_uri(PathToFileUri(OutputDir()));
    a.set_checkpoint_uri(PathToFileUri(dir_ + "/artifacts/checkpoints"));
    a.mutable_resources()->set_ranks(ranks);
    a.mutable_resources()->set_nodes(nodes);
    a.set_node_rank(node_rank);
    a.set_nodes(nodes);
    a.set_rendezvous(rendezvous);
    *a.mutable_lease_deadline() = TimeUtil::MicrosecondsToTimestamp(ToUnixMicros(std::chrono::system_clock::now() + 1h));
    return a;
  }

  std::string dir_;
  PosixProcessLauncher launcher_;
};

// ---------------------------------------------------------------------------------------------------
// JobRunner

class WorkerGangRunnerTest : public GangFixture, public ::testing::Test {
 protected:
  JobRunnerConfig Config(int node_rank, int nodes, int ranks) {
    JobRunnerConfig c;
    c.train_binary = dir_ + "/btx-train";
    c.attempt_dir = Cat(dir_, "/work/node", node_rank);
    c.threads = 2;
    c.ranks = ranks;
    c.node_rank = node_rank;
    c.nodes = nodes;
    c.advertise_host = "node0.example";
    c.stop_grace = 5s;
    return c;
  }
  // Returns once `runner` has logged that it waits for the rendezvous: it logs that and then waits on its
  // condition variable without letting go of its lock in between, so from then on it is waiting.
  std::string AwaitWaiting(JobRunner& runner) {
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    std::string logs;
    uint64_t seen = 0;
    for (;;) {
      logs += Text(runner.TakeReport(1000));
      if (logs.find("waiting for node 0") != std::string::npos) return logs;
      if (!clock_.AwaitCall(&seen, deadline)) {
        ADD_FAILURE() << "the runner never waited for the rendezvous:\n" << logs;
        return logs;
      }
    }
  }

  NotifyingClock clock_;
};

// Node 0 of a 2-node gang, with 2 ranks of its own: the store runs, its ranks are 0 and 1 of 4 with the
// advertised rendezvous (rank 0 alone with the progress pipe), and every report carries the rendezvous
// until a JobStatus has carried the same one back.
TEST_F(WorkerGangRunnerTest, NodeZeroStartsTheStoreAndReportsItsRendezvousUntilAcknowledged) {
  JobRunner runner(Assignment(0, 2, 2), Config(0, 2, 2), launcher_, clock_);
  ASSERT_TRUE(runner.Start().ok());
  EXPECT_EQ(runner.rendezvous(), "node0.example:4242");
  v1::JobReport first = runner.TakeReport(1000);
  EXPECT_EQ(first.rendezvous(), "node0.example:4242");
  EXPECT_TRUE(first.has_progress());
  EXPECT_NE(Text(first).find("as node 0 of 2, ranks 0-1 of 4, rendezvous node0.example:4242"), std::string::npos)
      << Text(first);
  runner.ReturnReport(first);  // a failed heartbeat: sent again
  EXPECT_EQ(runner.TakeReport(1000).rendezvous(), "node0.example:4242");
  runner.SetRendezvous("elsewhere:1");  // not its own: not an acknowledgement
  EXPECT_EQ(runner.TakeReport(1000).rendezvous(), "node0.example:4242");
  runner.SetRendezvous("node0.example:4242");
  EXPECT_EQ(runner.TakeReport(1000).rendezvous(), "");

  const Outcome o = runner.Wait();
  EXPECT_EQ(o.kind, Outcome::kSucceeded) << o.error;
  EXPECT_EQ(Seen("rank0"), "rank=0 world=4 rendezvous=node0.example:4242 progress=3");
  EXPECT_EQ(Seen("rank1"), "rank=1 world=4 rendezvous=node0.example:4242 progress=-1");
  EXPECT_TRUE(fs::exists(dir_ + "/seen/store.pid"));
}

// With one rank of its own node 0 still starts the store: the other members' ranks meet there.
TEST_F(WorkerGangRunnerTest, NodeZeroWithOneRankStillStartsTheStore) {
  JobRunner runner(Assignment(0, 3, 1), Config(0, 3, 1), launcher_, clock_);
  ASSERT_TRUE(runner.Start().ok());
  EXPECT_EQ(runner.TakeReport(1000).rendezvous(), "node0.example:4242");
  EXPECT_EQ(runner.Wait().kind, Outcome::kSucceeded);
  EXPECT_EQ(Seen("rank0"), "rank=0 world=3 rendezvous=node0.example:4242 progress=3");
  EXPECT_TRUE(fs::exists(dir_ + "/seen/store.pid"));
}

// A one-worker rank group is unchanged: loopback rendezvous, nothing reported.
TEST_F(WorkerGangRunnerTest, OneWorkerGroupKeepsLoopbackAndReportsNoRendezvous) {
  JobRunner runner(Assignment(0, 1, 2), Config(0, 1, 2), launcher_, clock_);
  ASSERT_TRUE(runner.Start().ok());
  EXPECT_EQ(runner.TakeReport(1000).rendezvous(), "");
  EXPECT_EQ(runner.Wait().kind, Outcome::kSucceeded);
  EXPECT_EQ(Seen("rank1"), "rank=1 world=2 rendezvous=127.0.0.1:4242 progress=-1");
}

// Node 1 whose assignment already names node 0's store: no store of its own, its ranks are 2 and 3 of 4
// (neither with the progress pipe, their lines prefixed with the global rank); it leaves a leftover output
// alone (node 0's business), verifies nothing, and its ranks all exiting 0 is kMemberDone.
TEST_F(WorkerGangRunnerTest, MemberWithTheRendezvousInItsAssignmentRunsItsGlobalRanks) {
  fs::create_directories(OutputDir());
  ASSERT_TRUE(WriteFileAtomic(OutputDir() + "/model.bin", "torn").ok());
  int verified = 0;
  JobRunnerConfig c = Config(1, 2, 2);
  c.verify_artifact = [&](const std::string&) {
    ++verified;
    return absl::DataLossError("torn");
  };
  JobRunner runner(Assignment(1, 2, 2, kNode0), c, launcher_, clock_);
  ASSERT_TRUE(runner.Start().ok());
  const Outcome o = runner.Wait();
  EXPECT_EQ(o.kind, Outcome::kMemberDone) << o.error;
  EXPECT_EQ(o.exit_code, 0);
  EXPECT_EQ(Seen("rank2"), Cat("rank=2 world=4 rendezvous=", kNode0, " progress=-1"));
  EXPECT_EQ(Seen("rank3"), Cat("rank=3 world=4 rendezvous=", kNode0, " progress=-1"));
  EXPECT_FALSE(fs::exists(dir_ + "/seen/store.pid"));
  EXPECT_FALSE(fs::exists(dir_ + "/seen/rank0"));
  EXPECT_EQ(verified, 0);
  EXPECT_TRUE(fs::exists(OutputDir() + "/model.bin"));
  const v1::JobReport r = runner.TakeReport(1000);
  EXPECT_FALSE(r.has_progress());
  EXPECT_EQ(r.rendezvous(), "");
  const std::string logs = Text(r);
  for (const std::string line : {"as node 1 of 2, ranks 2-3 of 4, rendezvous 10.0.0.5:29500", "[stdout] [rank 2] rank 2 up",
                                 "[stdout] [rank 3] rank 3 up", "[worker] rank 3 of 4 exited with code 0"}) {
    EXPECT_NE(logs.find(line), std::string::npos) << line << "\n" << logs;
  }
  EXPECT_EQ(logs.find("waiting for node 0"), std::string::npos) << logs;
}

// Node 1 without it waits until a heartbeat's answer brings it (SetRendezvous), then starts. (Start and
// Wait on one thread, as on the worker's supervisor thread: the children die with the thread that
// launched them, PR_SET_PDEATHSIG.)
TEST_F(WorkerGangRunnerTest, MemberWaitsForTheRendezvousAndStartsWhenItArrives) {
  JobRunner runner(Assignment(1, 2, 1), Config(1, 2, 1), launcher_, clock_);
  absl::Status started = absl::UnknownError("not returned");
  Outcome o;
  std::thread supervisor([&] {
    started = runner.Start();
    if (started.ok()) o = runner.Wait();
  });
  AwaitWaiting(runner);
  EXPECT_FALSE(fs::exists(dir_ + "/seen/rank1"));
  runner.SetRendezvous("no-port");  // malformed: ignored (btx-train would refuse it as an invalid job)
  runner.SetRendezvous("host:99999");
  runner.SetRendezvous(kNode0);
  runner.SetRendezvous("later:1");  // the first stands
  supervisor.join();
  ASSERT_TRUE(started.ok()) << started;
  EXPECT_EQ(runner.rendezvous(), kNode0);
  const std::string logs = Text(runner.TakeReport(1000));
  EXPECT_EQ(o.kind, Outcome::kMemberDone) << o.error << "\n" << logs;
  EXPECT_EQ(Seen("rank1"), Cat("rank=1 world=2 rendezvous=", kNode0, " progress=-1"));
  EXPECT_NE(logs.find("as node 1 of 2, rank 1 of 2, rendezvous 10.0.0.5:29500"), std::string::npos) << logs;
  EXPECT_NE(logs.find("ignored the rendezvous 'no-port'"), std::string::npos) << logs;
}

// No rendezvous within rendezvous_timeout: the start fails, retryably, and says why; nothing ran.
TEST_F(WorkerGangRunnerTest, MemberWithoutARendezvousTimesOutRetryably) {
  JobRunnerConfig c = Config(1, 2, 1);
  c.rendezvous_timeout = 100ms;
  JobRunner runner(Assignment(1, 2, 1), c, launcher_, clock_);
  const absl::Status s = runner.Start();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_NE(s.message().find("node 0 never reported its store"), std::string::npos) << s;
  EXPECT_NE(s.message().find("waited 0.1 s"), std::string::npos) << s;
  const Outcome o = runner.NotStarted(s);
  EXPECT_EQ(o.kind, Outcome::kRetryable);
  EXPECT_NE(o.error.find("node 0 never reported its store"), std::string::npos) << o.error;
  EXPECT_FALSE(fs::exists(dir_ + "/seen"));
}

// A stop while it waits ends the wait at once (the timeout is far away): a cancel is reported cancelled,
// a drain interrupted (retryable).
TEST_F(WorkerGangRunnerTest, MemberStopsAtOnceWhenToldToWhileWaiting) {
  for (const StopReason reason : {StopReason::kCancel, StopReason::kDrain}) {
    JobRunnerConfig c = Config(1, 2, 1);
    c.rendezvous_timeout = 10min;
    JobRunner runner(Assignment(1, 2, 1), c, launcher_, clock_);
    absl::Status started;
    std::thread start([&] { started = runner.Start(); });
    AwaitWaiting(runner);
    const auto asked = std::chrono::steady_clock::now();
    runner.RequestStop(reason);
    start.join();
    EXPECT_LT(std::chrono::steady_clock::now() - asked, 5s);
    EXPECT_TRUE(absl::IsAborted(started)) << started;
    const Outcome o = runner.NotStarted(started);
    EXPECT_EQ(o.kind, reason == StopReason::kCancel ? Outcome::kCancelled : Outcome::kRetryable) << o.error;
    EXPECT_FALSE(fs::exists(dir_ + "/seen"));
  }
}

// One of the member's ranks failing fails its part (retryably), named by its global rank.
TEST_F(WorkerGangRunnerTest, MemberRankFailureIsRetryableAndNamesTheGlobalRank) {
  SetMode("fail");
  JobRunner runner(Assignment(1, 2, 2, kNode0), Config(1, 2, 2), launcher_, clock_);
  ASSERT_TRUE(runner.Start().ok());
  const Outcome o = runner.Wait();
  EXPECT_EQ(o.kind, Outcome::kRetryable);
  EXPECT_NE(o.error.find("btx-train rank 3 of 4 exited with code 3: rank 3 lost its device"), std::string::npos)
      << o.error;
  const std::string logs = Text(runner.TakeReport(1000));
  EXPECT_NE(logs.find("[stdout] [rank 2] rank 2 got SIGTERM"), std::string::npos) << logs;
}

// ---------------------------------------------------------------------------------------------------
// Worker, against a fake scheduler

// Hands out queued assignments, answers heartbeats (with node 0's rendezvous once `rendezvous_after`
// heartbeats have carried the job; echoing node 0's own after `ack_after` reports of it), and records
// everything. Every RPC wakes waiters.
class FakeScheduler final : public v1::WorkerService::Service {
 public:
  struct Seen {
    std::vector<v1::HeartbeatRequest> heartbeats;
    std::vector<v1::CompleteRequest> completes;
    std::vector<v1::FailRequest> fails;
  };

  void Queue(v1::JobAssignment a) {
    std::lock_guard lock(mu_);
    queue_.push_back(std::move(a));
    cv_.notify_all();
  }
  void SetRendezvousAfter(std::string rendezvous, int heartbeats) {
    std::lock_guard lock(mu_);
    rendezvous_ = std::move(rendezvous);
    rendezvous_after_ = heartbeats;
  }
  void AckAfter(int reports) {
    std::lock_guard lock(mu_);
    ack_after_ = reports;
  }
  void FailAnswers(grpc::StatusCode code) {
    std::lock_guard lock(mu_);
    fail_code_ = code;
  }
  Seen seen() const {
    std::lock_guard lock(mu_);
    return seen_;
  }
  uint64_t rpcs() const {
    std::lock_guard lock(mu_);
    return rpcs_;
  }
  bool AwaitRpcAfter(uint64_t seen, std::chrono::steady_clock::time_point deadline) const {
    std::unique_lock lock(mu_);
    return cv_.wait_until(lock, deadline, [&] { return rpcs_ > seen; });
  }

  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest*, v1::RegisterResponse* resp) override {
    resp->set_worker_id("worker-1");
    resp->set_heartbeat_interval_ms(20);
    resp->set_lease_duration_ms(60000);
    Tick();
    return grpc::Status::OK;
  }
  grpc::Status AcquireJob(grpc::ServerContext* ctx, const v1::AcquireJobRequest* req,
                          v1::AcquireJobResponse* resp) override {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(req->wait_timeout_ms());
    std::unique_lock lock(mu_);
    // Slices: a cancelled call (the worker draining) or a server shutdown is noticed.
    while (queue_.empty() && !ctx->IsCancelled() && std::chrono::steady_clock::now() < deadline) {
      cv_.wait_for(lock, 50ms);
    }
    if (!queue_.empty()) {
      *resp->mutable_job() = queue_.front();
      queue_.pop_front();
    }
    ++rpcs_;
    cv_.notify_all();
    return grpc::Status::OK;
  }
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req, v1::HeartbeatResponse* resp) override {
    std::lock_guard lock(mu_);
    seen_.heartbeats.push_back(*req);
    for (const auto& r : req->jobs()) {
      auto* st = resp->add_jobs();
      st->set_job_id(r.job_id());
      st->set_attempt(r.attempt());
      st->set_directive(v1::JOB_DIRECTIVE_CONTINUE);
      *st->mutable_lease_deadline() =
          TimeUtil::MicrosecondsToTimestamp(ToUnixMicros(std::chrono::system_clock::now() + 60s));
      if (!r.rendezvous().empty()) {
        if (++reports_with_rendezvous_ >= ack_after_) st->set_rendezvous(r.rendezvous());
      } else if (!rendezvous_.empty() && ++job_heartbeats_ >= rendezvous_after_) {
        st->set_rendezvous(rendezvous_);
      }
    }
    ++rpcs_;
    cv_.notify_all();
    return grpc::Status::OK;
  }
  grpc::Status Complete(grpc::ServerContext*, const v1::CompleteRequest* req, v1::CompleteResponse*) override {
    std::lock_guard lock(mu_);
    seen_.completes.push_back(*req);
    ++rpcs_;
    cv_.notify_all();
    return grpc::Status::OK;
  }
  grpc::Status Fail(grpc::ServerContext*, const v1::FailRequest* req, v1::FailResponse*) override {
    std::lock_guard lock(mu_);
    seen_.fails.push_back(*req);
    ++rpcs_;
    cv_.notify_all();
    if (fail_code_ == grpc::StatusCode::OK) return grpc::Status::OK;
    return grpc::Status(fail_code_, "attempt 1 of job-1 is over");
  }

 private:
  void Tick() {
    std::lock_guard lock(mu_);
    ++rpcs_;
    cv_.notify_all();
  }

  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::deque<v1::JobAssignment> queue_;
  std::string rendezvous_;
  int rendezvous_after_ = 0, job_heartbeats_ = 0, ack_after_ = 1, reports_with_rendezvous_ = 0;
  grpc::StatusCode fail_code_ = grpc::StatusCode::OK;
  Seen seen_;
  uint64_t rpcs_ = 0;
};

class WorkerGangTest : public GangFixture, public ::testing::Test {
 protected:
  WorkerGangTest() {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&fake_);
    server_ = b.BuildAndStart();
    channel_ = grpc::CreateChannel(Cat("127.0.0.1:", port_), grpc::InsecureChannelCredentials());
  }
  ~WorkerGangTest() override {
    StopWorker();
    server_->Shutdown(std::chrono::system_clock::now() + 1s);
  }

  void StartWorker(const std::string& advertise_host = "node0.example") {
    WorkerConfig wc;
    wc.name = "w1";
    wc.train_binary = dir_ + "/btx-train";
    wc.work_dir = dir_ + "/work";
    wc.threads_per_job = 2;
    wc.poll_wait = 1s;
    wc.stop_grace = 5s;
    wc.backoff_max = 200ms;
    wc.advertise_host = advertise_host;
    wc.discover_capabilities = [] {
      Capabilities c;
      c.cpu_threads = 4;
      return c;
    };
    worker_ = std::make_unique<Worker>(wc, channel_, launcher_, clock_);
    thread_ = std::thread([this] { worker_->Run(); });
  }
  void StopWorker() {
    if (!worker_) return;
    worker_->Drain();
    thread_.join();
    worker_.reset();
  }
  // Re-checks `pred` at every RPC the fake serves (the worker heartbeats every 20 ms).
  template <typename Pred>
  bool Until(Pred pred, std::chrono::seconds limit = 30s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      const uint64_t seen = fake_.rpcs();
      if (pred()) return true;
      if (!fake_.AwaitRpcAfter(seen, deadline)) return pred();
    }
  }
  // Every log line the worker sent for the job, in order.
  std::string Logs() {
    std::string all;
    for (const auto& hb : fake_.seen().heartbeats) {
      for (const auto& r : hb.jobs()) all += Text(r);
    }
    return all;
  }
  // Whether the job has been in a heartbeat, and the worker has since let go of it.
  bool JobSeenAndGone() {
    bool seen = false;
    for (const auto& hb : fake_.seen().heartbeats) seen |= hb.jobs_size() > 0;
    return seen && worker_->running_jobs() == 0;
  }

  FakeScheduler fake_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  SystemClock clock_;
  std::unique_ptr<Worker> worker_;
  std::thread thread_;
};

// Node 0 (one rank of its own) reports "<advertise_host>:<port>" in its heartbeats until the scheduler's
// answer carries it back, gives its rank the gang's world size, and completes the job.
TEST_F(WorkerGangTest, NodeZeroReportsItsRendezvousUntilAcknowledgedAndCompletes) {
  SetMode("hold");
  fake_.AckAfter(2);
  fake_.Queue(Assignment(0, 2, 1));
  StartWorker("node0.example");
  // Acknowledged on the second report; then a few more heartbeats.
  size_t acked_at = 0;
  ASSERT_TRUE(Until([&] {
    const auto hbs = fake_.seen().heartbeats;
    int with = 0;
    for (size_t i = 0; i < hbs.size(); ++i) {
      for (const auto& r : hbs[i].jobs()) {
        if (!r.rendezvous().empty() && ++with == 2) acked_at = i;
      }
    }
    return with >= 2 && hbs.size() >= acked_at + 4;
  })) << Logs();
  ASSERT_TRUE(WriteFileAtomic(dir_ + "/release", "").ok());
  ASSERT_TRUE(Until([&] { return fake_.seen().completes.size() == 1 && worker_->running_jobs() == 0; })) << Logs();
  std::vector<std::string> reported;
  for (const auto& hb : fake_.seen().heartbeats) {
    for (const auto& r : hb.jobs()) reported.push_back(r.rendezvous());
  }
  // "" while starting, then the rendezvous twice, then never again.
  const auto first = std::find(reported.begin(), reported.end(), "node0.example:4242");
  ASSERT_NE(first, reported.end());
  EXPECT_TRUE(std::all_of(reported.begin(), first, [](const std::string& s) { return s.empty(); }));
  ASSERT_LT(first + 1, reported.end());
  EXPECT_EQ(first[1], "node0.example:4242");
  EXPECT_TRUE(std::all_of(first + 2, reported.end(), [](const std::string& s) { return s.empty(); }));
  EXPECT_EQ(Seen("rank0"), "rank=0 world=2 rendezvous=node0.example:4242 progress=3");
  EXPECT_TRUE(fs::exists(dir_ + "/seen/store.pid"));
  EXPECT_TRUE(fake_.seen().fails.empty());
  EXPECT_NE(Logs().find("as node 0 of 2, rank 0 of 2, rendezvous node0.example:4242"), std::string::npos) << Logs();
}

// Node 1 waits (its job in heartbeats) until a JobStatus brings node 0's rendezvous, runs ranks 2 and 3
// of 4, and once both exit 0 sends neither Complete nor Fail: its last logs go out and it forgets the job.
TEST_F(WorkerGangTest, MemberWaitsForTheRendezvousAndReportsNothingWhenItsRanksSucceed) {
  fake_.SetRendezvousAfter(kNode0, 3);
  fake_.Queue(Assignment(1, 2, 2));
  StartWorker();
  ASSERT_TRUE(Until([&] { return JobSeenAndGone(); })) << Logs();
  const auto seen = fake_.seen();
  EXPECT_TRUE(seen.completes.empty());
  EXPECT_TRUE(seen.fails.empty()) << seen.fails[0].error();
  EXPECT_EQ(Seen("rank2"), Cat("rank=2 world=4 rendezvous=", kNode0, " progress=-1"));
  EXPECT_EQ(Seen("rank3"), Cat("rank=3 world=4 rendezvous=", kNode0, " progress=-1"));
  EXPECT_FALSE(fs::exists(dir_ + "/seen/store.pid"));
  EXPECT_TRUE(fs::exists(dir_ + "/work/job-1-attempt-1-node-1/JOB.json"));  // a member's own attempt dir
  const std::string logs = Logs();
  for (const std::string line : {"[worker] node 1 of 2: waiting for node 0", "as node 1 of 2, ranks 2-3 of 4, rendezvous 10.0.0.5:29500",
                                 "[stdout] [rank 2] rank 2 up", "[stdout] [rank 3] rank 3 up",
                                 "[worker] rank 3 of 4 exited with code 0"}) {
    EXPECT_NE(logs.find(line), std::string::npos) << line << "\n" << logs;
  }
  // The member never claimed a rendezvous of its own, nor any progress.
  for (const auto& hb : seen.heartbeats) {
    for (const auto& r : hb.jobs()) {
      EXPECT_EQ(r.rendezvous(), "");
      EXPECT_FALSE(r.has_progress());
    }
  }
}

// One of node 1's ranks failing fails the attempt (retryable, named by its global rank); the scheduler
// answering that the attempt is already over is the end of it (no retries of the Fail).
TEST_F(WorkerGangTest, MemberRankFailureSendsFail) {
  SetMode("fail");
  fake_.FailAnswers(grpc::StatusCode::FAILED_PRECONDITION);
  fake_.Queue(Assignment(1, 2, 2, kNode0));
  StartWorker();
  ASSERT_TRUE(Until([&] { return JobSeenAndGone(); })) << Logs();
  const auto seen = fake_.seen();
  EXPECT_TRUE(seen.completes.empty());
  ASSERT_EQ(seen.fails.size(), 1u);
  const auto& f = seen.fails[0];
  EXPECT_EQ(f.job_id(), "job-1");
  EXPECT_EQ(f.attempt(), 1);
  EXPECT_TRUE(f.retryable());
  EXPECT_FALSE(f.cancelled());
  EXPECT_FALSE(f.interrupted());
  EXPECT_NE(f.error().find("btx-train rank 3 of 4 exited with code 3: rank 3 lost its device"), std::string::npos)
      << f.error();
}

// A member draining while it waits for the rendezvous hands the attempt back as interrupted.
TEST_F(WorkerGangTest, MemberDrainedWhileWaitingFailsInterrupted) {
  fake_.Queue(Assignment(1, 2, 1));
  StartWorker();
  ASSERT_TRUE(Until([&] { return Logs().find("waiting for node 0") != std::string::npos; })) << Logs();
  StopWorker();
  const auto seen = fake_.seen();
  ASSERT_EQ(seen.fails.size(), 1u);
  EXPECT_TRUE(seen.fails[0].retryable());
  EXPECT_TRUE(seen.fails[0].interrupted()) << seen.fails[0].error();
  EXPECT_FALSE(fs::exists(dir_ + "/seen"));
}

}  // namespace
}  // namespace btx::worker
