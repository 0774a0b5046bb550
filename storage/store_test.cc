// Every job transition against a real PostgreSQL, with time passed explicitly.
#include "btx/storage/store.h"

#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_replace.h"
#include "btx/common/strings.h"
#include "pg_fixture.h"

namespace btx::storage {
namespace {
using namespace std::chrono_literals;

class StoreTest : public ::testing::Test {
 protected:
  StoreTest() : pool_(btx::testing::NewMigratedDatabase(), 8), store_(pool_) {}

  std::string Worker(const std::string& name) {
    auto id = store_.RegisterWorker(name, "host", R"({"gpus":0})", "test", now_);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  PipelineRecord Submit(const std::string& key = "", int max_attempts = 3) {
    NewPipeline p{.name = "p", .spec_json = "{}", .idempotency_key = key};
    p.jobs = {{.name = "a", .kind = "branch", .max_attempts = max_attempts},
              {.name = "b", .kind = "branch", .max_attempts = max_attempts},
              {.name = "m", .kind = "merge", .depends_on = {"a", "b"}, .max_attempts = max_attempts}};
    auto r = store_.CreatePipeline(p, now_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r->first;
  }
  std::optional<ClaimedJob> Claim(const std::string& worker, Duration lease = 30s) {
    auto c = store_.ClaimJob(worker, 0, lease, now_);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *c : std::nullopt;
  }
  std::string StateOf(const std::string& job_id) { return store_.GetJob(job_id)->state; }

  ConnectionPool pool_;
  Store store_;
  TimePoint now_ = FromUnixMicros(1'700'000'000'000'000);
  RetryPolicy policy_{.base = 10s, .max = 60s};
};

// Submit refuses a pipeline whose jobs need more GPUs than this worker has.
TEST_F(StoreTest, LargestWorkerIsTheOneWithTheMostGpusWhateverItsState) {
  auto none = store_.LargestWorker();
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value());
  ASSERT_TRUE(store_.RegisterWorker("cpu", "h", R"({"gpus": 0, "cpu_threads": 8})", "t", now_).ok());
  ASSERT_TRUE(store_.RegisterWorker("two", "h", R"({"gpus": 2})", "t", now_).ok());
  ASSERT_TRUE(store_.RegisterWorker("one", "h", R"({"gpus": 1})", "t", now_).ok());
  ASSERT_TRUE(store_.RegisterWorker("odd", "h", R"({"gpus": "many"})", "t", now_).ok());
  auto largest = store_.LargestWorker();
  ASSERT_TRUE(largest.ok() && largest->has_value()) << largest.status();
  EXPECT_EQ((*largest)->name, "two");
  EXPECT_EQ((*largest)->gpus, 2);
  // CPU ranks are sized against CPU threads, the other ranking.
  auto widest = store_.LargestWorker(WorkerResource::kCpuThreads);
  ASSERT_TRUE(widest.ok() && widest->has_value()) << widest.status();
  EXPECT_EQ((*widest)->name, "cpu");
  EXPECT_EQ((*widest)->cpu_threads, 8);
  // A lost worker is still a machine of the fleet: it comes back under its name.
  ASSERT_EQ(*store_.MarkLostWorkers(1s, now_ + 1h), 4);
  largest = store_.LargestWorker();
  ASSERT_TRUE(largest.ok() && largest->has_value());
  EXPECT_EQ((*largest)->name, "two");
  // Re-registering replaces what the worker said it has.
  ASSERT_TRUE(store_.RegisterWorker("two", "h", R"({"gpus": 0})", "t", now_).ok());
  largest = store_.LargestWorker();
  ASSERT_TRUE(largest.ok() && largest->has_value());
  EXPECT_EQ((*largest)->name, "one");
  EXPECT_EQ((*largest)->gpus, 1);
}

TEST_F(StoreTest, RootsAreReadyAndDependentsPending) {
  auto p = Submit();
  ASSERT_EQ(p.jobs.size(), 3u);
  std::map<std::string, std::string> states;
  for (const auto& j : p.jobs) states[j.name] = j.state;
  EXPECT_EQ(states["a"], "READY");
  EXPECT_EQ(states["b"], "READY");
  EXPECT_EQ(states["m"], "PENDING");
  EXPECT_EQ(p.state, "RUNNING");
}

TEST_F(StoreTest, IdempotencyKeyReturnsSamePipeline) {
  auto p1 = Submit("key-1");
  NewPipeline again{.name = "p", .spec_json = "{}", .idempotency_key = "key-1"};
  auto p2 = store_.CreatePipeline(again, now_);
  ASSERT_TRUE(p2.ok());
  EXPECT_FALSE(p2->second);
  EXPECT_EQ(p2->first.id, p1.id);
  EXPECT_EQ(store_.ListPipelines({})->pipelines.size(), 1u);
}

TEST_F(StoreTest, IdempotencyKeysAreScopedPerOwnerAndBoundToTheirSpec) {
  NewPipeline alice{.name = "p", .spec_json = R"({"name": "p"})", .idempotency_key = "k", .owner = "alice"};
  NewPipeline bob = alice;
  bob.owner = "bob";
  auto a = store_.CreatePipeline(alice, now_);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->first.owner, "alice");
  // Bob's key is his own: a new pipeline, never Alice's.
  auto b = store_.CreatePipeline(bob, now_);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(b->second);
  EXPECT_NE(b->first.id, a->first.id);
  EXPECT_EQ(b->first.owner, "bob");
  // Alice again, same spec: her pipeline; another spec: refused, naming the key.
  auto again = store_.CreatePipeline(alice, now_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_FALSE(again->second);
  EXPECT_EQ(again->first.id, a->first.id);
  NewPipeline changed = alice;
  changed.spec_json = R"({"name": "p", "seed": 2})";
  auto refused = store_.CreatePipeline(changed, now_);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(refused.status().message().find("idempotency key 'k'"), std::string::npos) << refused.status();
  // Listing by owner.
  auto mine = store_.ListPipelines({.owner = "bob"});
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_EQ(mine->pipelines.size(), 1u);
  EXPECT_EQ(mine->pipelines[0].id, b->first.id);
  EXPECT_EQ(store_.ListPipelines({})->pipelines.size(), 2u);
  auto events = store_.EventsAfter("", 0, 100, std::string("bob"));
  ASSERT_TRUE(events.ok()) << events.status();
  ASSERT_FALSE(events->empty());
  for (const auto& e : *events) EXPECT_EQ(e.pipeline_id, b->first.id);
}

TEST_F(StoreTest, ConcurrentSubmitsWithOneKeyCreateOnePipeline) {
  std::vector<std::thread> threads;
  std::vector<std::string> ids(6);
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] {
      NewPipeline p{.name = "p", .spec_json = "{}", .idempotency_key = "same"};
      p.jobs = {{.name = "a", .kind = "branch"}};
      auto r = store_.CreatePipeline(p, now_);
      if (r.ok()) ids[i] = r->first.id;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(std::set<std::string>(ids.begin(), ids.end()).size(), 1u);
}

TEST_F(StoreTest, RejectsCyclesAndUnknownDependencies) {
  NewPipeline cyc{.name = "c", .spec_json = "{}"};
  cyc.jobs = {{.name = "x", .kind = "branch", .depends_on = {"y"}}, {.name = "y", .kind = "branch", .depends_on = {"x"}}};
  EXPECT_EQ(store_.CreatePipeline(cyc, now_).status().code(), absl::StatusCode::kInvalidArgument);
  NewPipeline unk{.name = "u", .spec_json = "{}"};
  unk.jobs = {{.name = "x", .kind = "branch", .depends_on = {"nope"}}};
  EXPECT_EQ(store_.CreatePipeline(unk, now_).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(StoreTest, CompleteUnblocksDependentAndFinishesPipeline) {
  auto p = Submit();
  auto w = Worker("w1");
  auto c1 = Claim(w), c2 = Claim(w);
  ASSERT_TRUE(c1 && c2);
  EXPECT_FALSE(Claim(w).has_value());  // merge still waits
  ASSERT_TRUE(store_.CompleteJob(w, c1->job.id, 1, "file:///a", "", now_).ok());
  EXPECT_FALSE(Claim(w).has_value());
  ASSERT_TRUE(store_.CompleteJob(w, c2->job.id, 1, "file:///b", "", now_).ok());
  auto m = Claim(w);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->job.name, "m");
  EXPECT_EQ(m->parent_artifacts.at(c1->job.name), "file:///a");
  EXPECT_EQ(m->parent_artifacts.size(), 2u);
  ASSERT_TRUE(store_.CompleteJob(w, m->job.id, 1, "file:///m", R"({"avg": 1.5})", now_).ok());
  auto done = store_.GetPipeline(p.id);
  EXPECT_EQ(done->state, "SUCCEEDED");
  EXPECT_EQ(nlohmann::json::parse(done->result_json)["m"]["avg"], 1.5);
}

TEST_F(StoreTest, ClaimJobsAnswersEveryEntryInOrder) {
  auto p = Submit();
  auto w1 = Worker("w1"), w2 = Worker("w2");
  const std::string unknown = "3f1c2b9a-0000-4000-8000-000000000001";
  // w1 polls for two slots; two READY jobs (a, b) go to the first two known entries.
  auto out = store_.ClaimJobs({w1, unknown, w1, w2}, 0, 30s, now_);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 4u);
  ASSERT_TRUE((*out)[0].ok() && (*out)[2].ok() && (*out)[3].ok());
  EXPECT_EQ((*out)[1].status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*out)[0]->has_value() && (*out)[2]->has_value());
  EXPECT_FALSE((*out)[3]->has_value());  // nothing left; m waits for its parents
  std::set<std::string> names;
  for (size_t i : {0u, 2u}) {
    const ClaimedJob& c = **(*out)[i];
    names.insert(c.job.name);
    EXPECT_EQ(c.job.state, "LEASED");
    EXPECT_EQ(c.job.attempt, 1);
    EXPECT_EQ(c.job.worker_id, w1);
    EXPECT_EQ(c.pipeline_name, "p");
    EXPECT_EQ(StateOf(c.job.id), "LEASED");
  }
  EXPECT_EQ(names, (std::set<std::string>{"a", "b"}));
  // Each lease has its attempt row and event, as a single claim's.
  auto events = store_.EventsAfter(p.id, 0, 100);
  ASSERT_TRUE(events.ok());
  int leased = 0;
  for (const auto& e : *events) leased += e.type == "job.leased";
  EXPECT_EQ(leased, 2);
  ASSERT_TRUE(store_.CompleteJob(w1, (**(*out)[0]).job.id, 1, "file:///x", "", now_).ok());
}

TEST_F(StoreTest, ClaimJobsRefusesADrainingWorker) {
  Submit();
  auto w = Worker("w1");
  ASSERT_TRUE(store_.Heartbeat(w, {}, /*draining=*/true, 30s, now_).ok());
  auto out = store_.ClaimJobs({w}, 0, 30s, now_);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ((*out)[0].status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.ClaimJob(w, 0, 30s, now_).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(StoreTest, CompleteJobsAppliesEachEntryOnItsOwnMerits) {
  auto p = Submit();
  auto w1 = Worker("w1"), w2 = Worker("w2");
  auto a = Claim(w1), b = Claim(w2);
  ASSERT_TRUE(a && b);
  const std::string missing = "3f1c2b9a-0000-4000-8000-000000000002";
  auto out = store_.CompleteJobs({{.worker_id = w1, .job_id = a->job.id, .attempt = 1, .artifact_uri = "file:///a"},
                                  {.worker_id = w1, .job_id = b->job.id, .attempt = 1, .artifact_uri = "file:///b"},
                                  {.worker_id = w1, .job_id = missing, .attempt = 1}},
                                 now_);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 3u);
  EXPECT_TRUE((*out)[0].status.ok());
  EXPECT_EQ((*out)[1].status.code(), absl::StatusCode::kFailedPrecondition);  // b is w2's lease
  EXPECT_EQ((*out)[2].status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(StateOf(a->job.id), "SUCCEEDED");
  EXPECT_EQ(StateOf(b->job.id), "LEASED");
  EXPECT_EQ(store_.GetJob(b->job.id)->artifact_uri, "");
  // Completing both parents in one batch readies the merge exactly once and, later, ends the pipeline.
  auto again = store_.CompleteJobs({{.worker_id = w2, .job_id = b->job.id, .attempt = 1, .artifact_uri = "file:///b",
                                     .result_json = R"({"loss": 2.5})"}},
                                   now_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)[0].readied, 1);
  auto m = Claim(w1);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->parent_artifacts.at("b"), "file:///b");
  ASSERT_TRUE(store_.CompleteJobs({{.worker_id = w1, .job_id = m->job.id, .attempt = 1, .artifact_uri = "file:///m"}},
                                  now_).ok());
  auto done = store_.GetPipeline(p.id);
  EXPECT_EQ(done->state, "SUCCEEDED");
  EXPECT_EQ(nlohmann::json::parse(done->result_json)["b"]["loss"], 2.5);
}

TEST_F(StoreTest, CompleteJobsOfSiblingsInOneBatchReadiesTheirDependentOnce) {
  auto p = Submit();
  auto w = Worker("w1");
  auto a = Claim(w), b = Claim(w);
  ASSERT_TRUE(a && b);
  auto out = store_.CompleteJobs({{.worker_id = w, .job_id = a->job.id, .attempt = 1, .artifact_uri = "file:///a"},
                                  {.worker_id = w, .job_id = b->job.id, .attempt = 1, .artifact_uri = "file:///b"}},
                                 now_);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ((*out)[0].readied + (*out)[1].readied, 1);
  auto m = Claim(w);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->job.name, "m");
  EXPECT_EQ(m->parent_artifacts.size(), 2u);
}

// The batch is applied set-based; completing the same entries one by one must leave the same jobs,
// pipeline and events. Two identical pipelines, one completed each way, compared round by round.
TEST_F(StoreTest, CompleteJobsLeavesWhatOneByOneCompletionsLeave) {
  auto submit = [&] {
    NewPipeline p{.name = "p", .spec_json = "{}"};
    p.jobs = {{.name = "a", .kind = "branch"},
              {.name = "b", .kind = "branch"},
              {.name = "c", .kind = "branch"},
              {.name = "m", .kind = "merge", .depends_on = {"a", "b"}},
              {.name = "n", .kind = "eval", .depends_on = {"a"}},
              {.name = "e", .kind = "eval", .depends_on = {"m", "c"}}};
    auto r = store_.CreatePipeline(p, now_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r->first.id;
  };
  const std::string batched = submit(), single = submit();
  const std::string w = Worker("w1");
  // (pipeline, job name) -> leased attempt, for every job claimable now.
  std::map<std::pair<std::string, std::string>, ClaimedJob> leased;
  auto claim_all = [&] {
    while (auto c = Claim(w)) leased[{c->job.pipeline_id, c->job.name}] = *c;
  };
  struct Entry {
    std::string job{};
    int attempt_delta = 0;  // nonzero: a stale attempt
    std::string result{};
  };
  auto run = [&](const std::vector<Entry>& entries) {
    std::vector<Completion> batch;
    for (const auto& e : entries) {
      const auto& c = leased.at({batched, e.job});
      batch.push_back({.worker_id = w, .job_id = c.job.id, .attempt = c.job.attempt + e.attempt_delta,
                       .artifact_uri = "file:///" + e.job, .result_json = e.result});
    }
    batch.push_back({.worker_id = w, .job_id = "3f1c2b9a-0000-4000-8000-00000000000f", .attempt = 1});
    auto out = store_.CompleteJobs(batch, now_);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->size(), batch.size());
    int batched_readied = 0, single_readied = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& c = leased.at({single, entries[i].job});
      int readied = 0;
      absl::Status s = store_.CompleteJob(w, c.job.id, c.job.attempt + entries[i].attempt_delta,
                                          "file:///" + entries[i].job, entries[i].result, now_, &readied);
      EXPECT_EQ((*out)[i].status.code(), s.code()) << entries[i].job << ": " << (*out)[i].status << " vs " << s;
      // The same words but for the job's id.
      EXPECT_EQ(absl::StrReplaceAll((*out)[i].status.message(), {{batch[i].job_id, "<id>"}}),
                absl::StrReplaceAll(s.message(), {{c.job.id, "<id>"}}));
      batched_readied += (*out)[i].readied;
      single_readied += readied;
    }
    EXPECT_EQ(out->back().status.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(batched_readied, single_readied);
    claim_all();
  };
  auto snapshot = [&](const std::string& pipeline) {
    std::vector<std::string> rows;
    const auto jobs = store_.ListJobs(pipeline, "", 100);
    const auto events = store_.EventsAfter(pipeline, 0, 1000);
    for (const auto& j : *jobs)
      rows.push_back(Cat(j.name, " ", j.state, " ", j.attempt, " ", j.artifact_uri, " ", j.result_json));
    std::sort(rows.begin(), rows.end());
    auto p = store_.GetPipeline(pipeline);
    rows.push_back(Cat("pipeline ", p->state, " ", p->result_json));
    // Claims lease jobs created in the same instant in either order: only what completions write is compared.
    for (const auto& e : *events)
      if (e.type != "job.leased") rows.push_back(Cat(e.type, " ", e.job_name, " ", e.payload_json));
    return rows;
  };
  claim_all();
  ASSERT_EQ(leased.size(), 6u);
  // a twice (the repeat is stale), b with a result, c at a stale attempt: m and n become READY.
  run({{.job = "a", .result = R"({"acc": 0.5})"}, {.job = "b", .result = R"({"loss": 2})"}, {.job = "a"},
       {.job = "c", .attempt_delta = 1}});
  EXPECT_EQ(snapshot(batched), snapshot(single));
  // c and m together ready e once; n finishes beside them.
  run({{.job = "m"}, {.job = "c", .result = R"({"c": [1, 2]})"}, {.job = "n"}});
  EXPECT_EQ(snapshot(batched), snapshot(single));
  EXPECT_EQ(StateOf(leased.at({batched, "e"}).job.id), "LEASED");
  // The last job ends the pipeline.
  run({{.job = "e", .result = R"({"ppl": 3.5})"}});
  const auto last = snapshot(batched);
  EXPECT_EQ(last, snapshot(single));
  EXPECT_EQ(store_.GetPipeline(batched)->state, "SUCCEEDED");
  EXPECT_EQ(last.back().substr(0, 18), "pipeline.succeeded");
}

TEST_F(StoreTest, ACompleteJobsBatchThatFailsAppliesNothing) {
  Submit();
  auto w = Worker("w1");
  auto a = Claim(w), b = Claim(w);
  ASSERT_TRUE(a && b);
  // PostgreSQL's jsonb takes no \u0000: the second entry fails the batch, and the first must not stay applied.
  auto out = store_.CompleteJobs({{.worker_id = w, .job_id = a->job.id, .attempt = 1, .artifact_uri = "file:///a"},
                                  {.worker_id = w, .job_id = b->job.id, .attempt = 1, .artifact_uri = "file:///b",
                                   .result_json = R"({"x": "\u0000"})"}},
                                 now_);
  EXPECT_FALSE(out.ok());
  EXPECT_EQ(StateOf(a->job.id), "LEASED");
  EXPECT_EQ(StateOf(b->job.id), "LEASED");
  EXPECT_TRUE(store_.CompleteJob(w, a->job.id, 1, "file:///a", "", now_).ok());
}

TEST_F(StoreTest, StaleAttemptIsRefusedAndChangesNothing) {
  NewPipeline single{.name = "single", .spec_json = "{}"};
  single.jobs = {{.name = "only", .kind = "branch"}};
  ASSERT_TRUE(store_.CreatePipeline(single, now_).ok());
  auto w1 = Worker("w1"), w2 = Worker("w2");
  auto c = Claim(w1, 10s);
  ASSERT_TRUE(c);
  now_ += 11s;
  auto reaped = store_.ReapExpiredLeases(policy_, now_);
  ASSERT_TRUE(reaped.ok());
  ASSERT_EQ(reaped->size(), 1u);
  EXPECT_TRUE((*reaped)[0].requeued);
  auto again = Claim(w2);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->job.id, c->job.id);
  EXPECT_EQ(again->job.attempt, 2);
  // The first worker's late completion carries attempt 1: refused.
  auto late = store_.CompleteJob(w1, c->job.id, 1, "file:///late", "", now_);
  EXPECT_EQ(late.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_.FailJob(w1, c->job.id, 1, "x", true, false, "", policy_, now_).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // A heartbeat for the stale attempt is told the lease is lost.
  auto hb = store_.Heartbeat(w1, {{.job_id = c->job.id, .attempt = 1}}, false, 30s, now_);
  ASSERT_TRUE(hb.ok());
  EXPECT_EQ((*hb)[0].directive, Directive::kLeaseLost);
  auto job = store_.GetJob(c->job.id);
  EXPECT_EQ(job->state, "LEASED");
  EXPECT_EQ(job->attempt, 2);
  EXPECT_EQ(job->worker_id, w2);
  EXPECT_EQ(job->artifact_uri, "");
}

TEST_F(StoreTest, HeartbeatRenewsLeaseAndRecordsProgress) {
  Submit();
  auto w = Worker("w1");
  auto c = Claim(w, 10s);
  now_ += 8s;
  JobReportRow rep{.job_id = c->job.id, .attempt = 1, .progress_json = R"({"step": 5})", .step = 5, .loss = 2.5,
                   .checkpoint_uri = "file:///ck/step-5", .logs = {{0, 1, "stdout", "hello", now_}}};
  auto hb = store_.Heartbeat(w, {rep}, false, 10s, now_);
  ASSERT_TRUE(hb.ok()) << hb.status();
  EXPECT_EQ((*hb)[0].directive, Directive::kContinue);
  now_ += 8s;  // 16 s after the claim: expired without the heartbeat, alive with it
  EXPECT_TRUE(store_.ReapExpiredLeases(policy_, now_)->empty());
  auto job = store_.GetJob(c->job.id);
  EXPECT_EQ(job->checkpoint_uri, "file:///ck/step-5");
  EXPECT_EQ(nlohmann::json::parse(job->progress_json)["step"], 5);
  auto logs = store_.LogsAfter(c->job.id, 0, 10);
  ASSERT_EQ(logs->size(), 1u);
  EXPECT_EQ((*logs)[0].line, "hello");
}

TEST_F(StoreTest, FailRetriesWithBackoffThenFailsPipeline) {
  auto p = Submit("", 2);
  auto w = Worker("w1");
  auto c = Claim(w);
  auto out = store_.FailJob(w, c->job.id, 1, "boom", true, false, "", policy_, now_);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->new_state, "RETRY_WAIT");
  auto other = Claim(w);  // the sibling root
  ASSERT_TRUE(other);
  EXPECT_NE(other->job.id, c->job.id);
  EXPECT_FALSE(Claim(w).has_value());  // backoff not over
  now_ += 10s;
  auto retry = Claim(w);
  ASSERT_TRUE(retry);
  EXPECT_EQ(retry->job.id, c->job.id);
  EXPECT_EQ(retry->job.attempt, 2);
  auto last = store_.FailJob(w, c->job.id, 2, "boom again", true, false, "", policy_, now_);
  EXPECT_EQ(last->new_state, "FAILED");
  EXPECT_TRUE(last->pipeline_failed);
  auto pl = store_.GetPipeline(p.id);
  EXPECT_EQ(pl->state, "FAILED");
  for (const auto& j : pl->jobs) {
    if (j.name == "m") {
      EXPECT_EQ(j.state, "CANCELLED");
    }
    if (j.id == other->job.id) {
      EXPECT_TRUE(j.cancel_requested);
    }
  }
}

TEST_F(StoreTest, NonRetryableFailureFailsAtOnce) {
  Submit();
  auto w = Worker("w1");
  auto c = Claim(w);
  EXPECT_EQ(store_.FailJob(w, c->job.id, 1, "bad input", false, false, "", policy_, now_)->new_state, "FAILED");
}

TEST_F(StoreTest, CancelStopsQueuedAndSignalsRunning) {
  auto p = Submit();
  auto w = Worker("w1");
  auto c = Claim(w);
  auto pl = store_.CancelPipeline(p.id, "", now_);
  ASSERT_TRUE(pl.ok());
  EXPECT_EQ(pl->state, "CANCELLED");
  EXPECT_FALSE(Claim(w).has_value());
  auto hb = store_.Heartbeat(w, {{.job_id = c->job.id, .attempt = 1}}, false, 30s, now_);
  EXPECT_EQ((*hb)[0].directive, Directive::kCancel);
  EXPECT_EQ(store_.FailJob(w, c->job.id, 1, "cancelled", false, true, "", policy_, now_)->new_state, "CANCELLED");
  // Retry brings the cancelled jobs back.
  auto retried = store_.RetryPipeline(p.id, now_);
  ASSERT_TRUE(retried.ok()) << retried.status();
  EXPECT_EQ(retried->state, "RUNNING");
  EXPECT_TRUE(Claim(w).has_value());
}

TEST_F(StoreTest, ExpiredLeaseOutOfAttemptsFails) {
  auto p = Submit("", 1);
  auto w = Worker("w1");
  auto c = Claim(w, 5s);
  now_ += 6s;
  auto reaped = store_.ReapExpiredLeases(policy_, now_);
  ASSERT_EQ(reaped->size(), 1u);
  EXPECT_FALSE((*reaped)[0].requeued);
  EXPECT_EQ(store_.GetPipeline(p.id)->state, "FAILED");
}

TEST_F(StoreTest, ConcurrentClaimersNeverShareAnAttempt) {
  NewPipeline p{.name = "many", .spec_json = "{}"};
  for (int i = 0; i < 60; ++i) p.jobs.push_back({.name = Cat("j", i), .kind = "branch"});
  ASSERT_TRUE(store_.CreatePipeline(p, now_).ok());
  std::vector<std::string> workers;
  for (int i = 0; i < 4; ++i) workers.push_back(Worker(Cat("w", i)));
  std::mutex mu;
  std::vector<std::string> claimed;
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      while (true) {
        auto c = store_.ClaimJob(workers[i], 0, 30s, now_);
        if (!c.ok() || !c->has_value()) break;
        std::lock_guard lock(mu);
        claimed.push_back((*c)->job.id);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(claimed.size(), 60u);
  EXPECT_EQ(std::set<std::string>(claimed.begin(), claimed.end()).size(), 60u);
}

// Batches naming the same workers in different orders (multi-slot workers polling on several
// calls) must neither deadlock on the worker rows nor hand one job out twice.
TEST_F(StoreTest, ConcurrentBatchesWithOverlappingWorkersNeverDeadlockOrShare) {
  NewPipeline p{.name = "many", .spec_json = "{}"};
  for (int i = 0; i < 240; ++i) p.jobs.push_back({.name = Cat("j", i), .kind = "branch"});
  ASSERT_TRUE(store_.CreatePipeline(p, now_).ok());
  std::vector<std::string> workers;
  for (int i = 0; i < 6; ++i) workers.push_back(Worker(Cat("w", i)));
  std::mutex mu;
  std::vector<std::string> claimed;
  std::vector<std::string> errors;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::string> mine;
      for (int k = 0; k < 6; ++k) mine.push_back(workers[(t % 2 == 0 ? k : 5 - k)]);
      while (true) {
        auto out = store_.ClaimJobs(mine, 0, 30s, now_);
        std::lock_guard lock(mu);
        if (!out.ok()) {
          errors.push_back(std::string(out.status().message()));
          return;
        }
        bool any = false;
        for (const auto& o : *out) {
          if (o.ok() && o->has_value()) claimed.push_back((*o)->job.id), any = true;
        }
        if (!any) return;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_TRUE(errors.empty()) << errors.front();
  EXPECT_EQ(claimed.size(), 240u);
  EXPECT_EQ(std::set<std::string>(claimed.begin(), claimed.end()).size(), 240u);
}

TEST_F(StoreTest, EventsAreOrderedAndResumable) {
  auto p = Submit();
  auto all = store_.EventsAfter(p.id, 0, 100);
  ASSERT_FALSE(all->empty());
  EXPECT_EQ(all->front().type, "pipeline.submitted");
  auto rest = store_.EventsAfter(p.id, all->front().id, 100);
  EXPECT_EQ(rest->size(), all->size() - 1);
}

TEST_F(StoreTest, ListPipelinesPages) {
  for (int i = 0; i < 5; ++i) {
    now_ += 1s;
    Submit();
  }
  std::set<std::string> seen;
  PipelineFilter f{.page_size = 2};
  int pages = 0;
  while (true) {
    auto page = store_.ListPipelines(f);
    ASSERT_TRUE(page.ok()) << page.status();
    for (const auto& p : page->pipelines) seen.insert(p.id);
    ++pages;
    if (page->next_page_token.empty()) break;
    f.page_token = page->next_page_token;
  }
  EXPECT_EQ(seen.size(), 5u);
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(store_.ListPipelines({.page_token = "garbage"}).status().code(), absl::StatusCode::kInvalidArgument);
}

// Jobs of pipelines submitted in the same instant too: the id makes the order total, so pages neither
// repeat nor skip a job, and give the same order as one big page.
TEST_F(StoreTest, ListJobsPagesWithoutRepeatsOrGaps) {
  for (int i = 0; i < 3; ++i) Submit();
  now_ += 1s;
  Submit();
  auto all = store_.ListJobs("", "", 1000);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_GE(all->size(), 8u);
  std::vector<std::string> paged;
  std::string token;
  int pages = 0;
  do {
    std::string next;
    auto page = store_.ListJobs("", "", 3, std::nullopt, token, &next);
    ASSERT_TRUE(page.ok()) << page.status();
    ASSERT_LE(page->size(), 3u);
    for (const auto& j : *page) paged.push_back(j.id);
    token = next;
    ++pages;
  } while (!token.empty() && pages < 100);
  std::vector<std::string> expected;
  for (const auto& j : *all) expected.push_back(j.id);
  EXPECT_EQ(paged, expected);
  EXPECT_EQ(pages, static_cast<int>((expected.size() + 2) / 3));
  EXPECT_EQ(store_.ListJobs("", "", 3, std::nullopt, "garbage").status().code(), absl::StatusCode::kInvalidArgument);
}

// A name prefix is a literal prefix: LIKE's wildcards in it ('_', '%') match only themselves.
TEST_F(StoreTest, NamePrefixIsLiteralNotALikePattern) {
  for (const char* name : {"a_b", "axb", "a%c", "abc"}) {
    NewPipeline np{.name = name, .spec_json = "{}"};
    np.jobs = {{.name = "j", .kind = "branch"}};
    ASSERT_TRUE(store_.CreatePipeline(np, now_).ok());
  }
  auto names = [&](const std::string& prefix) {
    std::set<std::string> out;
    auto page = store_.ListPipelines({.name_prefix = prefix});
    EXPECT_TRUE(page.ok()) << page.status();
    if (page.ok()) {
      for (const auto& p : page->pipelines) out.insert(p.name);
    }
    return out;
  };
  EXPECT_EQ(names("a_"), std::set<std::string>{"a_b"});
  EXPECT_EQ(names("a%"), std::set<std::string>{"a%c"});
  EXPECT_EQ(names("a").size(), 4u);
}

TEST_F(StoreTest, MalformedIdsAreNotFound) {
  EXPECT_EQ(store_.GetPipeline("not-a-uuid").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_.GetJob("00000000-0000-0000-0000-000000000000").status().code(), absl::StatusCode::kNotFound);
}

// A drain (or a claim handed straight back) is not the job's fault: the requeue keeps the job's
// attempt budget, so a job with max_attempts 1 that is drained still gets to run to success. A
// real failure afterwards still counts.
TEST_F(StoreTest, InterruptedAttemptKeepsTheAttemptBudget) {
  NewPipeline np{.name = "one", .spec_json = "{}"};
  np.jobs = {{.name = "a", .kind = "branch", .max_attempts = 1}};
  auto p = store_.CreatePipeline(np, now_);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string w = Worker("w");
  auto c = Claim(w);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->job.attempt, 1);
  // Drained twice (SIGTERM: btx-train exits 75), then a claim cancelled as the drain began.
  for (int i = 0; i < 2; ++i) {
    auto f = store_.FailJob(w, c->job.id, c->job.attempt, "interrupted: the worker is draining (exit 75)",
                            /*retryable=*/true, /*cancelled=*/false, "", policy_, now_, /*interrupted=*/true);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ(f->new_state, "RETRY_WAIT");
    EXPECT_FALSE(f->pipeline_failed);
    // Requeued at once, under a new attempt number (fencing).
    c = Claim(w);
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->job.attempt, i + 2);
    // The old attempt is fenced off.
    EXPECT_TRUE(absl::IsFailedPrecondition(store_.CompleteJob(w, c->job.id, i + 1, "", "", now_)));
  }
  ASSERT_TRUE(store_.CompleteJob(w, c->job.id, c->job.attempt, "file:///a", "", now_).ok());
  EXPECT_EQ(store_.GetPipeline(p->first.id)->state, "SUCCEEDED");

  // Budget kept, not grown: after an interruption, a real failure on the last attempt fails.
  auto q = store_.CreatePipeline(NewPipeline{.name = "two", .spec_json = "{}", .jobs = {{.name = "a", .kind = "branch", .max_attempts = 1}}}, now_);
  ASSERT_TRUE(q.ok()) << q.status();
  c = Claim(w);
  ASSERT_TRUE(c.has_value());
  ASSERT_TRUE(store_.FailJob(w, c->job.id, c->job.attempt, "interrupted", true, false, "", policy_, now_, true).ok());
  c = Claim(w);
  ASSERT_TRUE(c.has_value());
  auto f = store_.FailJob(w, c->job.id, c->job.attempt, "btx-train exited with code 1", true, false, "", policy_, now_);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->new_state, "FAILED");
  EXPECT_TRUE(f->pipeline_failed);
}

