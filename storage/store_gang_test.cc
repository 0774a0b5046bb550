// Gangs against a real PostgreSQL: all-or-nothing forming, reservation, member fencing, expiry.
#include <atomic>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "btx/storage/store.h"
#include "pg_fixture.h"

namespace btx::storage {
namespace {
using namespace std::chrono_literals;

class GangStoreTest : public ::testing::Test {
 protected:
  GangStoreTest() : pool_(btx::testing::NewMigratedDatabase(), 8), store_(pool_) {}

  std::string Worker(const std::string& name, int gpus = 0) {
    auto id = store_.RegisterWorker(name, "host", Cat(R"({"gpus":)", gpus, "}"), "test", now_);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  // One pipeline of the given jobs (name -> nodes), all roots.
  std::map<std::string, std::string> Submit(const std::vector<std::pair<std::string, int>>& jobs, int gpus = 0,
                                            int max_attempts = 3) {
    NewPipeline p{.name = Cat("p", ++pipelines_), .spec_json = "{}"};
    for (const auto& [name, nodes] : jobs) {
      p.jobs.push_back({.name = name, .kind = "branch", .max_attempts = max_attempts, .gpus = gpus, .nodes = nodes});
    }
    auto r = store_.CreatePipeline(p, now_);
    EXPECT_TRUE(r.ok()) << r.status();
    std::map<std::string, std::string> ids;
    auto got = store_.GetPipeline(r->first.id);
    for (const auto& j : got->jobs) ids[j.name] = j.id;
    now_ += 1ms;  // later pipelines queue after this one
    return ids;
  }
  // One poll as the scheduler runs it: claim, then the gang step the claim's note asks for.
  std::optional<ClaimedJob> Poll(const std::string& worker, int free_gpus = 0) {
    auto c = store_.ClaimJobs({worker}, free_gpus, 30s, now_);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok() || !c->at(0).ok()) return std::nullopt;
    std::optional<ClaimedJob> got = *c->at(0);
    if (!got || got->note == ClaimNote::kNone) return got;
    if (got->note == ClaimNote::kMemberLeaseWaiting) {
      auto m = store_.TakeMemberLease(worker, now_);
      EXPECT_TRUE(m.ok()) << m.status();
      return m.ok() ? *m : std::nullopt;
    }
    auto offer = store_.OfferToGangs(worker, free_gpus, now_ + 20s, 30s, now_);
    EXPECT_TRUE(offer.ok()) << offer.status();
    return offer.ok() ? offer->mine : std::nullopt;
  }
  // A 2-node gang formed the usual way: `first` offers (nothing forms), `second`'s poll forms it as node 0,
  // `first`'s next poll picks up node 1.
  std::pair<std::optional<ClaimedJob>, std::optional<ClaimedJob>> FormOnTwo(const std::string& first,
                                                                             const std::string& second) {
    EXPECT_FALSE(Poll(first).has_value());
    auto n0 = Poll(second);
    auto n1 = Poll(first);
    return {std::move(n0), std::move(n1)};
  }
  JobDirectiveRow Beat(const std::string& worker, const ClaimedJob& c, const std::string& rendezvous = "",
                       const std::string& progress = "") {
    JobReportRow r{.job_id = c.job.id, .attempt = c.job.attempt, .progress_json = progress, .rendezvous = rendezvous};
    auto d = store_.Heartbeat(worker, {r}, false, 30s, now_);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? d->at(0) : JobDirectiveRow{};
  }

