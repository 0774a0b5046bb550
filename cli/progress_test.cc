#include "progress.h"

#include <gtest/gtest.h>

namespace btx::cli {
namespace {
using namespace std::chrono_literals;

const TimePoint kT0 = TimePoint(std::chrono::seconds(1'700'000'000));

void Stamp(google::protobuf::Timestamp* ts, TimePoint t) {
  ts->set_seconds(std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count());
}

v1::Pipeline Planned() {
  v1::Pipeline p;
  p.set_id("6c1e2a4b-0000-4000-8000-000000000001");
  p.set_name("tiny");
  p.set_state(v1::PIPELINE_STATE_RUNNING);
  Stamp(p.mutable_created_at(), kT0);
  for (const char* name : {"pretrain", "branch/code", "eval"}) {
    auto* j = p.add_jobs();
    j->set_name(name);
    j->set_state(std::string(name) == "pretrain" ? v1::JOB_STATE_READY : v1::JOB_STATE_PENDING);
    j->set_max_attempts(3);
  }
  return p;
}

v1::Event Ev(int64_t id, const std::string& type, const std::string& job, TimePoint t) {
  v1::Event e;
  e.set_id(id);
  e.set_type(type);
  e.set_job_name(job);
  Stamp(e.mutable_time(), t);
  return e;
}

v1::Event Progress(int64_t id, const std::string& job, TimePoint t, int64_t step, int64_t total, double loss, double tps) {
  v1::Event e = Ev(id, "job.progress", job, t);
  e.set_job_state(v1::JOB_STATE_LEASED);
  e.set_attempt(1);
  e.mutable_progress()->set_step(step);
  e.mutable_progress()->set_total_steps(total);
  e.mutable_progress()->set_loss(loss);
  e.mutable_progress()->set_tokens_per_second(tps);
  return e;
}

TEST(ProgressTest, FoldsEventsAndRendersTheLiveBlock) {
  PipelineView v = PipelineView::From(Planned());
  v1::Event leased = Ev(1, "job.leased", "pretrain", kT0 + 1s);
  leased.set_job_state(v1::JOB_STATE_LEASED);
  leased.set_attempt(1);
  EXPECT_TRUE(v.Apply(leased));
  EXPECT_TRUE(v.Apply(Progress(2, "pretrain", kT0 + 6s, 5, 40, 6.0, 1024)));
  EXPECT_TRUE(v.Apply(Progress(3, "pretrain", kT0 + 11s, 10, 40, 5.4321, 2048)));
  EXPECT_FALSE(v.Apply(Progress(3, "pretrain", kT0 + 11s, 10, 40, 5.4321, 2048)));  // repeated id
  EXPECT_FALSE(v.Apply(Progress(4, "pretrain", kT0 + 12s, 10, 40, 5.4321, 2048)));  // repeated progress
  const auto lines = RenderProgress(v, {.width = 200, .now = kT0 + 12s});
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_EQ(lines[0], "tiny (6c1e2a4b)  RUNNING  0/3 jobs done  elapsed 0:12");
  EXPECT_EQ(lines[1], "  JOB          STATE    ATTEMPT  STEP   PROGRESS           LOSS   TOK/S  ETA");
  // 5 steps in 5 s since the first report: 30 steps to go take 30 s.
  EXPECT_EQ(lines[2], "  pretrain     LEASED   1/3      10/40  [##........]  25%  5.432  2.0k   0:30");
  EXPECT_EQ(lines[3], "  branch/code  PENDING  -        -                         -      -      -");
  EXPECT_EQ(lines[4], "  eval         PENDING  -        -                         -      -      -");
}

TEST(ProgressTest, SucceededFailedAndTerminalPipeline) {
  PipelineView v = PipelineView::From(Planned());
  v.Apply(Progress(1, "pretrain", kT0 + 5s, 40, 40, 2.5, 1000));
  v1::Event done = Ev(2, "job.succeeded", "pretrain", kT0 + 6s);
  done.set_job_state(v1::JOB_STATE_SUCCEEDED);
  done.set_message("file:///a/pretrain/model");
  v.Apply(done);
  v1::Event failed = Ev(3, "job.failed", "branch/code", kT0 + 8s);
  failed.set_job_state(v1::JOB_STATE_FAILED);
  failed.set_attempt(3);
  failed.set_message("btx-train exited 1");
  v.Apply(failed);
  v1::Event end = Ev(4, "pipeline.failed", "", kT0 + 9s);
  end.set_pipeline_state(v1::PIPELINE_STATE_FAILED);
  end.set_message("job branch/code failed");
  v.Apply(end);
  const auto lines = RenderProgress(v, {.width = 200, .now = kT0 + 500s});
  EXPECT_EQ(lines[0], "tiny (6c1e2a4b)  FAILED  1/3 jobs done  elapsed 0:09");  // the clock stops at the end
  EXPECT_NE(lines[2].find("SUCCEEDED  1/3      40/40  [##########] 100%  2.500  -"), std::string::npos) << lines[2];
  EXPECT_NE(lines[3].find("FAILED     3/3"), std::string::npos) << lines[3];
  EXPECT_NE(lines[3].find("btx-train exited 1"), std::string::npos) << lines[3];
  EXPECT_EQ(v.error, "job branch/code failed");
}

TEST(ProgressTest, StepLessProgressIsNoChange) {
  PipelineView v = PipelineView::From(Planned());
  EXPECT_FALSE(v.Apply(Progress(1, "eval", kT0 + 12s, 0, 0, 0, 0)));  // merge and eval have no steps
}

TEST(ProgressTest, LinesAreCutToTheTerminalWidth) {
  PipelineView v = PipelineView::From(Planned());
  for (const auto& l : RenderProgress(v, {.width = 30, .now = kT0})) EXPECT_LE(l.size(), 29u) << l;
}

TEST(ProgressTest, EtaPrefersTheWorkersEstimateAndCountsFromTheFirstReport) {
  JobView j;
  j.state = v1::JOB_STATE_LEASED;
  j.progress.set_step(60);
  j.progress.set_total_steps(100);
  j.rate_since = kT0;
  j.rate_since_step = 50;  // first report after resuming from a checkpoint at 50
  j.progress_at = kT0 + 20s;
  EXPECT_DOUBLE_EQ(EtaSeconds(j), 80.0);  // 10 steps / 20 s -> 40 steps in 80 s
  j.progress.set_eta_seconds(12);
  EXPECT_DOUBLE_EQ(EtaSeconds(j), 12.0);
  j.state = v1::JOB_STATE_SUCCEEDED;
  EXPECT_LT(EtaSeconds(j), 0);
}

TEST(ProgressTest, PlainLogLines) {
  PipelineView v = PipelineView::From(Planned());
  v1::Event sub = Ev(1, "pipeline.submitted", "", kT0);
  v.Apply(sub);
  EXPECT_EQ(*EventLine(sub, v), "[0:00] pipeline tiny (6c1e2a4b-0000-4000-8000-000000000001) submitted, 3 jobs");
  v1::Event leased = Ev(2, "job.leased", "pretrain", kT0 + 1s);
  leased.set_attempt(1);
  leased.set_job_state(v1::JOB_STATE_LEASED);
  v.Apply(leased);
  EXPECT_EQ(*EventLine(leased, v), "[0:01] pretrain LEASED attempt 1");
  v1::Event first = Progress(3, "pretrain", kT0 + 11s, 10, 40, 3.5, 512);
  v.Apply(first);
  EXPECT_EQ(*EventLine(first, v), "[0:11] pretrain step 10/40 loss 3.500 tok/s 512");  // no rate yet
  v1::Event p = Progress(6, "pretrain", kT0 + 21s, 20, 40, 3.0, 512);
  v.Apply(p);
  EXPECT_EQ(*EventLine(p, v), "[0:21] pretrain step 20/40 loss 3.000 tok/s 512 ETA 0:20");
  v1::Event retry = Ev(7, "job.retry_wait", "pretrain", kT0 + 65s);
  retry.set_attempt(1);
  retry.set_message("exit 1");
  EXPECT_EQ(*EventLine(retry, v), "[1:05] pretrain RETRY_WAIT after attempt 1: exit 1");
  v1::Event ok = Ev(8, "pipeline.succeeded", "", kT0 + 3723s);
  EXPECT_EQ(*EventLine(ok, v), "[1:02:03] pipeline tiny SUCCEEDED");
}

}  // namespace
}  // namespace btx::cli
