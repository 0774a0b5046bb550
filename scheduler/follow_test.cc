// Watch and Logs followers on a shared cluster (follow.h): caps per user and in total, one shared
// read per wake-up for every follower of a pipeline, tenancy, and heartbeats that keep their
// connections while followers saturate theirs. Real PostgreSQL, real TLS with bearer tokens.
#include "follow.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "btx/common/fs.h"
#include "btx/scheduler/auth.h"
#include "btx/storage/notify.h"
#include "pg_fixture.h"
#include "test_certs.h"
#include "test_util.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
using testing::PollUntil;
namespace v1 = btx::v1;

#define EXPECT_CODE(status, code_)                                                                \
  do {                                                                                            \
    const grpc::Status s_ = (status);                                                             \
    EXPECT_EQ(s_.error_code(), grpc::StatusCode::code_) << #status << ": " << s_.error_message(); \
  } while (0)

struct Pki {
  std::string dir;
  std::unique_ptr<btx::testing::TestCa> ca;
  btx::testing::IssuedCert server;
};

// One open Watch or Logs stream and what it received, read on its own thread.
struct Stream {
  std::unique_ptr<v1::PipelineService::Stub> stub;  // on a connection of its own
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<v1::Event>> events;
  std::unique_ptr<grpc::ClientReader<v1::LogLine>> logs;
  std::mutex mu;
  std::vector<int64_t> ids;  // event ids or log seqs, as received
  std::vector<std::string> pipelines;
  bool done = false;
  grpc::Status status;
  std::thread reader;

  void Run() {
    reader = std::thread([this] {
      if (events) {
        v1::Event e;
        while (events->Read(&e)) {
          std::lock_guard lock(mu);
          ids.push_back(e.id());
          pipelines.push_back(e.pipeline_id());
        }
      } else {
        v1::LogLine l;
        while (logs->Read(&l)) {
          std::lock_guard lock(mu);
          ids.push_back(l.seq());
        }
      }
      grpc::Status st = events ? events->Finish() : logs->Finish();
      std::lock_guard lock(mu);
      status = st;
      done = true;
    });
  }
  size_t received() {
    std::lock_guard lock(mu);
    return ids.size();
  }
  bool finished() {
    std::lock_guard lock(mu);
    return done;
  }
  // Ends it from the client's side and waits for its thread.
  grpc::Status Close() {
    ctx.TryCancel();
    if (reader.joinable()) reader.join();
    return status;
  }
  ~Stream() { Close(); }
};

class FollowTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    pki_ = new Pki;
    pki_->dir = *MakeTempDir("btx-follow-test");
    pki_->ca = std::make_unique<btx::testing::TestCa>(pki_->dir, "btx");
    pki_->server = pki_->ca->IssueServer("scheduler");
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(pki_->dir);
    delete pki_;
  }

  // `connections`: the pool heartbeats and claims use.
  explicit FollowTest(SchedulerConfig config, int connections = 4)
      : conninfo_(btx::testing::NewMigratedDatabase()), stack_(conninfo_, connections, clock_, Secure(std::move(config)), false) {
    auto port = scheduler_.Start();
    EXPECT_TRUE(port.ok()) << port.status();
    target_ = "127.0.0.1:" + std::to_string(port.value_or(0));
  }
  // A connection per call: the principal is recorded per call, and calls of several users must not
  // share what one connection's earlier calls left behind.
  std::shared_ptr<grpc::Channel> Channel() {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = pki_->ca->cert_pem();
    grpc::ChannelArguments args;
    args.SetInt("btx_test_channel", next_channel_++);  // its own connection
    return grpc::CreateCustomChannel(target_, grpc::SslCredentials(o), args);
  }
  static SchedulerConfig Secure(SchedulerConfig c) {
    c.artifact_root = "/tmp/btx-test-artifacts";
    c.reap_interval = 3600s;
    c.metrics_refresh = 3600s;
    c.security.cert_pem = pki_->server.cert_pem;
    c.security.key_pem = pki_->server.key_pem;
    c.security.identities = *ParseIdentities(TokenDigest("alice-token") + " user alice\n" + TokenDigest("bob-token") +
                                                 " user bob\n" + TokenDigest("worker-token") + " worker node\n",
                                             "tokens");
    return c;
  }
  static void Prepare(grpc::ClientContext& ctx, const std::string& token) {
    ctx.AddMetadata("authorization", "Bearer " + token);
  }

  std::string Submit(const std::string& token) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
    v1::SubmitRequest req;
    req.set_spec(testing::kDagSpec);
    v1::SubmitResponse resp;
    const grpc::Status st = v1::PipelineService::NewStub(Channel())->Submit(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.pipeline().id();
  }
  std::string FirstJob(const std::string& pipeline_id) {
    auto jobs = store_.ListJobs(pipeline_id, "", 10);
    EXPECT_TRUE(jobs.ok() && !jobs->empty());
    return jobs.ok() && !jobs->empty() ? jobs->front().id : "";
  }

  // A following Watch (pipeline_id empty: every pipeline the caller sees), reading on its own thread.
  std::unique_ptr<Stream> Watch(const std::string& token, const std::string& pipeline_id) {
    auto s = std::make_unique<Stream>();
    Prepare(s->ctx, token);
    v1::WatchRequest req;
    req.set_pipeline_id(pipeline_id);
    req.set_follow(true);
    s->stub = v1::PipelineService::NewStub(Channel());
    s->events = s->stub->Watch(&s->ctx, req);
    s->Run();
    return s;
  }
  std::unique_ptr<Stream> Logs(const std::string& token, const std::string& job_id) {
    auto s = std::make_unique<Stream>();
    Prepare(s->ctx, token);
    v1::LogsRequest req;
    req.set_job_id(job_id);
    req.set_follow(true);
    s->stub = v1::PipelineService::NewStub(Channel());
    s->logs = s->stub->Logs(&s->ctx, req);
    s->Run();
    return s;
  }
  // The stream's final status, once the scheduler ended it (refusals end it at once).
  grpc::Status Ended(Stream& s) {
    EXPECT_TRUE(PollUntil([&] { return s.finished(); }, 20s));
    return s.Close();
  }

  // An event as another replica's commit adds it: a row, then a NOTIFY on the events channel.
  int64_t AddEvent(const std::string& pipeline_id, const std::string& type = "test.tick") {
    pqxx::connection c(conninfo_);
    pqxx::work tx(c);
    const auto id = tx.exec_params("INSERT INTO events (pipeline_id, type, created_at) VALUES ($1::uuid, $2, now()) "
                                   "RETURNING id",
                                   pipeline_id, type)[0][0]
                        .as<int64_t>();
    tx.exec(std::string("NOTIFY ") + storage::kEventsChannel);
    tx.commit();
    return id;
  }
  std::vector<int64_t> EventIds(const std::string& pipeline_id) {
    std::vector<int64_t> out;
    auto events = store_.EventsAfter(pipeline_id, 0, 100000);
    EXPECT_TRUE(events.ok());
    for (const auto& e : *events) out.push_back(e.id);
    return out;
  }

  Followers& followers() { return *scheduler_.followers(); }

  static Pki* pki_;
  ManualClock clock_;
  std::string conninfo_;
  testing::SchedulerStack stack_;
  storage::Store& store_ = stack_.store;
  Scheduler& scheduler_ = stack_.scheduler;
  std::string target_;
  int next_channel_ = 0;
};
Pki* FollowTest::pki_ = nullptr;

SchedulerConfig Caps(int per_user, int total, int follower_connections = 2) {
  SchedulerConfig c;
  c.max_streams_per_user = per_user;
  c.max_streams = total;
  c.follower_db_connections = follower_connections;
  return c;
}

class FollowCapTest : public FollowTest {
 protected:
  FollowCapTest() : FollowTest(Caps(2, 3)) {}
};

TEST_F(FollowCapTest, StreamsAreCappedPerUserAndInTotalAndFreedSlotsAreReused) {
  const std::string a = Submit("alice-token"), b = Submit("bob-token");
  // Each stream has its slot once its first event (the submission) arrived.
  auto a1 = Watch("alice-token", a), a2 = Watch("alice-token", a);
  ASSERT_TRUE(PollUntil([&] { return a1->received() > 0 && a2->received() > 0; }, 20s));

  auto a3 = Watch("alice-token", a);
  const grpc::Status per_user = Ended(*a3);
  EXPECT_CODE(per_user, RESOURCE_EXHAUSTED);
  EXPECT_EQ(per_user.error_message(),
            "too many open Watch/Logs streams for user 'alice': 2 open, the cap is 2 per user "
            "(btx-scheduler --max-streams-per-user); end one first");
  // Logs share the cap.
  auto a_logs = Logs("alice-token", FirstJob(a));
  EXPECT_CODE(Ended(*a_logs), RESOURCE_EXHAUSTED);

  auto b1 = Watch("bob-token", b);
  ASSERT_TRUE(PollUntil([&] { return b1->received() > 0; }, 20s));
  auto b2 = Watch("bob-token", b);
  const grpc::Status total = Ended(*b2);
  EXPECT_CODE(total, RESOURCE_EXHAUSTED);
  EXPECT_EQ(total.error_message(),
            "too many open Watch/Logs streams on this scheduler: 3 open, the cap is 3 (btx-scheduler --max-streams); "
            "try again later");
  EXPECT_EQ(followers().open_streams(), 3);

  // A stream ends with its pipeline: its slot is free for the next one.
  grpc::ClientContext ctx;
  Prepare(ctx, "alice-token");
  v1::CancelRequest cancel;
  cancel.set_id(a);
  v1::Pipeline cancelled;
  ASSERT_TRUE(v1::PipelineService::NewStub(Channel())->Cancel(&ctx, cancel, &cancelled).ok());
  EXPECT_CODE(Ended(*a1), OK);
  EXPECT_CODE(Ended(*a2), OK);
  EXPECT_EQ(followers().open_streams(), 1);
  // Alice's slots are hers again: a new stream is served (and ends at once, as its pipeline has ended).
  auto again = Watch("alice-token", a);
  EXPECT_CODE(Ended(*again), OK);
  EXPECT_FALSE(again->ids.empty());
  // And the total's: bob's second stream fits now.
  auto b3 = Watch("bob-token", b);
  EXPECT_TRUE(PollUntil([&] { return b3->received() > 0; }, 20s));
  EXPECT_FALSE(b3->finished());
  // A client that goes away frees its slot too (noticed within the streams' one-second look).
  b1->Close();
  b3->Close();
  EXPECT_TRUE(PollUntil([&] { return followers().open_streams() == 0; }, 20s));
}

