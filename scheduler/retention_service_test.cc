// Bounded logs and events through the API: what a worker's heartbeats store, as Get, Watch and Logs
// show it, and the retention pass the reaper runs (the storage rules themselves:
// storage/retention_test.cc). Time is the fixture's manual clock.
#include <gtest/gtest.h>

#include <set>

#include "test_util.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
using testing::SchedulerFixture;

class RetentionServiceTest : public SchedulerFixture {
 protected:
  RetentionServiceTest() : SchedulerFixture(Config(), false) {}
  static SchedulerConfig Config() {
    SchedulerConfig c = TestConfig();
    c.progress_event_interval = 20s;  // not the default (two heartbeat intervals: 10 s)
    c.retention.max_log_lines_per_pipeline = 50;
    return c;
  }
  void Beat(const v1::HeartbeatRequest& req) {
    grpc::ClientContext ctx;
    v1::HeartbeatResponse resp;
    const grpc::Status st = workers_->Heartbeat(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(resp.jobs_size(), 1);
    ASSERT_EQ(resp.jobs(0).directive(), v1::JOB_DIRECTIVE_CONTINUE);
  }
  std::vector<v1::Event> Watch(const std::string& pipeline_id) {
    grpc::ClientContext ctx;
    v1::WatchRequest req;
    req.set_pipeline_id(pipeline_id);
    auto reader = pipelines_->Watch(&ctx, req);
    std::vector<v1::Event> out;
    for (v1::Event e; reader->Read(&e);) out.push_back(e);
    const grpc::Status st = reader->Finish();
    EXPECT_TRUE(st.ok()) << st.error_message();
    return out;
  }
  std::vector<std::string> Logs(const std::string& job_id) {
    grpc::ClientContext ctx;
    v1::LogsRequest req;
    req.set_job_id(job_id);
    auto reader = pipelines_->Logs(&ctx, req);
    std::vector<std::string> out;
    for (v1::LogLine l; reader->Read(&l);) out.push_back(l.text());
    const grpc::Status st = reader->Finish();
    EXPECT_TRUE(st.ok()) << st.error_message();
    return out;
  }
};

// 60 heartbeats a second apart, each with progress and two lines, one in five sent twice (the
// worker re-sends what it could not deliver, with the same seqs).
TEST_F(RetentionServiceTest, HeartbeatsAreCoalescedDeduplicatedAndCappedAndProgressStaysVisible) {
  const std::string pipeline_id = Submit(testing::kDagSpec).pipeline().id();
  const std::string worker = RegisterWorker("w");
  const v1::JobAssignment job = Acquire(worker).job();
  ASSERT_FALSE(job.job_id().empty());
  int64_t seq = 0;
  for (int i = 1; i <= 60; ++i) {
    v1::HeartbeatRequest req;
    req.set_worker_id(worker);
    v1::JobReport* rep = req.add_jobs();
    rep->set_job_id(job.job_id());
    rep->set_attempt(job.attempt());
    rep->mutable_progress()->set_step(i);
    rep->mutable_progress()->set_total_steps(60);
    for (int k = 0; k < 2; ++k) {
      v1::LogLine* l = rep->add_logs();
      l->set_seq(++seq);
      l->set_attempt(job.attempt());
      l->set_stream("stdout");
      l->set_text("line " + std::to_string(seq));
    }
    ASSERT_NO_FATAL_FAILURE(Beat(req));
    if (i % 5 == 0) {
      ASSERT_NO_FATAL_FAILURE(Beat(req));
    }
    clock_.Advance(1s);
  }
  // Get has the latest progress; Watch a progress event per 20 s.
  grpc::ClientContext ctx;
  v1::GetPipelineRequest get;
  get.set_id(pipeline_id);
  v1::Pipeline p;
  ASSERT_TRUE(pipelines_->Get(&ctx, get, &p).ok());
  int64_t latest = -1;
  for (const auto& j : p.jobs()) {
    if (j.id() == job.job_id()) latest = j.progress().step();
  }
  EXPECT_EQ(latest, 60);
  std::vector<int64_t> steps;
  for (const auto& e : Watch(pipeline_id)) {
    if (e.type() == "job.progress") steps.push_back(e.progress().step());
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 21, 41}));
  // Every line once, in order.
  std::vector<std::string> lines = Logs(job.job_id());
  ASSERT_EQ(lines.size(), 120u);
  EXPECT_EQ(std::set<std::string>(lines.begin(), lines.end()).size(), 120u);
  EXPECT_EQ(lines.front(), "line 1");
  EXPECT_EQ(lines.back(), "line 120");
  // The reaper's pass keeps the newest 50.
  auto r = scheduler_.ApplyRetention();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->log_lines_deleted, 70);
  lines = Logs(job.job_id());
  ASSERT_EQ(lines.size(), 50u);
  EXPECT_EQ(lines.front(), "line 71");
  EXPECT_EQ(lines.back(), "line 120");
}

}  // namespace
}  // namespace btx::scheduler