  ConnectionPool pool_;
  Store store_;
  TimePoint now_ = FromUnixMicros(1'700'000'000'000'000);
  RetryPolicy policy_{.base = 10s, .max = 60s};
  int pipelines_ = 0;
};

TEST_F(GangStoreTest, FormsWithAllMembersAtOnceOrNotAtAll) {
  auto ids = Submit({{"g", 2}});
  const std::string a = Worker("a"), b = Worker("b");
  EXPECT_FALSE(Poll(a).has_value());  // one offer: nothing is held
  auto job = store_.GetJob(ids["g"]);
  EXPECT_EQ(job->state, "READY");
  EXPECT_EQ(job->attempt, 0);

  auto mine = Poll(b);  // the second offer forms it, the caller as node 0
  ASSERT_TRUE(mine.has_value());
  EXPECT_EQ(mine->job.id, ids["g"]);
  EXPECT_EQ(mine->node_rank, 0);
  EXPECT_EQ(mine->job.attempt, 1);
  EXPECT_EQ(mine->job.nodes, 2);

  auto other = Poll(a);  // a's next poll picks its member lease up
  ASSERT_TRUE(other.has_value());
  EXPECT_EQ(other->job.id, ids["g"]);
  EXPECT_EQ(other->node_rank, 1);
  EXPECT_EQ(other->job.attempt, 1);

  std::vector<JobRecord> jobs = {*store_.GetJob(ids["g"])};
  ASSERT_TRUE(store_.DescribeGangs(jobs, now_).ok());
  ASSERT_EQ(jobs[0].members.size(), 2u);
  EXPECT_EQ(jobs[0].members[0].worker_name, "b");
  EXPECT_EQ(jobs[0].members[1].worker_name, "a");
  EXPECT_TRUE(jobs[0].members[1].delivered);
  EXPECT_FALSE(Poll(a).has_value());  // delivered once only
}

TEST_F(GangStoreTest, AWaitingHeadGangReservesTheWorkersThatCouldServeIt) {
  auto early = Submit({{"small-before", 1}});
  auto gang = Submit({{"g", 3}}, /*gpus=*/1);
  auto late = Submit({{"small-after", 1}});
  const std::string g1 = Worker("g1", 1), g2 = Worker("g2", 1), g3 = Worker("g3", 1), cpu = Worker("cpu", 0);

  // Queued before the gang: still served.
  auto first = Poll(g1, 1);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->job.name, "small-before");
  // Queued after it: not to a worker that could serve the gang, which offers itself instead...
  EXPECT_FALSE(Poll(g2, 1).has_value());
  std::vector<JobRecord> jobs = {*store_.GetJob(gang["g"])};
  ASSERT_TRUE(store_.DescribeGangs(jobs, now_).ok());
  EXPECT_NE(jobs[0].pending_reason.find("1 idle (g2)"), std::string::npos) << jobs[0].pending_reason;
  EXPECT_NE(jobs[0].pending_reason.find("g1"), std::string::npos) << jobs[0].pending_reason;
  // ...while a worker that cannot serve it (no GPU) takes it.
  auto cpu_job = Poll(cpu, 0);
  ASSERT_TRUE(cpu_job.has_value());
  EXPECT_EQ(cpu_job->job.name, "small-after");
  EXPECT_FALSE(Poll(g3, 1).has_value());
  // g1 finishes its job: its next poll completes the gang.
  ASSERT_TRUE(store_.CompleteJob(g1, first->job.id, first->job.attempt, "file:///x", "", now_).ok());
  auto formed = Poll(g1, 1);
  ASSERT_TRUE(formed.has_value());
  EXPECT_EQ(formed->job.name, "g");
  EXPECT_EQ(formed->node_rank, 0);
  EXPECT_EQ(store_.GetJob(gang["g"])->state, "LEASED");
}

TEST_F(GangStoreTest, AGangTheFleetCannotServeHoldsNothingUp) {
  auto gang = Submit({{"g", 3}});
  auto late = Submit({{"small", 1}});
  const std::string a = Worker("a"), b = Worker("b");  // 2 workers, the gang needs 3
  auto got = Poll(a);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->job.name, "small");
  std::vector<JobRecord> jobs = {*store_.GetJob(gang["g"])};
  ASSERT_TRUE(store_.DescribeGangs(jobs, now_).ok());
  EXPECT_NE(jobs[0].pending_reason.find("the fleet has 2 active workers"), std::string::npos) << jobs[0].pending_reason;
}

TEST_F(GangStoreTest, ReportsAreFencedByMembership) {
  auto ids = Submit({{"g", 2}});
  const std::string a = Worker("a"), b = Worker("b"), c = Worker("c");
  auto [n0, n1] = FormOnTwo(a, b);
  ASSERT_TRUE(n0 && n1);
  // Node 1 learns the rendezvous once node 0 reported it; node 1's own claim to one is ignored.
  EXPECT_EQ(Beat(a, *n1, "evil:1").rendezvous, "");
  EXPECT_EQ(Beat(b, *n0, "10.0.0.2:29500").rendezvous, "10.0.0.2:29500");
  auto d1 = Beat(a, *n1, "", R"({"step": 99})");
  EXPECT_EQ(d1.directive, Directive::kContinue);
  EXPECT_EQ(d1.rendezvous, "10.0.0.2:29500");
  EXPECT_EQ(store_.GetJob(ids["g"])->progress_json, "{}");  // progress is node 0's
  // A worker outside the gang is refused.
  EXPECT_EQ(Beat(c, *n0).directive, Directive::kLeaseLost);
  auto stale = store_.FailJob(c, ids["g"], 1, "x", true, false, "", policy_, now_);
  EXPECT_TRUE(absl::IsFailedPrecondition(stale.status())) << stale.status();
  // Only node 0 completes.
  EXPECT_TRUE(absl::IsFailedPrecondition(store_.CompleteJob(a, ids["g"], 1, "file:///x", "", now_)));
}

TEST_F(GangStoreTest, AnyMemberFailingEndsTheAttemptForAll) {
  auto ids = Submit({{"g", 2}});
  const std::string a = Worker("a"), b = Worker("b");
  auto [n0, n1] = FormOnTwo(a, b);
  ASSERT_TRUE(n0 && n1);
  auto failed = store_.FailJob(a, ids["g"], 1, "rank 3 exited with code 1", true, false, "", policy_, now_);
  ASSERT_TRUE(failed.ok()) << failed.status();
  EXPECT_EQ(failed->new_state, "RETRY_WAIT");
  auto job = store_.GetJob(ids["g"]);
  EXPECT_NE(job->error.find("node 1 of 2: rank 3 exited"), std::string::npos) << job->error;
  EXPECT_EQ(Beat(b, *n0).directive, Directive::kLeaseLost);
  EXPECT_TRUE(absl::IsFailedPrecondition(store_.CompleteJob(b, ids["g"], 1, "file:///x", "", now_)));
  // The retry forms a new gang with a new attempt number, shared by its members.
  now_ += 1h;
  auto [r0, r1] = FormOnTwo(b, a);
  ASSERT_TRUE(r0 && r1);
  EXPECT_EQ(r0->job.attempt, 2);
  EXPECT_EQ(r1->job.attempt, 2);
}

// A cancel reaches every member; a draining member's hand-back ends the attempt for all and keeps the budget.
TEST_F(GangStoreTest, CancelAndDrainActOnTheWholeGang) {
  auto ids = Submit({{"g", 2}, {"h", 2}}, 0, /*max_attempts=*/1);
  const std::string a = Worker("a"), b = Worker("b");
  auto [n0, n1] = FormOnTwo(a, b);
  ASSERT_TRUE(n0 && n1);
  // Drain: node 1 hands its part back as an interruption; the one attempt is not spent.
  auto back = store_.FailJob(a, n1->job.id, n1->job.attempt, "worker draining", true, false, "", policy_, now_,
                             /*interrupted=*/true);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->new_state, "RETRY_WAIT");
  EXPECT_EQ(store_.GetJob(n1->job.id)->max_attempts, 2);
  EXPECT_EQ(Beat(b, *n0).directive, Directive::kLeaseLost);
  // A gang formed again (g or h: they were queued together), then cancelled: both members are told.
  auto [m0, m1] = FormOnTwo(a, b);
  ASSERT_TRUE(m0 && m1);
  ASSERT_EQ(m0->job.id, m1->job.id);
  auto pipeline_id = store_.GetJob(m0->job.id)->pipeline_id;
  ASSERT_TRUE(store_.CancelPipeline(pipeline_id, "user", now_).ok());
  EXPECT_EQ(Beat(b, *m0).directive, Directive::kCancel);
  EXPECT_EQ(Beat(a, *m1).directive, Directive::kCancel);
  auto cancelled = store_.FailJob(b, m0->job.id, m0->job.attempt, "cancelled", false, true, "", policy_, now_);
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->new_state, "CANCELLED");
  EXPECT_TRUE(absl::IsFailedPrecondition(
      store_.FailJob(a, m1->job.id, m1->job.attempt, "cancelled", false, true, "", policy_, now_).status()));
}

