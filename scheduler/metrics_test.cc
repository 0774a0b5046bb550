// Scheduler metrics end to end: RPCs over loopback against a real PostgreSQL with a manual clock,
// then a real HTTP scrape of /metrics, checked value by value and by `promtool check metrics`.
#include <httplib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "btx/common/process.h"
#include "btx/metrics/exposer.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/server.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "metrics.h"
#include "test_util.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
using testing::ParseExposition;
namespace v1 = btx::v1;

std::string FindPromtool() {
  if (const char* env = std::getenv("PROMTOOL"); env && *env) return env;
  return FindOnPath("promtool");
}

class MetricsTest : public testing::SchedulerFixture {
 protected:
  MetricsTest() : SchedulerFixture(/*with_metrics=*/true), exposer_(registry_, "127.0.0.1", 0) {}

  std::string Scrape() {
    httplib::Client http("127.0.0.1", exposer_.port());
    auto res = http.Get("/metrics");
    EXPECT_TRUE(res) << "scrape failed";
    if (!res) return "";
    EXPECT_EQ(res->status, 200);
    return res->body;
  }
  v1::JobAssignment AcquireOne(const std::string& w) {
    auto resp = Acquire(w);
    EXPECT_TRUE(resp.has_job());
    return resp.job();
  }
  void Heartbeat(const std::string& w, const v1::JobAssignment& j, int64_t step, int64_t total, double loss, double tps,
                 double eta) {
    grpc::ClientContext ctx;
    v1::HeartbeatRequest req;
    req.set_worker_id(w);
    auto* r = req.add_jobs();
    r->set_job_id(j.job_id());
    r->set_attempt(j.attempt());
    auto* p = r->mutable_progress();
    p->set_step(step);
    p->set_total_steps(total);
    p->set_loss(loss);
    p->set_tokens_per_second(tps);
    p->set_eta_seconds(eta);
    v1::HeartbeatResponse resp;
    ASSERT_TRUE(workers_->Heartbeat(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.jobs(0).directive(), v1::JOB_DIRECTIVE_CONTINUE);
  }
  // A one-job pipeline claimed before anything else (priority -5).
  void CreateSingle(const std::string& name, const std::string& kind, const std::string& spec, int max_attempts) {
    storage::NewPipeline p{.name = name, .spec_json = "{}"};
    p.jobs.push_back({.name = kind, .kind = kind, .spec_json = spec, .max_attempts = max_attempts, .priority = -5});
    ASSERT_TRUE(store_.CreatePipeline(p, clock_.Now()).ok());
  }
  static std::string JobSeries(const std::string& metric, const v1::JobAssignment& j) {
    return Cat(metric, "{pipeline=\"", j.pipeline_id(), "\",job=\"", j.job_id(), "\",kind=\"", "branch", "\",name=\"",
               j.name(), "\"}");
  }

  metrics::Exposer exposer_;
};

TEST_F(MetricsTest, ScrapeReflectsRpcsAndDatabaseState) {
  const double t0 = std::chrono::duration<double>(clock_.Now().time_since_epoch()).count();
  Submit(testing::kDagSpec);
  const std::string w1 = RegisterWorker("w1"), w2 = RegisterWorker("w2");

  // Branch A: claimed 3 s after it became READY; its heartbeat feeds the per-job gauges.
  clock_.Advance(3s);
  const auto a = AcquireOne(w1);
  Heartbeat(w1, a, 30, 300, 2.5, 1000, 120);
  auto m = ParseExposition(Scrape());
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_progress_ratio", a)], 0.1);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_loss", a)], 2.5);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_tokens_per_second", a)], 1000);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_eta_seconds", a)], 120);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_last_heartbeat_timestamp_seconds", a)], t0 + 3);
  EXPECT_DOUBLE_EQ(m["btx_dispatch_latency_seconds_sum"], 3);

  // Branch B fails once (retry after the 5 s backoff), then its second lease expires.
  const auto b1 = AcquireOne(w2);
  ASSERT_TRUE(Fail(w2, b1, /*retryable=*/true).ok());
  ASSERT_TRUE(Complete(w1, a).ok());
  m = ParseExposition(Scrape());
  EXPECT_EQ(m.count(JobSeries("btx_job_progress_ratio", a)), 0u) << "series of a finished job must go";
  EXPECT_EQ(m.count(JobSeries("btx_job_last_heartbeat_timestamp_seconds", b1)), 0u);
  clock_.Advance(6s);
  const auto b2 = AcquireOne(w2);
  EXPECT_EQ(b2.job_id(), b1.job_id());
  EXPECT_EQ(b2.attempt(), 2);
  clock_.Advance(11s);
  ASSERT_TRUE(scheduler_.ReapOnce().ok());  // also marks w1 and w2 LOST: neither was seen for 10 s
  const auto b3 = AcquireOne(w1);
  EXPECT_EQ(b3.attempt(), 3);
  Heartbeat(w1, b3, 10, 100, 3.0, 50, 30);  // w1 is ACTIVE again
  const double b3_heartbeat = t0 + 20;

  // An evaluation with routing data, and a pipeline that fails outright.
  CreateSingle("eval-only", "eval", R"({"models": [{"name": "btx", "model": "/m"}, {"name": "seed", "model": "/s"}]})", 3);
  const auto e = AcquireOne(w1);
  EXPECT_EQ(e.kind(), v1::JOB_KIND_EVAL);
  ASSERT_TRUE(Complete(w1, e, R"({"models": {"btx": {"domains": {
      "code": {"loss": 1.0, "tokens": 100, "routing": [[0.5, 0.5], [0.25, 0.75]]},
      "math": {"loss": 1.2, "tokens": 300, "routing": [[0.1, 0.9], [0.25, 0.75]]}}},
    "seed": {"domains": {"code": {"loss": 2.0, "tokens": 100}}}}})").ok());
  CreateSingle("doomed", "merge", "{}", 1);
  const auto d = AcquireOne(w1);
  EXPECT_EQ(d.kind(), v1::JOB_KIND_MERGE);
  ASSERT_TRUE(Fail(w1, d, /*retryable=*/false).ok());
  {
    grpc::ClientContext ctx;
    v1::GetPipelineRequest req;
    req.set_id("not-a-uuid");
    v1::Pipeline resp;
    EXPECT_EQ(pipelines_->Get(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }

  ASSERT_TRUE(scheduler_.RefreshMetrics().ok());
  const std::string text = Scrape();
  m = ParseExposition(text);
  EXPECT_EQ(m["btx_pipelines{state=\"RUNNING\"}"], 1);
  EXPECT_EQ(m["btx_pipelines{state=\"SUCCEEDED\"}"], 1);
  EXPECT_EQ(m["btx_pipelines{state=\"FAILED\"}"], 1);
  EXPECT_EQ(m["btx_pipelines{state=\"CANCELLED\"}"], 0);
  EXPECT_EQ(m["btx_jobs{state=\"SUCCEEDED\",kind=\"branch\"}"], 1);
  EXPECT_EQ(m["btx_jobs{state=\"LEASED\",kind=\"branch\"}"], 1);
  EXPECT_EQ(m["btx_jobs{state=\"READY\",kind=\"branch\"}"], 0);
  EXPECT_EQ(m["btx_jobs{state=\"PENDING\",kind=\"merge\"}"], 1);
  EXPECT_EQ(m["btx_jobs{state=\"PENDING\",kind=\"finetune\"}"], 1);
  EXPECT_EQ(m["btx_jobs{state=\"PENDING\",kind=\"eval\"}"], 1);
  EXPECT_EQ(m["btx_jobs{state=\"SUCCEEDED\",kind=\"eval\"}"], 1);
  EXPECT_EQ(m["btx_jobs{state=\"FAILED\",kind=\"merge\"}"], 1);
  EXPECT_EQ(m["btx_workers_connected"], 1);  // w2 is LOST
  EXPECT_EQ(m["btx_job_retries_total{kind=\"branch\"}"], 1);
  EXPECT_EQ(m["btx_job_retries_total{kind=\"merge\"}"], 0);
  EXPECT_EQ(m["btx_lease_expirations_total"], 1);
  EXPECT_EQ(m["btx_pipeline_failures_total"], 1);
  // Claims: a, b1, b2, b3, e, d. Waits: 3 s (a), 3 s (b1), 1 s (b2: READY again 5 s after t0+3),
  // 0 (b3: requeued at t0+20), 0 (e), 0 (d).
  EXPECT_EQ(m["btx_dispatch_latency_seconds_count"], 6);
  EXPECT_DOUBLE_EQ(m["btx_dispatch_latency_seconds_sum"], 7);
  EXPECT_EQ(m["btx_dispatch_latency_seconds_bucket{le=\"+Inf\"}"], 6);
  EXPECT_EQ(m["btx_claim_latency_seconds_count"], 6);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"WorkerService/AcquireJob\",code=\"OK\"}"], 6);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"WorkerService/Complete\",code=\"OK\"}"], 2);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"WorkerService/Fail\",code=\"OK\"}"], 2);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"WorkerService/Heartbeat\",code=\"OK\"}"], 2);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"WorkerService/Register\",code=\"OK\"}"], 2);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"PipelineService/Submit\",code=\"OK\"}"], 1);
  EXPECT_EQ(m["btx_grpc_requests_total{method=\"PipelineService/Get\",code=\"INVALID_ARGUMENT\"}"], 1);
  EXPECT_EQ(m["btx_grpc_request_duration_seconds_count{method=\"WorkerService/AcquireJob\"}"], 6);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_progress_ratio", b3)], 0.1);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_loss", b3)], 3.0);
  EXPECT_DOUBLE_EQ(m[JobSeries("btx_job_last_heartbeat_timestamp_seconds", b3)], b3_heartbeat);
  EXPECT_EQ(m.count(JobSeries("btx_job_loss", a)), 0u);
  EXPECT_EQ(m["btx_build_info{version=\"" BTX_VERSION "\"}"], 1);
  const std::string share = Cat("btx_router_expert_share{pipeline=\"", e.pipeline_id(), "\",layer=\"");
  EXPECT_DOUBLE_EQ(m[share + "0\",expert=\"0\"}"], 0.2);  // (100 * 0.5 + 300 * 0.1) / 400
  EXPECT_DOUBLE_EQ(m[share + "0\",expert=\"1\"}"], 0.8);
  EXPECT_DOUBLE_EQ(m[share + "1\",expert=\"1\"}"], 0.75);
  size_t per_job = 0;
  for (const auto& [k, v] : m) per_job += k.rfind("btx_job_last_heartbeat_timestamp_seconds{", 0) == 0;
  EXPECT_EQ(per_job, 1u) << "only the one LEASED job has per-job series";

  // Another replica that served none of these RPCs reports the same fleet-wide and per-job
  // gauges: they come from the database.
  metrics::Registry other_registry;
  Scheduler other(TestConfig(), store_, clock_, conninfo_, &other_registry);
  ASSERT_TRUE(other.RefreshMetrics().ok());
  auto o = ParseExposition(other_registry.Serialize());
  for (const auto& [k, v] : m) {
    const bool fleet = k.rfind("btx_jobs{", 0) == 0 || k.rfind("btx_pipelines{", 0) == 0 || k == "btx_workers_connected" ||
                       k.rfind("btx_job_", 0) == 0 || k.rfind("btx_router_expert_share{", 0) == 0;
    if (!fleet || k.rfind("btx_job_retries_total", 0) == 0) continue;
    ASSERT_TRUE(o.count(k)) << k;
    EXPECT_DOUBLE_EQ(o[k], v) << k;
  }
  EXPECT_EQ(o["btx_grpc_requests_total{method=\"WorkerService/AcquireJob\",code=\"OK\"}"], 0);

  const std::string promtool = FindPromtool();
  if (promtool.empty()) GTEST_SKIP() << "promtool is not installed; skipping the lint step";
  const auto dir = std::filesystem::temp_directory_path();
  const auto in = dir / Cat("btx_sched_metrics_", ::getpid());
  std::ofstream(in) << text;
  const auto out = dir / Cat("btx_sched_metrics_out_", ::getpid());
  const int status = std::system(Cat("'", promtool, "' check metrics < '", in.string(), "' > '", out.string(), "' 2>&1").c_str());
  std::stringstream lint;
  lint << std::ifstream(out).rdbuf();
  std::filesystem::remove(in);
  std::filesystem::remove(out);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << lint.str() << "\n" << text;
}