// Cancel applied while the last job's completion is in flight: the completion lands after it
// (both take the pipeline lock), so every job SUCCEEDED but the pipeline is CANCELLED. A retry has
// nothing to requeue and must not leave the pipeline RUNNING with nothing to run.
TEST_F(StoreTest, RetryAfterCancelRacedTheLastCompletionFinishesThePipeline) {
  NewPipeline np{.name = "one", .spec_json = "{}"};
  np.jobs = {{.name = "a", .kind = "branch", .max_attempts = 1}};
  auto p = store_.CreatePipeline(np, now_);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string w = Worker("w");
  auto c = Claim(w);
  ASSERT_TRUE(c.has_value());
  ASSERT_EQ(store_.CancelPipeline(p->first.id, "", now_)->state, "CANCELLED");
  ASSERT_TRUE(store_.CompleteJob(w, c->job.id, c->job.attempt, "file:///a", "", now_).ok());
  auto r = store_.RetryPipeline(p->first.id, now_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->state, "SUCCEEDED");
  EXPECT_FALSE(Claim(w).has_value());
}

// Seeded random interleavings of Submit/Cancel/Retry/Claim/Complete/Fail/reap over a few small
// pipelines; after each sequence is driven to quiescence every pipeline must be terminal and
// consistent with its jobs, and a RUNNING pipeline must never be left without a runnable job.
TEST_F(StoreTest, RandomInterleavingsEndInConsistentTerminalStates) {
  const std::vector<std::string> workers = {Worker("w1"), Worker("w2")};
  uint64_t base_seed = 20261205;
  if (const char* env = std::getenv("BTX_STORE_FUZZ_SEED")) base_seed = std::strtoull(env, nullptr, 10);
  constexpr int kSequences = 300;
  for (int seq = 0; seq < kSequences; ++seq) {
    const uint64_t seed = base_seed + static_cast<uint64_t>(seq);
    SCOPED_TRACE(Cat("seed ", seed, " (rerun with BTX_STORE_FUZZ_SEED=", seed, ")"));
    std::mt19937_64 rng(seed);
    auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
    std::vector<std::string> pipelines;
    std::map<std::string, bool> cancelled;  // cancelled since submit or the last successful retry
    std::vector<ClaimedJob> leased;         // what the test thinks it holds (may go stale)
    auto submit = [&] {
      NewPipeline np{.name = "fuzz", .spec_json = "{}"};
      const int shape = pick(3);
      const int ma = 1 + pick(2);
      np.jobs = {{.name = "a", .kind = "branch", .max_attempts = ma}};
      if (shape >= 1) np.jobs.push_back({.name = "b", .kind = "branch", .depends_on = {"a"}, .max_attempts = ma});
      if (shape == 2) np.jobs.push_back({.name = "c", .kind = "merge", .depends_on = {"a"}, .max_attempts = ma});
      auto r = store_.CreatePipeline(np, now_);
      ASSERT_TRUE(r.ok()) << r.status();
      pipelines.push_back(r->first.id);
      cancelled[r->first.id] = false;
    };
    auto check_running_has_work = [&](const std::string& where) {
      for (const auto& id : pipelines) {
        auto p = store_.GetPipeline(id);
        ASSERT_TRUE(p.ok()) << p.status();
        if (p->state != "RUNNING") continue;
        bool work = false;
        for (const auto& j : p->jobs) work |= j.state == "READY" || j.state == "RETRY_WAIT" || j.state == "LEASED";
        ASSERT_TRUE(work) << "after " << where << ": pipeline " << id << " is RUNNING with no runnable or running job";
      }
    };
    auto claim = [&] {
      auto c = store_.ClaimJob(workers[pick(2)], 0, 30s, now_);
      EXPECT_TRUE(c.ok()) << c.status();
      if (!c.ok() || !c->has_value()) return false;
      leased.push_back(**c);
      return true;
    };
    auto finish = [&](size_t i, bool succeed, bool retryable, bool interrupted) {
      const ClaimedJob c = leased[i];
      leased.erase(leased.begin() + static_cast<std::ptrdiff_t>(i));
      if (succeed) {
        auto s = store_.CompleteJob(c.job.worker_id, c.job.id, c.job.attempt, "file:///x", "", now_);
        ASSERT_TRUE(s.ok() || absl::IsFailedPrecondition(s)) << s;
      } else {
        auto f = store_.FailJob(c.job.worker_id, c.job.id, c.job.attempt, "boom", retryable, false, "", policy_, now_,
                                interrupted);
        ASSERT_TRUE(f.ok() || absl::IsFailedPrecondition(f.status())) << f.status();
      }
    };
    submit();
    const int steps = 8 + pick(20);
    for (int step = 0; step < steps && !HasFatalFailure(); ++step) {
      const int op = pick(10);
      std::string what;
      if (op == 0 && pipelines.size() < 3) {
        what = "submit";
        submit();
      } else if (op <= 2) {
        what = "claim";
        claim();
      } else if (op == 3 && !leased.empty()) {
        what = "complete";
        finish(static_cast<size_t>(pick(static_cast<int>(leased.size()))), true, false, false);
      } else if (op == 4 && !leased.empty()) {
        what = "fail";
        finish(static_cast<size_t>(pick(static_cast<int>(leased.size()))), false, pick(4) != 0, pick(2) == 0);
      } else if (op == 5) {
        what = "cancel";
        const std::string& id = pipelines[static_cast<size_t>(pick(static_cast<int>(pipelines.size())))];
        auto r = store_.CancelPipeline(id, "", now_);
        ASSERT_TRUE(r.ok()) << r.status();
        if (r->state == "CANCELLED") cancelled[id] = cancelled[id] || r->cancel_requested;
      } else if (op == 6) {
        what = "retry";
        const std::string& id = pipelines[static_cast<size_t>(pick(static_cast<int>(pipelines.size())))];
        auto r = store_.RetryPipeline(id, now_);
        ASSERT_TRUE(r.ok() || absl::IsFailedPrecondition(r.status())) << r.status();
        if (r.ok()) cancelled[id] = false;
      } else if (op == 7) {
        what = "reap";
        now_ += std::chrono::seconds(pick(45));
        auto r = store_.ReapExpiredLeases(policy_, now_);
        ASSERT_TRUE(r.ok()) << r.status();
      } else {
        what = "tick";
        now_ += std::chrono::seconds(pick(20));
      }
      check_running_has_work(what);
    }
    if (HasFatalFailure()) return;
    // Quiescence: every lease the test holds ends (mostly in success), the rest expire and are
    // reaped, and the queue is drained until nothing is claimable or leased.
    auto drive = [&] {
      for (int round = 0; round < 100; ++round) {
        while (!leased.empty() && !HasFatalFailure()) finish(leased.size() - 1, pick(5) != 0, true, false);
        now_ += 1h;  // past every backoff and lease
        auto reaped = store_.ReapExpiredLeases(policy_, now_);
        ASSERT_TRUE(reaped.ok()) << reaped.status();
        while (claim()) {}
        if (leased.empty() && reaped->empty()) return;
      }
      FAIL() << "no quiescence after 100 rounds";
    };
    drive();
    if (HasFatalFailure()) return;
    auto check_terminal = [&](bool after_retry) {
      for (const auto& id : pipelines) {
        auto p = store_.GetPipeline(id);
        ASSERT_TRUE(p.ok()) << p.status();
        int succeeded = 0, failed = 0, running = 0;
        std::string jobs;
        for (const auto& j : p->jobs) {
          succeeded += j.state == "SUCCEEDED";
          failed += j.state == "FAILED";
          running += j.state == "LEASED";
          jobs += Cat(" ", j.name, "=", j.state, "/", j.attempt, "of", j.max_attempts);
        }
        const bool all = succeeded == static_cast<int>(p->jobs.size());
        SCOPED_TRACE(Cat("pipeline ", id, " ", p->state, ":", jobs));
        ASSERT_EQ(running, 0);
        ASSERT_NE(p->state, "RUNNING") << "a RUNNING pipeline at quiescence";
        if (p->state == "SUCCEEDED") {
          ASSERT_TRUE(all);
        }
        if (all && !cancelled[id]) {
          ASSERT_EQ(p->state, "SUCCEEDED");
        }
        if (p->state == "FAILED") {
          ASSERT_GT(failed, 0);
        }
        if (failed > 0 && !cancelled[id]) {
          ASSERT_EQ(p->state, "FAILED");
        }
        if (p->state == "CANCELLED") {
          ASSERT_TRUE(cancelled[id]);
        }
        if (after_retry) {
          ASSERT_EQ(p->state, "SUCCEEDED");
        }
      }
    };
    check_terminal(false);
    if (HasFatalFailure()) return;
    // Whatever did not succeed is retried and then allowed to succeed.
    for (const auto& id : pipelines) {
      auto r = store_.RetryPipeline(id, now_);
      ASSERT_TRUE(r.ok() || absl::IsFailedPrecondition(r.status())) << r.status();
      if (r.ok()) cancelled[id] = false;
    }
    for (int round = 0; round < 20 && !HasFatalFailure(); ++round) {
      while (claim()) {}
      if (leased.empty()) break;
      while (!leased.empty() && !HasFatalFailure()) finish(leased.size() - 1, true, false, false);
    }
    check_terminal(true);
    if (HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace btx::storage