// Only offers with the gang's GPUs free count: a worker whose GPUs are busy is no member.
TEST_F(GangStoreTest, OnlyOffersWithTheGpusTheGangNeedsCount) {
  auto ids = Submit({{"g", 2}}, /*gpus=*/2);
  const std::string a = Worker("a", 2), b = Worker("b", 2);
  EXPECT_FALSE(Poll(a, /*free_gpus=*/1).has_value());  // one of its two GPUs is busy
  EXPECT_FALSE(Poll(b, 2).has_value());
  EXPECT_EQ(store_.GetJob(ids["g"])->state, "READY");
  auto formed = Poll(a, 2);
  ASSERT_TRUE(formed.has_value());
  EXPECT_EQ(formed->job.gpus, 2);
}

TEST_F(GangStoreTest, OneMemberStoppingHeartbeatsExpiresTheWholeAttempt) {
  auto ids = Submit({{"g", 2}});
  const std::string a = Worker("a"), b = Worker("b");
  auto [n0, n1] = FormOnTwo(a, b);
  ASSERT_TRUE(n0 && n1);
  now_ += 20s;
  Beat(b, *n0);  // node 0 renews; node 1 (worker a) has gone quiet
  now_ += 15s;   // past node 1's lease, not node 0's
  auto reaped = store_.ReapExpiredLeases(policy_, now_);
  ASSERT_TRUE(reaped.ok()) << reaped.status();
  ASSERT_EQ(reaped->size(), 1u);
  EXPECT_TRUE(reaped->at(0).requeued);
  auto job = store_.GetJob(ids["g"]);
  EXPECT_EQ(job->state, "READY");
  EXPECT_NE(job->error.find("node 1 (worker a)"), std::string::npos) << job->error;
  EXPECT_EQ(job->max_attempts, 3);  // it ran: the attempt counts
  EXPECT_EQ(Beat(b, *n0).directive, Directive::kLeaseLost);
}