// Gangs on the scrape: a waiting gang's nodes and the idle workers offered to it, then who runs which node.
TEST_F(MetricsTest, GangsShowWhoWaitsAndWhoRunsWhichNode) {
  const std::string a = RegisterWorker("a"), b = RegisterWorker("b");
  const auto p = Submit(std::string(testing::kDagSpec) + "resources: {nodes_per_job: 2}\n");
  EXPECT_FALSE(Acquire(a).has_job());  // a offers itself; the gang needs two
  ASSERT_TRUE(scheduler_.RefreshMetrics().ok());
  auto m = ParseExposition(Scrape());
  EXPECT_DOUBLE_EQ(m["btx_workers_offering"], 1);
  int waiting = 0;
  for (const auto& [k, v] : m) {
    if (k.rfind("btx_gang_pending_nodes{", 0) != 0) continue;
    ++waiting;
    EXPECT_DOUBLE_EQ(v, 2) << k;
  }
  EXPECT_EQ(waiting, 2);  // both branches

  const auto n0 = Acquire(b);
  ASSERT_TRUE(n0.has_job());
  const auto n1 = Acquire(a);
  ASSERT_TRUE(n1.has_job());
  ASSERT_TRUE(scheduler_.RefreshMetrics().ok());
  m = ParseExposition(Scrape());
  EXPECT_DOUBLE_EQ(m["btx_gangs_formed_total"], 1);
  EXPECT_DOUBLE_EQ(m["btx_workers_offering"], 0);
  const std::string member = Cat("btx_gang_member{pipeline=\"", p.pipeline().id(), "\",job=\"", n0.job().job_id(),
                                 "\",name=\"", n0.job().name(), "\",node=\"");
  EXPECT_DOUBLE_EQ(m[member + "0\",worker=\"b\"}"], 1);
  EXPECT_DOUBLE_EQ(m[member + "1\",worker=\"a\"}"], 1);
  int still_waiting = 0;
  for (const auto& [k, v] : m) still_waiting += k.rfind("btx_gang_pending_nodes{", 0) == 0;
  EXPECT_EQ(still_waiting, 1);  // the other branch; the formed one's series went
}

TEST(SchedulerMetricsLabels, MethodLabelsAreBoundedAndShort) {
  EXPECT_EQ(MethodLabel("/btx.v1.WorkerService/AcquireJob"), "WorkerService/AcquireJob");
  EXPECT_EQ(MethodLabel("/grpc.health.v1.Health/Check"), "Health/Check");
  EXPECT_EQ(MethodLabel("/btx.v1.WorkerService/NoSuchMethod"), "other");
  EXPECT_EQ(MethodLabel(nullptr), "other");
}

}  // namespace
}  // namespace btx::scheduler
