// Every job transition against a real PostgreSQL, with time passed explicitly.
#include "btx/storage/store.h"

#include <nlohmann/json.hpp>
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

TEST_F(StoreTest, MalformedIdsAreNotFound) {
  EXPECT_EQ(store_.GetPipeline("not-a-uuid").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_.GetJob("00000000-0000-0000-0000-000000000000").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace btx::storage