TEST_F(GangStoreTest, AMemberNeverPickedUpIsAnInterruption) {
  auto ids = Submit({{"g", 2}}, 0, /*max_attempts=*/1);
  const std::string a = Worker("a"), b = Worker("b");
  (void)Poll(a);
  auto n0 = Poll(b);  // formed; a never polls again
  ASSERT_TRUE(n0.has_value());
  now_ += 20s;
  Beat(b, *n0);
  now_ += 15s;
  auto reaped = store_.ReapExpiredLeases(policy_, now_);
  ASSERT_TRUE(reaped.ok()) << reaped.status();
  auto job = store_.GetJob(ids["g"]);
  EXPECT_EQ(job->state, "READY");  // its one attempt is not spent
  EXPECT_EQ(job->max_attempts, 2);
  EXPECT_NE(job->error.find("never picked up"), std::string::npos) << job->error;
}

TEST_F(GangStoreTest, TwoGangsNeedingMoreWorkersThanExistBothFinish) {
  auto g1 = Submit({{"g1", 2}});
  auto g2 = Submit({{"g2", 2}});
  const std::string a = Worker("a"), b = Worker("b"), c = Worker("c");
  auto [x0, x1] = FormOnTwo(a, b);
  ASSERT_TRUE(x0 && x1);
  EXPECT_EQ(x0->job.name, "g1");
  EXPECT_FALSE(Poll(c).has_value());  // g2 needs two: c waits, holding nothing
  ASSERT_TRUE(store_.CompleteJob(b, x0->job.id, 1, "file:///x", "", now_).ok());
  auto y0 = Poll(b);
  ASSERT_TRUE(y0.has_value());
  EXPECT_EQ(y0->job.name, "g2");
  auto y1 = Poll(c);
  ASSERT_TRUE(y1.has_value());
  EXPECT_EQ(y1->node_rank, 1);
  ASSERT_TRUE(store_.CompleteJob(b, y0->job.id, 1, "file:///y", "", now_).ok());
  EXPECT_EQ(store_.GetJob(g2["g2"])->state, "SUCCEEDED");
}

