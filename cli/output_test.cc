#include "output.h"

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

namespace btx::cli {
namespace {
using json = nlohmann::json;
using namespace std::chrono_literals;

const TimePoint kT0 = TimePoint(std::chrono::seconds(1'700'000'000));

void Stamp(google::protobuf::Timestamp* ts, TimePoint t) {
  ts->set_seconds(std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count());
}

v1::Pipeline SamplePipeline() {
  v1::Pipeline p;
  p.set_id("6c1e2a4b-0000-4000-8000-000000000001");
  p.set_name("tiny-btx");
  p.set_state(v1::PIPELINE_STATE_RUNNING);
  p.set_jobs_total(3);
  p.set_jobs_succeeded(1);
  Stamp(p.mutable_created_at(), kT0);
  Stamp(p.mutable_updated_at(), kT0 + 90s);
  p.set_spec(R"({"name":"tiny-btx"})");
  auto* j = p.add_jobs();
  j->set_id("aaaaaaaa-0000-4000-8000-000000000001");
  j->set_pipeline_id(p.id());
  j->set_name("pretrain");
  j->set_kind(v1::JOB_KIND_PRETRAIN);
  j->set_state(v1::JOB_STATE_SUCCEEDED);
  j->set_attempt(1);
  j->set_max_attempts(3);
  j->mutable_progress()->set_step(200);
  j->mutable_progress()->set_total_steps(200);
  j->mutable_progress()->set_loss(2.1344);
  j->set_result_json(R"({"steps":200,"valid_loss":2.25})");
  Stamp(j->mutable_started_at(), kT0 + 1s);
  Stamp(j->mutable_finished_at(), kT0 + 61s);
  j = p.add_jobs();
  j->set_id("bbbbbbbb-0000-4000-8000-000000000002");
  j->set_pipeline_id(p.id());
  j->set_name("branch/code");
  j->set_kind(v1::JOB_KIND_BRANCH);
  j->set_state(v1::JOB_STATE_LEASED);
  j->set_attempt(2);
  j->set_max_attempts(3);
  j->add_depends_on("pretrain");
  j->mutable_progress()->set_step(40);
  j->mutable_progress()->set_total_steps(150);
  j->mutable_progress()->set_loss(3.21);
  j->mutable_progress()->set_tokens_per_second(5120.5);
  j->set_error("lease of attempt 1 expired");
  Stamp(j->mutable_started_at(), kT0 + 62s);
  j = p.add_jobs();
  j->set_id("cccccccc-0000-4000-8000-000000000003");
  j->set_pipeline_id(p.id());
  j->set_name("eval");
  j->set_kind(v1::JOB_KIND_EVAL);
  j->set_state(v1::JOB_STATE_PENDING);
  j->set_max_attempts(3);
  j->add_depends_on("branch/code");
  j->add_depends_on("pretrain");
  return p;
}

const char* kEvalJson = R"({
  "domains": ["code", "math"],
  "models": {
    "btx":  {"domains": {"code": {"loss": 1.5, "ppl": 4.48, "tokens": 100}, "math": {"loss": 2.0, "ppl": 7.39, "tokens": 100}},
             "avg_loss": 1.75, "avg_ppl": 5.75},
    "seed": {"domains": {"code": {"loss": 1.9, "ppl": 6.7, "tokens": 100}, "math": {"loss": 1.95, "ppl": 7.0, "tokens": 100}},
             "avg_loss": 1.925, "avg_ppl": 6.8},
    "expert/code": {"domains": {"code": {"loss": 1.25}}, "avg_loss": 2.5}
  }
})";

TEST(OutputTest, RenderTableAlignsAndTrims) {
  EXPECT_EQ(RenderTable({"A", "LONGER", "C"}, {{"xx", "1", ""}, {"y", "22", "z"}}),
            "A   LONGER  C\n"
            "xx  1\n"
            "y   22      z\n");
  EXPECT_EQ(RenderTable({"N", "V"}, {{"a", "1.5"}, {"b", "10.25"}}, {1}),
            "N      V\n"
            "a    1.5\n"
            "b  10.25\n");
}

TEST(OutputTest, PipelinesTableGolden) {
  EXPECT_EQ(PipelinesTable({SamplePipeline()}, kT0 + 300s),
            "ID                                    NAME      STATE    JOBS  AGE\n"
            "6c1e2a4b-0000-4000-8000-000000000001  tiny-btx  RUNNING  1/3   5m\n");
}

TEST(OutputTest, JobsTableGolden) {
  const auto p = SamplePipeline();
  std::vector<v1::Job> jobs(p.jobs().begin(), p.jobs().end());
  EXPECT_EQ(JobsTable(jobs, false),
            "ID                                    NAME         KIND      STATE      ATTEMPT  STEP     LOSS   TOK/S\n"
            "aaaaaaaa-0000-4000-8000-000000000001  pretrain     pretrain  SUCCEEDED  1/3      200/200  2.134  -\n"
            "bbbbbbbb-0000-4000-8000-000000000002  branch/code  branch    LEASED     2/3      40/150   3.210  5.1k\n"
            "cccccccc-0000-4000-8000-000000000003  eval         eval      PENDING    0/3      -        -      -\n");
  EXPECT_NE(JobsTable(jobs, true).find("PIPELINE  NAME"), std::string::npos);
  EXPECT_NE(JobsTable(jobs, true).find("6c1e2a4b  pretrain"), std::string::npos);
}

TEST(OutputTest, WorkersTableGolden) {
  v1::Worker w;
  w.set_id("dddddddd-0000-4000-8000-000000000004");
  w.set_name("gpu-1");
  w.set_hostname("node7");
  w.set_state(v1::WORKER_STATE_ACTIVE);
  w.mutable_capabilities()->set_gpus(8);
  w.mutable_capabilities()->set_slots(8);
  w.add_running_job_ids("x");
  w.set_version("0.1.0");
  Stamp(w.mutable_last_seen(), kT0);
  EXPECT_EQ(WorkersTable({w}, kT0 + 3s),
            "ID                                    NAME   HOST   STATE   GPUS  SLOTS  RUNNING  LAST SEEN  VERSION\n"
            "dddddddd-0000-4000-8000-000000000004  gpu-1  node7  ACTIVE  8     8      1        3s ago     0.1.0\n");
}

TEST(OutputTest, EvalTableGoldenStarsTheBestAndKeepsTheJobsOrder) {
  EXPECT_EQ(EvalTable(json::parse(kEvalJson), {"btx", "seed", "expert/code"}),
            "MODEL         code    math     AVG\n"
            "btx          1.500   2.000   1.750*\n"
            "seed         1.900   1.950*  1.925\n"
            "expert/code  1.250*      -   2.500\n");
  // Without an order: the models in name order.
  const std::string unordered = EvalTable(json::parse(kEvalJson));
  EXPECT_LT(unordered.find("btx"), unordered.find("expert/code"));
  EXPECT_EQ(EvalTable(json::parse(R"({"valid_loss": 2})")), "");
  EXPECT_EQ(EvalTable(json()), "");
}

TEST(OutputTest, PipelineEvalTableUsesTheEvalJobsModelOrder) {
  auto p = SamplePipeline();
  auto* eval = p.mutable_jobs(2);
  eval->set_result_json(kEvalJson);
  eval->set_spec_json(R"({"models":[{"name":"seed","model":"/m"},{"name":"btx","model":"/b"}]})");
  const std::string t = PipelineEvalTable(p);
  EXPECT_EQ(t.rfind("Evaluation: validation loss in nats/token", 0), 0u) << t;
  EXPECT_LT(t.find("seed "), t.find("btx "));
}

TEST(OutputTest, ToJsonUsesProtoNamesAndInlinesEmbeddedJson) {
  json j = ToJson(SamplePipeline());
  EXPECT_EQ(j["name"], "tiny-btx");
  EXPECT_EQ(j["state"], "PIPELINE_STATE_RUNNING");
  EXPECT_EQ(j["spec"]["name"], "tiny-btx");
  EXPECT_EQ(j["jobs"][0]["result_json"]["valid_loss"], 2.25);
  EXPECT_TRUE(j["jobs"][1]["result_json"].is_null());
  EXPECT_EQ(j["jobs"][1]["depends_on"], json({"pretrain"}));
  EXPECT_EQ(j["jobs_total"], 3);
  EXPECT_EQ(j["created_at"], "2023-11-14T22:13:20Z");
}

TEST(OutputTest, YamlQuotesWhatWouldChangeType) {
  json v = {{"id", "123"}, {"flag", "true"}, {"empty", ""}, {"n", 5}, {"x", 1.5}, {"list", {"a", "null"}}, {"ok", true}};
  const std::string y = EmitYaml(v);
  YAML::Node back = YAML::Load(y);
  EXPECT_EQ(back["id"].Tag(), "!") << y;  // quoted
  EXPECT_EQ(back["id"].as<std::string>(), "123");
  EXPECT_EQ(back["flag"].as<std::string>(), "true");
  EXPECT_EQ(back["flag"].Tag(), "!");
  EXPECT_EQ(back["n"].as<int>(), 5);
  EXPECT_EQ(back["list"][1].Tag(), "!");
  EXPECT_EQ(back["ok"].as<bool>(), true);
  EXPECT_EQ(EmitJson(json{{"a", 1}}), "{\n  \"a\": 1\n}\n");
  EXPECT_EQ(EmitYaml(json{{"deps", json::array()}, {"m", json::object()}, {"s", "x"}}), "deps: []\nm: {}\ns: x\n");
}

TEST(OutputTest, Formatters) {
  EXPECT_EQ(FormatAge(45s), "45s");
  EXPECT_EQ(FormatAge(std::chrono::minutes(12)), "12m");
  EXPECT_EQ(FormatAge(std::chrono::hours(3)), "3h");
  EXPECT_EQ(FormatAge(std::chrono::hours(72)), "3d");
  EXPECT_EQ(FormatClock(42), "0:42");
  EXPECT_EQ(FormatClock(3723), "1:02:03");
  EXPECT_EQ(FormatClock(-1), "-");
  EXPECT_EQ(FormatRate(12), "12");
  EXPECT_EQ(FormatRate(5120.5), "5.1k");
  EXPECT_EQ(FormatRate(3.2e6), "3.2M");
  EXPECT_EQ(FormatRate(0), "-");
  EXPECT_EQ(*ParseFormat("json"), Format::kJson);
  EXPECT_FALSE(ParseFormat("xml").ok());
}

TEST(OutputTest, DescribeShowsJobsMetricsErrorsAndEvents) {
  auto p = SamplePipeline();
  std::vector<v1::Event> events;
  for (const char* type : {"pipeline.submitted", "job.leased", "job.progress", "job.succeeded"}) {
    v1::Event e;
    e.set_id(static_cast<int64_t>(events.size()) + 1);
    e.set_type(type);
    e.set_job_name(std::string(type).rfind("job.", 0) == 0 ? "pretrain" : "");
    e.set_attempt(std::string(type).rfind("job.", 0) == 0 ? 1 : 0);
    Stamp(e.mutable_time(), kT0 + std::chrono::seconds(events.size()));
    events.push_back(e);
  }
  const std::string d = DescribePipeline(p, events, kT0 + 120s, 2);
  EXPECT_EQ(d.rfind("Name:       tiny-btx\nID:         6c1e2a4b-0000-4000-8000-000000000001\nState:      RUNNING\n", 0), 0u) << d;
  EXPECT_NE(d.find("Created:    2023-11-14 22:13:20Z (2m ago)"), std::string::npos) << d;
  EXPECT_NE(d.find("branch/code  branch    LEASED     2/3      pretrain"), std::string::npos) << d;
  EXPECT_NE(d.find("pretrain  valid_loss  2.25"), std::string::npos) << d;
  EXPECT_NE(d.find("branch/code  attempt 2  lease of attempt 1 expired"), std::string::npos) << d;
  EXPECT_NE(d.find("Events (last 2 of 3):"), std::string::npos) << d;  // job.progress is left out
  EXPECT_EQ(d.find("job.progress"), std::string::npos) << d;
  EXPECT_NE(d.find("job.succeeded"), std::string::npos) << d;
}

// Two gang jobs beside the single-node sample: one running on two workers (one of which has not picked
// its assignment up yet), one waiting for workers.
v1::Pipeline GangPipeline() {
  auto p = SamplePipeline();
  auto* j = p.mutable_jobs(1);  // branch/code, LEASED
  j->mutable_resources()->set_gpus(2);
  j->mutable_resources()->set_ranks(2);
  j->mutable_resources()->set_nodes(2);
  for (int rank : {1, 0}) {  // out of order on purpose
    auto* m = j->add_members();
    m->set_node_rank(rank);
    m->set_worker_id(rank == 0 ? "wid-a" : "wid-b");
    m->set_worker_name(rank == 0 ? "worker-a" : "");
    Stamp(m->mutable_lease_deadline(), kT0 + (rank == 0 ? 132s : 110s));
    m->set_delivered(rank == 0);
  }
  j->set_rendezvous("10.0.0.5:29500");
  j = p.add_jobs();
  j->set_id("dddddddd-0000-4000-8000-000000000004");
  j->set_pipeline_id(p.id());
  j->set_name("branch/math");
  j->set_kind(v1::JOB_KIND_BRANCH);
  j->set_state(v1::JOB_STATE_READY);
  j->set_max_attempts(3);
  j->add_depends_on("pretrain");
  j->mutable_resources()->set_ranks(1);
  j->mutable_resources()->set_nodes(2);
  j->set_pending_reason("waiting for 2 workers: 1 offered (w-a), needs 1 more that fits (0 GPUs)");
  return p;
}

TEST(OutputTest, GangResourcesAndLines) {
  v1::Resources r;
  r.set_nodes(2);
  r.set_ranks(2);
  EXPECT_EQ(GangResources(r), "2 nodes x 2 ranks (CPU)");
  r.set_gpus(1);
  r.set_ranks(0);  // a scheduler that predates rank groups: 1
  EXPECT_EQ(GangResources(r), "2 nodes x 1 rank (1 GPU per node)");

  const auto p = GangPipeline();
  EXPECT_TRUE(GangLines(p.jobs(0), kT0).empty());  // single node
  EXPECT_EQ(GangLines(p.jobs(1), kT0 + 120s),
            std::vector<std::string>({"branch/code: 2 nodes x 2 ranks (2 GPUs per node), LEASED",
                                      "  node 0: worker-a (lease 12s left)",
                                      "  node 1: wid-b (lease expired) (not yet picked up)",
                                      "  rendezvous: 10.0.0.5:29500"}));
  EXPECT_EQ(GangLines(p.jobs(3), kT0 + 120s),
            std::vector<std::string>({"branch/math: 2 nodes x 1 rank (CPU), READY",
                                      "  waiting for 2 workers: 1 offered (w-a), needs 1 more that fits (0 GPUs)"}));
  // Leased before the rendezvous is known; a reason that does not say "waiting" itself; no reason.
  auto j = p.jobs(1);
  j.clear_rendezvous();
  EXPECT_EQ(GangLines(j, kT0 + 100s).back(), "  rendezvous: (not yet known)");
  EXPECT_EQ(GangLines(j, kT0 + 100s)[2], "  node 1: wid-b (lease 10s left) (not yet picked up)");
  j = p.jobs(3);
  j.set_state(v1::JOB_STATE_RETRY_WAIT);
  j.set_pending_reason("no worker has 2 GPUs");
  EXPECT_EQ(GangLines(j, kT0).back(), "  waiting: no worker has 2 GPUs");
  j.clear_pending_reason();
  EXPECT_EQ(GangLines(j, kT0).size(), 1u);
  j.set_state(v1::JOB_STATE_PENDING);
  j.set_pending_reason("stale");
  EXPECT_EQ(GangLines(j, kT0).size(), 1u);  // only READY and RETRY_WAIT say what they wait for
}

TEST(OutputTest, DescribeShowsGangs) {
  const std::string d = DescribePipeline(GangPipeline(), {}, kT0 + 120s);
  EXPECT_NE(d.find("\nJobs:\n"
                   "NAME         KIND      STATE      ATTEMPT  DEPENDS ON            STEP     LOSS   TOK/S  TIME  NODES\n"
                   "pretrain     pretrain  SUCCEEDED  1/3      -                     200/200  2.134  -      1:00  1\n"
                   "branch/code  branch    LEASED     2/3      pretrain              40/150   3.210  5.1k   0:58  2\n"
                   "eval         eval      PENDING    0/3      branch/code,pretrain  -        -      -      -     1\n"
                   "branch/math  branch    READY      0/3      pretrain              -        -      -      -     2\n"),
            std::string::npos)
      << d;
  EXPECT_NE(d.find("\nGangs:\n"
                   "  branch/code: 2 nodes x 2 ranks (2 GPUs per node), LEASED\n"
                   "    node 0: worker-a (lease 12s left)\n"
                   "    node 1: wid-b (lease expired) (not yet picked up)\n"
                   "    rendezvous: 10.0.0.5:29500\n"
                   "  branch/math: 2 nodes x 1 rank (CPU), READY\n"
                   "    waiting for 2 workers: 1 offered (w-a), needs 1 more that fits (0 GPUs)\n"
                   "\n"),
            std::string::npos)
      << d;
  // Without gangs: no NODES column, no Gangs section.
  const std::string single = DescribePipeline(SamplePipeline(), {}, kT0 + 120s);
  EXPECT_EQ(single.find("NODES"), std::string::npos) << single;
  EXPECT_EQ(single.find("Gangs:"), std::string::npos) << single;
}

TEST(OutputTest, JobAndPlanTablesShowNodesOnlyWithGangs) {
  const auto p = GangPipeline();
  std::vector<v1::Job> jobs(p.jobs().begin(), p.jobs().end());
  EXPECT_EQ(JobsTable(jobs, false),
            "ID                                    NAME         KIND      STATE      ATTEMPT  STEP     LOSS   TOK/S  NODES\n"
            "aaaaaaaa-0000-4000-8000-000000000001  pretrain     pretrain  SUCCEEDED  1/3      200/200  2.134  -      1\n"
            "bbbbbbbb-0000-4000-8000-000000000002  branch/code  branch    LEASED     2/3      40/150   3.210  5.1k   2\n"
            "cccccccc-0000-4000-8000-000000000003  eval         eval      PENDING    0/3      -        -      -      1\n"
            "dddddddd-0000-4000-8000-000000000004  branch/math  branch    READY      0/3      -        -      -      2\n");
  EXPECT_NE(PlanTable(p).find("MAX ATTEMPTS  NODES\n"), std::string::npos) << PlanTable(p);
  EXPECT_NE(PlanTable(p).find("branch/math  branch    pretrain               3             2\n"), std::string::npos)
      << PlanTable(p);
  EXPECT_EQ(PlanTable(SamplePipeline()).find("NODES"), std::string::npos);
}

TEST(OutputTest, PlanTable) {
  auto p = SamplePipeline();
  EXPECT_EQ(PlanTable(p),
            "JOB          KIND      DEPENDS ON             MAX ATTEMPTS\n"
            "pretrain     pretrain  -                      3\n"
            "branch/code  branch    pretrain               3\n"
            "eval         eval      branch/code, pretrain  3\n");
}

}  // namespace
}  // namespace btx::cli