class FollowFanoutTest : public FollowTest {
 protected:
  FollowFanoutTest() : FollowTest(Caps(100, 200)) {}
};

TEST_F(FollowFanoutTest, ManyFollowersOfOnePipelineGetEveryEventInOrderFromOneReadPerWakeUp) {
  constexpr int kFollowers = 40, kEvents = 12;
  const std::string p = Submit("alice-token");
  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < kFollowers; ++i) streams.push_back(Watch("alice-token", p));
  // Every follower has caught up on its own and now reads from the pipeline's one feed.
  ASSERT_TRUE(PollUntil([&] { return followers().members() == kFollowers; }, 30s));
  EXPECT_EQ(followers().feeds(), 1u);
  const uint64_t queries0 = followers().queries(), reads0 = followers().feed_reads(), passes0 = followers().passes();
  for (int e = 0; e < kEvents; ++e) {
    AddEvent(p);
    const size_t want = EventIds(p).size();
    ASSERT_TRUE(PollUntil([&] {
      for (auto& s : streams) {
        if (s->received() < want) return false;
      }
      return true;
    }, 20s)) << "event " << e;
  }
  const uint64_t queries = followers().queries() - queries0, reads = followers().feed_reads() - reads0,
                 passes = followers().passes() - passes0;
  // One read of the one feed per pass of the shared reader, and nothing else on the database: 40
  // followers reading for themselves would have run at least 40 per event.
  EXPECT_EQ(reads, passes);
  EXPECT_EQ(queries, reads);
  EXPECT_GE(reads, static_cast<uint64_t>(kEvents));
  EXPECT_LT(queries, static_cast<uint64_t>(kFollowers));
  const std::vector<int64_t> all = EventIds(p);
  for (auto& s : streams) {
    s->Close();
    EXPECT_EQ(s->ids, all);  // every event, in order, once
  }
}

TEST_F(FollowFanoutTest, FollowersResumeFromTheirCursorAndEndWithThePipeline) {
  const std::string p = Submit("alice-token");
  const int64_t first = AddEvent(p), second = AddEvent(p);
  auto early = Watch("alice-token", p);
  ASSERT_TRUE(PollUntil([&] { return followers().members() == 1; }, 20s));
  // A second follower resumes after `first`: it gets what follows, not what it saw before.
  auto resumed = std::make_unique<Stream>();
  Prepare(resumed->ctx, "alice-token");
  v1::WatchRequest req;
  req.set_pipeline_id(p);
  req.set_follow(true);
  req.set_after_event_id(first);
  resumed->events = v1::PipelineService::NewStub(Channel())->Watch(&resumed->ctx, req);
  resumed->Run();
  ASSERT_TRUE(PollUntil([&] { return followers().members() == 2; }, 20s));
  const int64_t third = AddEvent(p);
  const int64_t end = AddEvent(p, "pipeline.cancelled");
  EXPECT_CODE(Ended(*early), OK);
  EXPECT_CODE(Ended(*resumed), OK);
  EXPECT_EQ(resumed->ids, (std::vector<int64_t>{second, third, end}));
  EXPECT_EQ(early->ids, EventIds(p));
  EXPECT_EQ(followers().feeds(), 0u);  // the last follower to leave takes the feed with it
}