// Workers poll, offer and report concurrently: every gang is formed exactly once, with distinct
// members, and everything finishes.
TEST_F(GangStoreTest, ConcurrentPollsNeverDoubleBookAWorker) {
  std::vector<std::pair<std::string, int>> jobs;
  for (int i = 0; i < 6; ++i) jobs.push_back({Cat("g", i), 2 + i % 2});
  for (int i = 0; i < 8; ++i) jobs.push_back({Cat("s", i), 1});
  auto ids = Submit(jobs);
  std::vector<std::string> workers;
  for (int i = 0; i < 4; ++i) workers.push_back(Worker(Cat("w", i)));
  std::mutex mu;
  std::map<std::string, std::string> holding;  // worker -> job it runs
  std::atomic<bool> failed{false};
  std::atomic<int> done{0};
  auto run = [&](int w) {
    std::mt19937 rng(static_cast<unsigned>(w));
    const std::string me = workers[static_cast<size_t>(w)];
    for (int iter = 0; iter < 400 && done.load() < static_cast<int>(jobs.size()); ++iter) {
      auto c = store_.ClaimJobs({me}, 0, 1h, now_);
      if (!c.ok() || !c->at(0).ok()) continue;
      std::optional<ClaimedJob> got = *c->at(0);
      if (got && got->note == ClaimNote::kMemberLeaseWaiting) {
        auto m = store_.TakeMemberLease(me, now_);
        got = m.ok() ? *m : std::nullopt;
      } else if (got && got->note == ClaimNote::kGangWaiting) {
        auto o = store_.OfferToGangs(me, 0, now_ + 1h, 1h, now_);
        got = o.ok() ? o->mine : std::nullopt;
      }
      if (!got) {
        if (rng() % 2) std::this_thread::yield();
        continue;
      }
      {
        std::lock_guard lock(mu);
        if (holding.count(me)) failed = true;
        holding[me] = got->job.id;
      }
      // Node 0 completes at once: a member that picks its lease up after that finds the attempt over.
      {
        std::lock_guard lock(mu);
        holding.erase(me);
      }
      if (got->node_rank == 0) {
        auto s = store_.CompleteJob(me, got->job.id, got->job.attempt, "file:///x", "", now_);
        if (!s.ok()) failed = true;
        ++done;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) threads.emplace_back(run, w);
  for (auto& t : threads) t.join();
  EXPECT_FALSE(failed.load());
  for (const auto& [name, id] : ids) {
    auto j = store_.GetJob(id);
    EXPECT_EQ(j->state, "SUCCEEDED") << name;
    EXPECT_EQ(j->attempt, 1) << name << ": formed once";
    std::vector<JobRecord> js = {*j};
    js[0].state = "LEASED";  // DescribeGangs lists the members of a leased one
    ASSERT_TRUE(store_.DescribeGangs(js, now_).ok());
    std::set<std::string> members;
    for (const auto& m : js[0].members) members.insert(m.worker_id);
    EXPECT_EQ(static_cast<int>(members.size()), j->nodes > 1 ? j->nodes : 0) << name;
  }
}

}  // namespace
}  // namespace btx::storage
