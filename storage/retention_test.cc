// Logs and events stay bounded: coalesced progress events, deduplicated log lines, and the
// retention policy, against a real PostgreSQL with time passed explicitly (never slept).
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <pqxx/pqxx>

#include "btx/storage/store.h"
#include "pg_fixture.h"

namespace btx::storage {
namespace {
using namespace std::chrono_literals;
using json = nlohmann::json;

class RetentionTest : public ::testing::Test {
 protected:
  RetentionTest() : conninfo_(btx::testing::NewMigratedDatabase()), pool_(conninfo_, 4), store_(pool_) {}

  std::string Worker(const std::string& name) {
    auto id = store_.RegisterWorker(name, "host", R"({"gpus":0})", "test", now_);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  // Two independent jobs, so both run at once and their lines interleave.
  PipelineRecord Submit(const std::string& name) {
    NewPipeline p{.name = name, .spec_json = "{}"};
    p.jobs = {{.name = "a", .kind = "branch"}, {.name = "b", .kind = "branch"}};
    auto r = store_.CreatePipeline(p, now_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r->first;
  }
  ClaimedJob Claim(const std::string& worker) {
    auto c = store_.ClaimJob(worker, 0, 1h, now_);
    EXPECT_TRUE(c.ok() && c->has_value()) << c.status();
    return **c;
  }
  JobReportRow Report(const ClaimedJob& c, int64_t step, std::vector<LogRecord> logs = {}) {
    return JobReportRow{.job_id = c.job.id, .attempt = c.job.attempt,
                        .progress_json = json{{"step", step}, {"total_steps", 100000}}.dump(), .step = step,
                        .logs = std::move(logs)};
  }
  LogRecord Line(int64_t seq, const std::string& text) { return LogRecord{.stream = "stdout", .line = text, .created_at = now_, .seq = seq}; }
  void Beat(const std::string& worker, const std::vector<JobReportRow>& reports) {
    auto hb = store_.Heartbeat(worker, reports, false, 1h, now_);
    ASSERT_TRUE(hb.ok()) << hb.status();
    for (const auto& d : *hb) ASSERT_EQ(d.directive, Directive::kContinue);
  }
  int64_t Count(const std::string& sql) {
    pqxx::connection c(conninfo_);
    pqxx::nontransaction tx(c);
    return tx.exec(sql)[0][0].as<int64_t>();
  }
  int64_t LogLines(const std::string& pipeline_id) {
    return Count("SELECT count(*) FROM job_logs l JOIN jobs j ON j.id = l.job_id WHERE j.pipeline_id = '" + pipeline_id + "'");
  }
  int64_t JobEvents(const std::string& pipeline_id) {
    return Count("SELECT count(*) FROM events WHERE job_id IS NOT NULL AND pipeline_id = '" + pipeline_id + "'");
  }
  int64_t PipelineEvents(const std::string& pipeline_id) {
    return Count("SELECT count(*) FROM events WHERE job_id IS NULL AND pipeline_id = '" + pipeline_id + "'");
  }
  std::vector<EventRecord> Events(const std::string& pipeline_id, const std::string& type) {
    std::vector<EventRecord> out;
    for (int64_t after = 0;;) {
      auto page = store_.EventsAfter(pipeline_id, after, 500);
      EXPECT_TRUE(page.ok()) << page.status();
      if (!page.ok() || page->empty()) return out;
      for (auto& e : *page) {
        after = e.id;
        if (e.type == type) out.push_back(std::move(e));
      }
    }
  }
  // Applies the policy until a pass leaves nothing over; returns the passes it took.
  int RetainUntilDone(const RetentionPolicy& policy) {
    for (int passes = 1; passes <= 100; ++passes) {
      auto r = store_.ApplyRetention(policy, now_);
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return passes;
      EXPECT_FALSE(r->skipped);
      if (!r->more) return passes;
    }
    ADD_FAILURE() << "retention never finished";
    return 100;
  }

  std::string conninfo_;
  ConnectionPool pool_;
  Store store_;
  TimePoint now_ = FromUnixMicros(1'700'000'000'000'000);
};

// A trainer that reports progress and 3 lines per job with every heartbeat, every second, for 1000
// heartbeats, one in ten sent twice (its reply was lost): events grow by one per job per 10 s, every
// line is stored once, and the caps then hold the pipeline to its newest lines and events.
TEST_F(RetentionTest, ChattyTrainerKeepsEventsAndLogsBounded) {
  const auto p = Submit("chatty");
  const auto w = Worker("w");
  const ClaimedJob a = Claim(w), b = Claim(w);
  const int kBeats = 1000, kLinesPerJob = 3;
  int64_t seq = 0;
  for (int i = 1; i <= kBeats; ++i) {
    std::vector<LogRecord> la, lb;
    for (int k = 0; k < kLinesPerJob; ++k) {
      ++seq;
      la.push_back(Line(seq, "a line " + std::to_string(seq)));
      lb.push_back(Line(seq, "b line " + std::to_string(seq)));
    }
    const std::vector<JobReportRow> reports{Report(a, i, la), Report(b, i, lb)};
    ASSERT_NO_FATAL_FAILURE(Beat(w, reports));
    if (i % 10 == 0) {
      ASSERT_NO_FATAL_FAILURE(Beat(w, reports));  // the re-send
    }
    now_ += 1s;
  }
  // Before: one event per report (2 x 1100) and a row per line sent (2 x 3300). The 2: job.leased.
  EXPECT_EQ(JobEvents(p.id), 2 * kBeats / 10 + 2);
  EXPECT_EQ(LogLines(p.id), 2 * kBeats * kLinesPerJob);
  EXPECT_EQ(Count("SELECT count(*) FROM (SELECT DISTINCT job_id, attempt, seq FROM job_logs) d"), LogLines(p.id));

  // Progress stays visible: the latest on the job (Get), and to a follower every 10 s at most.
  auto job = store_.GetJob(a.job.id);
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(json::parse(job->progress_json)["step"], kBeats);
  auto progress = Events(p.id, "job.progress");
  ASSERT_EQ(progress.size(), 2u * kBeats / 10);
  const json last = json::parse(progress.back().payload_json);
  EXPECT_GE(last["progress"]["step"].get<int>(), kBeats - 10) << last;
  EXPECT_EQ(json::parse(progress.front().payload_json)["progress"]["step"], 1);  // the first at once

  // The caps, in passes of at most 2500 rows: the oldest lines go first, across both jobs.
  const RetentionPolicy policy{.max_log_lines_per_pipeline = 2000, .max_events_per_pipeline = 100,
                               .batch_rows = 1000, .max_rows_per_pass = 2500};
  EXPECT_EQ(RetainUntilDone(policy), 2);  // 4000 lines and 102 events over
  EXPECT_EQ(LogLines(p.id), 2000);
  // Each job keeps its newest lines, and the two about as many: the oldest went first, whichever job.
  std::map<std::string, int64_t> kept;
  for (const auto& id : {a.job.id, b.job.id}) {
    const std::string of = " FROM job_logs WHERE job_id = '" + id + "'";
    kept[id] = Count("SELECT count(*)" + of);
    EXPECT_EQ(Count("SELECT max(seq)" + of), kBeats * kLinesPerJob);
    EXPECT_EQ(Count("SELECT max(seq) - min(seq) + 1" + of), kept[id]);
  }
  EXPECT_LE(std::abs(kept[a.job.id] - kept[b.job.id]), kLinesPerJob);
  EXPECT_EQ(JobEvents(p.id), 100);
  EXPECT_EQ(json::parse(Events(p.id, "job.progress").back().payload_json), last);  // the newest stay
  EXPECT_EQ(PipelineEvents(p.id), 1);  // pipeline.submitted is never capped
  auto logs = store_.LogsAfter(a.job.id, 0, 10);
  ASSERT_TRUE(logs.ok() && !logs->empty()) << logs.status();
  EXPECT_EQ((*logs)[0].line, "a line " + std::to_string(kBeats * kLinesPerJob - kept[a.job.id] + 1));
  // Within the caps, a pass deletes nothing.
  auto again = store_.ApplyRetention(policy, now_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->log_lines_deleted + again->events_deleted, 0);
}

TEST_F(RetentionTest, DuplicatesOfAResentHeartbeatAreNotStored) {
  Submit("dup");
  const auto w = Worker("w");
  const ClaimedJob a = Claim(w);
  Claim(w);  // the other job, so that the retry below is this one's
  JobReportRow rep{.job_id = a.job.id, .attempt = 1, .logs = {Line(1, "one"), Line(2, "two"), Line(0, "[3 dropped]")}};
  ASSERT_NO_FATAL_FAILURE(Beat(w, {rep}));
  ASSERT_NO_FATAL_FAILURE(Beat(w, {rep}));  // the same report again: only the drop notice (seq 0) repeats
  rep.logs = {Line(2, "two"), Line(3, "three"), Line(3, "three")};  // overlapping, and a repeat within one report
  ASSERT_NO_FATAL_FAILURE(Beat(w, {rep}));
  auto logs = store_.LogsAfter(a.job.id, 0, 100);
  ASSERT_TRUE(logs.ok()) << logs.status();
  std::vector<std::string> lines;
  for (const auto& l : *logs) lines.push_back(l.line);
  EXPECT_EQ(lines, (std::vector<std::string>{"one", "two", "[3 dropped]", "[3 dropped]", "three"}));
  // Quotes, braces, commas and backslashes survive the array the lines travel in; a NUL, which
  // PostgreSQL text cannot hold, becomes a blank instead of failing the heartbeat.
  const std::string odd = std::string("{\"a\\b\", c}") + '\0' + "d";
  ASSERT_NO_FATAL_FAILURE(Beat(w, {{.job_id = a.job.id, .attempt = 1, .logs = {Line(4, odd)}}}));
  logs = store_.LogsAfter(a.job.id, 0, 100);
  ASSERT_TRUE(logs.ok()) << logs.status();
  EXPECT_EQ(logs->back().line, "{\"a\\b\", c} d");
  // The next attempt numbers its lines from 1 again: they are new lines.
  ASSERT_TRUE(store_.FailJob(w, a.job.id, 1, "crash", true, false, "", RetryPolicy{.base = 1s}, now_).ok());
  now_ += 1min;
  const ClaimedJob retry = Claim(w);
  ASSERT_EQ(retry.job.id, a.job.id);
  ASSERT_NO_FATAL_FAILURE(Beat(w, {{.job_id = a.job.id, .attempt = 2, .logs = {Line(1, "one again")}}}));
  logs = store_.LogsAfter(a.job.id, 0, 100);
  ASSERT_TRUE(logs.ok()) << logs.status();
  ASSERT_EQ(logs->size(), 7u);
  EXPECT_EQ(logs->back().line, "one again");
  EXPECT_EQ(logs->back().attempt, 2);
}

// The age rule empties finished pipelines, and only them: a running pipeline keeps its rows however
// old (only its cap applies), a finished one with a job still running waits for it, and a
// finished pipeline's pipeline.* events stay so that a Watch of it still ends.
TEST_F(RetentionTest, AgeDeletesRowsOfFinishedPipelinesOnly) {
  const auto done = Submit("done"), running = Submit("running"), stopping = Submit("stopping");
  const auto w = Worker("w");
  std::map<std::string, std::vector<ClaimedJob>> jobs;
  for (int i = 0; i < 6; ++i) {
    ClaimedJob c = Claim(w);
    jobs[c.job.pipeline_id].push_back(c);
  }
  int64_t seq = 0;
  for (int i = 0; i < 20; ++i) {
    std::vector<JobReportRow> reports;
    for (const auto& [pid, cs] : jobs) {
      for (const auto& c : cs) reports.push_back(Report(c, i, {Line(++seq, "x"), Line(++seq, "y")}));
    }
    ASSERT_NO_FATAL_FAILURE(Beat(w, reports));
    now_ += 10s;
  }
  for (const auto& c : jobs[done.id]) ASSERT_TRUE(store_.CompleteJob(w, c.job.id, 1, "", "", now_).ok());
  ASSERT_EQ(store_.GetPipeline(done.id)->state, "SUCCEEDED");
  ASSERT_EQ(store_.CancelPipeline(stopping.id, "", now_)->state, "CANCELLED");  // its jobs still run
  const int64_t lines = LogLines(running.id), events = JobEvents(running.id);
  ASSERT_EQ(lines, 80);
  ASSERT_EQ(LogLines(done.id), lines);
  ASSERT_GT(JobEvents(done.id), 0);

  const RetentionPolicy policy{.finished_age = 30 * 24h, .batch_rows = 7};
  now_ += 29 * 24h;  // not old enough
  RetainUntilDone(policy);
  EXPECT_EQ(LogLines(done.id), lines);
  now_ += 2 * 24h;
  RetainUntilDone(policy);
  EXPECT_EQ(LogLines(done.id), 0);
  EXPECT_EQ(JobEvents(done.id), 0);
  EXPECT_EQ(PipelineEvents(done.id), 2);  // submitted, succeeded
  const auto watched = Events(done.id, "pipeline.succeeded");
  EXPECT_EQ(watched.size(), 1u);
  EXPECT_EQ(LogLines(running.id), lines);
  EXPECT_EQ(JobEvents(running.id), events);
  EXPECT_EQ(LogLines(stopping.id), lines);  // cancelled, but a job still runs
  // Once its jobs stop, the cancelled pipeline is old enough (it finished 31 days ago).
  for (const auto& c : jobs[stopping.id]) {
    ASSERT_TRUE(store_.FailJob(w, c.job.id, 1, "cancelled", false, true, "", RetryPolicy{}, now_).ok());
  }
  RetainUntilDone(policy);
  EXPECT_EQ(LogLines(stopping.id), 0);
  EXPECT_EQ(PipelineEvents(stopping.id), 2);  // submitted, cancelled
  EXPECT_EQ(LogLines(running.id), lines);
  // The cap still applies to the running one.
  RetainUntilDone({.finished_age = 30 * 24h, .max_log_lines_per_pipeline = 50});
  EXPECT_EQ(LogLines(running.id), 50);
}

// Two replicas' reapers never apply retention at once (each would delete the same excess).
TEST_F(RetentionTest, OneReplicaAtATime) {
  pqxx::connection other(conninfo_);
  pqxx::nontransaction tx(other);
  ASSERT_TRUE(tx.exec("SELECT pg_try_advisory_lock(" + std::to_string(0x6274785f726574) + ")")[0][0].as<bool>());
  auto r = store_.ApplyRetention({}, now_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->skipped);
  tx.exec("SELECT pg_advisory_unlock_all()");
  r = store_.ApplyRetention({}, now_);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->skipped);
}

}  // namespace
}  // namespace btx::storage