TEST_F(FollowFanoutTest, FollowersSeeOnlyTheirOwnPipelines) {
  const std::string a = Submit("alice-token"), b = Submit("bob-token");
  // Another user's pipeline or job is not found, as a missing one.
  auto peek = Watch("bob-token", a);
  EXPECT_CODE(Ended(*peek), NOT_FOUND);
  auto peek_logs = Logs("bob-token", FirstJob(a));
  EXPECT_CODE(Ended(*peek_logs), NOT_FOUND);
  // Following every pipeline: alice's feed and bob's are not one, whoever came first.
  auto alice_all = Watch("alice-token", "");
  ASSERT_TRUE(PollUntil([&] { return followers().members() == 1; }, 20s));
  auto bob_all = Watch("bob-token", "");
  ASSERT_TRUE(PollUntil([&] { return followers().members() == 2; }, 20s));
  const int64_t alices = AddEvent(a);
  const int64_t bobs = AddEvent(b);
  ASSERT_TRUE(PollUntil([&] {
    std::lock_guard lock(bob_all->mu);
    return std::find(bob_all->ids.begin(), bob_all->ids.end(), bobs) != bob_all->ids.end();
  }, 20s)) << followers().passes() << " passes, " << followers().feed_reads() << " reads, " << bob_all->received()
           << " received";
  ASSERT_TRUE(PollUntil([&] {
    std::lock_guard lock(alice_all->mu);
    return std::find(alice_all->ids.begin(), alice_all->ids.end(), alices) != alice_all->ids.end();
  }, 20s));
  bob_all->Close();
  alice_all->Close();
  EXPECT_EQ(std::set<std::string>(bob_all->pipelines.begin(), bob_all->pipelines.end()), std::set<std::string>{b});
  EXPECT_EQ(std::set<std::string>(alice_all->pipelines.begin(), alice_all->pipelines.end()), std::set<std::string>{a});
}

class FollowBudgetTest : public FollowTest {
 protected:
  // Heartbeats' pool: 4 connections; followers': 2.
  FollowBudgetTest() : FollowTest(Caps(100, 200, 2), 4) {}
};

TEST_F(FollowBudgetTest, HeartbeatsKeepWorkingWhileFollowersSaturateTheirBudget) {
  const std::string p = Submit("alice-token");
  auto worker_call = [&](grpc::ClientContext& ctx) {
    Prepare(ctx, "worker-token");
    ctx.set_deadline(std::chrono::system_clock::now() + 5s);
  };
  std::string worker;
  {
    grpc::ClientContext ctx;
    worker_call(ctx);
    v1::RegisterRequest req;
    req.set_name("w");
    req.mutable_capabilities()->set_slots(1);
    v1::RegisterResponse resp;
    ASSERT_TRUE(v1::WorkerService::NewStub(Channel())->Register(&ctx, req, &resp).ok());
    worker = resp.worker_id();
  }
  v1::AcquireJobResponse job;
  {
    grpc::ClientContext ctx;
    worker_call(ctx);
    v1::AcquireJobRequest req;
    req.set_worker_id(worker);
    ASSERT_TRUE(v1::WorkerService::NewStub(Channel())->AcquireJob(&ctx, req, &job).ok());
    ASSERT_TRUE(job.has_job());
  }
  // Every follower read blocks, as behind a slow scan: the events table is locked.
  pqxx::connection blocker(conninfo_);
  pqxx::work lock_tx(blocker);
  lock_tx.exec("LOCK TABLE events IN ACCESS EXCLUSIVE MODE");
  constexpr int kFollowers = 10;  // more than both pools together
  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < kFollowers; ++i) streams.push_back(Watch("alice-token", p));
  // Both follower connections wait on the lock, and the other followers wait for them.
  ASSERT_TRUE(PollUntil([&] {
    return followers().open_streams() == kFollowers &&
           testing::QueryInt(conninfo_, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                                        "datname = current_database()") == 2;
  }, 20s));
  for (int i = 0; i < 20; ++i) {
    grpc::ClientContext ctx;
    worker_call(ctx);
    v1::HeartbeatRequest req;
    req.set_worker_id(worker);
    auto* r = req.add_jobs();
    r->set_job_id(job.job().job_id());
    r->set_attempt(job.job().attempt());
    v1::HeartbeatResponse resp;
    const grpc::Status st = v1::WorkerService::NewStub(Channel())->Heartbeat(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << "heartbeat " << i << ": " << st.error_message();
    ASSERT_EQ(resp.jobs_size(), 1);
    EXPECT_EQ(resp.jobs(0).directive(), v1::JOB_DIRECTIVE_CONTINUE);
  }
  // Reads of the pipeline and its jobs go on too.
  EXPECT_TRUE(store_.GetPipeline(p).ok());
  lock_tx.commit();
  // Released, every follower gets its events.
  EXPECT_TRUE(PollUntil([&] {
    for (auto& s : streams) {
      if (s->received() == 0) return false;
    }
    return true;
  }, 20s));
  for (auto& s : streams) s->Close();
}

}  // namespace
}  // namespace btx::scheduler
