// The real btxctl binary against a real scheduler (in this process, port 0) over a real PostgreSQL.
// Jobs are driven by a fake worker speaking WorkerService, so no trainer is needed.
#include <grpcpp/grpcpp.h>

#include <csignal>
#include <unistd.h>

#include <filesystem>
#include <set>
#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "btx/scheduler/auth.h"
#include "btx/scheduler/server.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "cli_test_util.h"
#include "embedded.h"
#include "pg_fixture.h"
#include "test_certs.h"

namespace btx::cli {
namespace {
using json = nlohmann::json;
using testing::Btxctl;
using testing::CliResult;
using testing::RunBtxctl;
using testing::WaitFor;
using testing::WriteFile;

const char* kSpec = R"(
name: cli-it
seed: {model: models/seed}
experts:
  - {name: code, data: {train: data/code.txt, valid: [data/code-valid.txt]}, steps: 3}
evaluate: {baselines: [seed]}
)";

const char* kEval = R"({"domains": ["code"], "models": {
  "btx": {"domains": {"code": {"loss": 1.5, "ppl": 4.5, "tokens": 64}}, "avg_loss": 1.5, "avg_ppl": 4.5},
  "seed": {"domains": {"code": {"loss": 2.25, "ppl": 9.5, "tokens": 64}}, "avg_loss": 2.25, "avg_ppl": 9.5}}})";

class CliIntegrationTest : public ::testing::Test {
 protected:
  CliIntegrationTest()
      : conninfo_(btx::testing::NewMigratedDatabase()), pool_(conninfo_, 8), store_(pool_),
        scheduler_(Config(), store_, clock_, conninfo_), dir_(testing::MakeTestDir()) {
    auto port = scheduler_.Start();
    EXPECT_TRUE(port.ok()) << port.status();
    server_ = "127.0.0.1:" + std::to_string(*port);
    auto channel = grpc::CreateChannel(server_, grpc::InsecureChannelCredentials());
    pipelines_ = v1::PipelineService::NewStub(channel);
    workers_ = v1::WorkerService::NewStub(channel);
    testing::WriteFile(dir_ + "/spec.yaml", kSpec);
  }
  ~CliIntegrationTest() override {
    scheduler_.Shutdown();
    std::filesystem::remove_all(dir_);
  }
  static scheduler::SchedulerConfig Config() {
    scheduler::SchedulerConfig c;
    c.artifact_root = "/tmp/btxctl-test-artifacts";
    return c;
  }

  // btxctl against this test's scheduler, run from the test dir (so relative paths resolve there).
  CliResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), {"--server", server_});
    return RunBtxctl(args, {}, dir_);
  }

  std::string SubmitOk() {
    CliResult r = Ctl({"submit", "spec.yaml", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(r.out)["pipeline"]["id"].get<std::string>();
  }

  std::vector<v1::Pipeline> ListPipelines() {
    grpc::ClientContext ctx;
    v1::ListPipelinesRequest req;
    v1::ListPipelinesResponse resp;
    EXPECT_TRUE(pipelines_->List(&ctx, req, &resp).ok());
    return {resp.pipelines().begin(), resp.pipelines().end()};
  }

  // Runs every job of the pipeline to success the way a worker would: lease, one progress
  // heartbeat, complete (the eval job with an evaluation table).
  void DriveToSuccess() {
    grpc::ClientContext rctx;
    v1::RegisterRequest reg;
    reg.set_name("fake-worker");
    reg.mutable_capabilities()->set_slots(1);
    v1::RegisterResponse worker;
    ASSERT_TRUE(workers_->Register(&rctx, reg, &worker).ok());
    for (int n = 0; n < 20; ++n) {
      grpc::ClientContext actx;
      v1::AcquireJobRequest acq;
      acq.set_worker_id(worker.worker_id());
      acq.set_wait_timeout_ms(2000);
      v1::AcquireJobResponse got;
      ASSERT_TRUE(workers_->AcquireJob(&actx, acq, &got).ok());
      if (!got.has_job()) return;
      const auto& job = got.job();
      grpc::ClientContext hctx;
      v1::HeartbeatRequest hb;
      hb.set_worker_id(worker.worker_id());
      auto* rep = hb.add_jobs();
      rep->set_job_id(job.job_id());
      rep->set_attempt(job.attempt());
      rep->mutable_progress()->set_step(2);
      rep->mutable_progress()->set_total_steps(3);
      rep->mutable_progress()->set_loss(2.5);
      rep->mutable_progress()->set_tokens_per_second(1500);
      auto* log = rep->add_logs();
      log->set_seq(1);
      log->set_stream("stdout");
      log->set_text("hello from " + job.name());
      v1::HeartbeatResponse hresp;
      ASSERT_TRUE(workers_->Heartbeat(&hctx, hb, &hresp).ok());
      grpc::ClientContext cctx;
      v1::CompleteRequest done;
      done.set_worker_id(worker.worker_id());
      done.set_job_id(job.job_id());
      done.set_attempt(job.attempt());
      done.set_artifact_uri(job.output_uri());
      done.set_result_json(job.kind() == v1::JOB_KIND_EVAL ? kEval : R"({"valid_loss": 2.5, "steps": 3})");
      v1::CompleteResponse cresp;
      ASSERT_TRUE(workers_->Complete(&cctx, done, &cresp).ok());
    }
  }

  std::string conninfo_;
  storage::ConnectionPool pool_;
  storage::Store store_;
  SystemClock clock_;
  scheduler::Scheduler scheduler_;
  std::string dir_, server_;
  std::unique_ptr<v1::PipelineService::Stub> pipelines_;
  std::unique_ptr<v1::WorkerService::Stub> workers_;
};

TEST_F(CliIntegrationTest, SubmitThenGetPipelinesAsJsonWithAbsolutePaths) {
  CliResult r = Ctl({"submit", "spec.yaml"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("submitted pipeline cli-it "), std::string::npos) << r.out;

  r = Ctl({"get", "pipelines", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json list = json::parse(r.out);
  ASSERT_TRUE(list.is_array());
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0]["name"], "cli-it");
  EXPECT_EQ(list[0]["state"], "PIPELINE_STATE_RUNNING");
  EXPECT_EQ(list[0]["jobs_total"], 4);  // branch/code, merge, finetune, eval
  // Relative paths were made absolute against btxctl's working directory before submission.
  EXPECT_EQ(list[0]["spec"]["experts"][0]["data"]["train"], json({dir_ + "/data/code.txt"}));
  EXPECT_EQ(list[0]["spec"]["experts"][0]["data"]["valid"], json({dir_ + "/data/code-valid.txt"}));
  EXPECT_EQ(list[0]["spec"]["seed"]["model"], dir_ + "/models/seed");

  r = Ctl({"get", "pipelines"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("ID ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("cli-it  RUNNING  0/4"), std::string::npos) << r.out;

  r = Ctl({"get", "pipelines", "cli-it", "-o", "yaml"});  // by name
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("name: cli-it"), std::string::npos) << r.out;
}

TEST_F(CliIntegrationTest, BadSpecExitsTwoNamingTheField) {
  testing::WriteFile(dir_ + "/bad.yaml", "name: bad\nseed: {model: m}\nexperts:\n  - {name: code, data: {train: [d]}, steps: -1}\n");
  CliResult r = Ctl({"submit", "bad.yaml"});
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("spec: experts[0].steps: got -1; expected an integer in [1, "), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("terminate"), std::string::npos) << r.err;
  EXPECT_TRUE(ListPipelines().empty());

  testing::WriteFile(dir_ + "/broken.yaml", "name: [unclosed\n");
  r = Ctl({"submit", "broken.yaml"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("\nspec: not valid YAML/JSON at line 2"), std::string::npos) << r.err;

  r = Ctl({"submit", "missing.yaml"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("cannot read pipeline spec missing.yaml"), std::string::npos) << r.err;
}

// btxctl makes a tokenizer's relative path absolute in both forms that name a file, and the scheduler
// takes the result: the branch job (a seed dir may lack a tokenizer) gets the absolute path.
TEST_F(CliIntegrationTest, RelativeTokenizerPathsInBothFormsAreSubmittedAbsolute) {
  for (const std::string tokenizer : {"{sentencepiece: spm/tok.model}", "spm/tok.model"}) {
    SCOPED_TRACE(tokenizer);
    WriteFile(dir_ + "/tok.yaml", Cat(kSpec, "tokenizer: ", tokenizer, "\n"));
    CliResult r = Ctl({"submit", "tok.yaml", "-o", "json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const json pipeline = json::parse(r.out)["pipeline"];
    const json absolute = {{"sentencepiece", dir_ + "/spm/tok.model"}};
    EXPECT_EQ(pipeline["spec"]["tokenizer"], absolute);
    bool branch = false;
    for (const auto& j : pipeline["jobs"]) {
      if (j["name"] != "branch/code") continue;
      branch = true;
      EXPECT_EQ(j["spec_json"]["tokenizer"], absolute);
    }
    EXPECT_TRUE(branch) << r.out;
  }
}

TEST_F(CliIntegrationTest, DryRunPlansAndStoresNothing) {
  CliResult r = Ctl({"submit", "spec.yaml", "--dry-run"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("spec is valid: pipeline cli-it would run 4 jobs"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("branch/code"), std::string::npos) << r.out;
  EXPECT_TRUE(ListPipelines().empty());
}

TEST_F(CliIntegrationTest, IdempotencyKeyReturnsTheSamePipeline) {
  CliResult a = Ctl({"submit", "spec.yaml", "--idempotency-key", "k1", "-o", "json"});
  CliResult b = Ctl({"submit", "spec.yaml", "--idempotency-key", "k1", "-o", "json"});
  ASSERT_EQ(a.exit_code, 0) << a.err;
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(json::parse(a.out)["pipeline"]["id"], json::parse(b.out)["pipeline"]["id"]);
  EXPECT_EQ(json::parse(b.out)["created"], false);
  EXPECT_EQ(ListPipelines().size(), 1u);
}

TEST_F(CliIntegrationTest, CancelThenGetJobsThenRetry) {
  const std::string id = SubmitOk();
  CliResult r = Ctl({"cancel", id.substr(0, 8)});  // a unique id prefix is enough
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("CANCELLED"), std::string::npos) << r.out;

  r = Ctl({"get", "jobs", "--pipeline", id, "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json jobs = json::parse(r.out);
  ASSERT_EQ(jobs.size(), 4u);
  for (const auto& j : jobs) EXPECT_EQ(j["state"], "JOB_STATE_CANCELLED") << j.dump();

  r = Ctl({"get", "jobs", "--pipeline", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("branch/code  branch    CANCELLED"), std::string::npos) << r.out;

  r = Ctl({"get", "pipelines", id, "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["state"], "PIPELINE_STATE_CANCELLED");

  // A cancelled pipeline's watch ends at once, with its outcome as the exit code.
  r = Ctl({"watch", id});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.out.find("pipeline cli-it CANCELLED"), std::string::npos) << r.out;

  r = Ctl({"retry", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("is RUNNING again"), std::string::npos) << r.out;
}

TEST_F(CliIntegrationTest, WatchDescribeAndLogsOfACompletedPipeline) {
  const std::string id = SubmitOk();
  DriveToSuccess();
  CliResult r = Ctl({"watch", id});
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("pipeline cli-it (" + id + ") submitted, 4 jobs"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("branch/code LEASED attempt 1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("branch/code step 2/3 loss 2.500 tok/s 1.5k"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("pipeline cli-it SUCCEEDED in "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("model: /tmp/btxctl-test-artifacts/" + id + "/finetune/model"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Evaluation: validation loss"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("btx    1.500*  1.500*"), std::string::npos) << r.out;

  r = Ctl({"watch", id, "-o", "json"});  // one event per line
  ASSERT_EQ(r.exit_code, 0) << r.err;
  size_t lines = 0;
  for (const auto& line : Split(r.out, '\n', true)) {
    EXPECT_TRUE(json::parse(line).contains("type")) << line;
    ++lines;
  }
  EXPECT_GT(lines, 10u);

  r = Ctl({"describe", "pipeline", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("State:      SUCCEEDED"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("branch/code  valid_loss  2.5"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("pipeline.succeeded"), std::string::npos) << r.out;

  r = Ctl({"logs", "branch/code", "--pipeline", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "hello from branch/code\n");

  r = Ctl({"get", "workers", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)[0]["name"], "fake-worker");
}

TEST_F(CliIntegrationTest, RunAgainstAServerFollowsToTheEnd) {
  Btxctl run({"--server", server_, "run", "spec.yaml"}, {}, dir_);
  ASSERT_TRUE(WaitFor([&] { return !ListPipelines().empty(); })) << run.err();
  DriveToSuccess();
  CliResult r = run.Wait();
  EXPECT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("submitted pipeline cli-it"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("eval SUCCEEDED"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Evaluation: validation loss"), std::string::npos) << r.out;
}

TEST_F(CliIntegrationTest, InterruptedRunCancelsThePipeline) {
  Btxctl run({"--server", server_, "run", "spec.yaml"}, {}, dir_);
  // Once it has said it submitted, Ctrl-C must cancel that pipeline.
  ASSERT_TRUE(WaitFor([&] { return run.out().find("submitted pipeline") != std::string::npos; })) << run.err();
  run.Signal(SIGINT);
  CliResult r = run.Wait();
  EXPECT_EQ(r.exit_code, 130) << r.err << r.out;
  EXPECT_NE(r.err.find("interrupted: cancelling pipeline"), std::string::npos) << r.err;
  auto list = ListPipelines();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].state(), v1::PIPELINE_STATE_CANCELLED);
}

TEST_F(CliIntegrationTest, ErrorsMapToDocumentedExitCodes) {
  CliResult r = RunBtxctl({"--server", "127.0.0.1:1", "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("btxctl: cannot reach the scheduler at 127.0.0.1:1"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;  // one line

  r = Ctl({"get", "pipelines", "00000000-0000-4000-8000-000000000000"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_NE(r.err.find("not found"), std::string::npos) << r.err;

  r = Ctl({"cancel", "no-such-pipeline"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_NE(r.err.find("no pipeline with id or name 'no-such-pipeline'"), std::string::npos) << r.err;

  r = Ctl({"get", "bogus"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = Ctl({"get", "pipelines", "-o", "xml"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = RunBtxctl({"--server", "http://x:1", "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("expected HOST:PORT (no scheme)"), std::string::npos) << r.err;

  // Retrying a running pipeline is refused by the server in its current state.
  const std::string id = SubmitOk();
  r = Ctl({"retry", id});
  EXPECT_EQ(r.exit_code, 5) << r.err;

  r = Ctl({"version"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.rfind("btxctl ", 0), 0u);
}

TEST_F(CliIntegrationTest, ServerAndTokenComeFromTheEnvironmentAndConfigFile) {
  CliResult r = RunBtxctl({"get", "pipelines", "-o", "json"}, {{"BTX_SERVER", server_}, {"BTX_TOKEN", "t0ken"}});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out), json::array());
  testing::WriteFile(dir_ + "/cfg.yaml", "server: " + server_ + "\ntoken: abc\n");
  r = RunBtxctl({"get", "workers"}, {{"BTX_CONFIG", dir_ + "/cfg.yaml"}});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("ID", 0), 0u) << r.out;
  testing::WriteFile(dir_ + "/bad-cfg.yaml", "sever: x\n");
  r = RunBtxctl({"get", "workers"}, {{"BTX_CONFIG", dir_ + "/bad-cfg.yaml"}});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("bad-cfg.yaml: unknown key 'sever'"), std::string::npos) << r.err;
}

// A PipelineService that only checks the bearer token, to see what btxctl sends.
class TokenCheckingService final : public v1::PipelineService::Service {
 public:
  grpc::Status ListWorkers(grpc::ServerContext* ctx, const v1::ListWorkersRequest*, v1::ListWorkersResponse*) override {
    auto it = ctx->client_metadata().find("authorization");
    seen = it == ctx->client_metadata().end() ? "" : std::string(it->second.data(), it->second.size());
    if (seen != "Bearer right") return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid bearer token");
    return grpc::Status::OK;
  }
  std::string seen;
};

TEST(CliTokenTest, TokenIsSentAsBearerMetadata) {
  TokenCheckingService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  ASSERT_GT(port, 0);
  const std::string target = "127.0.0.1:" + std::to_string(port);
  CliResult r = RunBtxctl({"--server", target, "--token", "right", "get", "workers"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("visible to every user"), std::string::npos) << r.err;
  EXPECT_EQ(service.seen, "");
  const std::string file = std::filesystem::temp_directory_path() / ("btx-cli-token-" + std::to_string(::getpid()));
  testing::WriteFile(file, "right\n");
  r = RunBtxctl({"--server", target, "--token-file", file, "get", "workers"});
  std::filesystem::remove(file);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(service.seen, "Bearer right");
  r = RunBtxctl({"--server", target, "get", "workers"}, {{"BTX_TOKEN", "wrong"}});
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_EQ(service.seen, "Bearer wrong");
  EXPECT_NE(r.err.find("invalid bearer token; pass a valid --token (or set BTX_TOKEN)"), std::string::npos) << r.err;
  server->Shutdown();
}

// btxctl against a scheduler serving mutual TLS with tokens, as deployed (docs/security.md).
class CliTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTestDir();
    ca_ = std::make_unique<btx::testing::TestCa>(dir_, "btx");
    auto server = ca_->IssueServer("scheduler");
    ops_ = ca_->IssueClient("ops");
    conninfo_ = btx::testing::NewMigratedDatabase();
    pool_ = std::make_unique<storage::ConnectionPool>(conninfo_, 4);
    store_ = std::make_unique<storage::Store>(*pool_);
    scheduler::SchedulerConfig c;
    c.artifact_root = "/tmp/btxctl-test-artifacts";
    c.security.cert_pem = server.cert_pem;
    c.security.key_pem = server.key_pem;
    c.security.client_ca_pem = ca_->cert_pem();
    c.security.identities = *scheduler::ParseIdentities(scheduler::TokenDigest("user-token") + " user alice\n" +
                                                            scheduler::TokenDigest("worker-token") + " worker node\n" +
                                                            "cert:ops admin ops-laptop\n",
                                                        "tokens");
    scheduler_ = std::make_unique<scheduler::Scheduler>(c, *store_, clock_, conninfo_);
    auto port = scheduler_->Start();
    ASSERT_TRUE(port.ok()) << port.status();
    server_ = "127.0.0.1:" + std::to_string(*port);
    testing::WriteFile(dir_ + "/spec.yaml", kSpec);
  }
  void TearDown() override {
    scheduler_->Shutdown();
    std::filesystem::remove_all(dir_);
  }
  CliResult Ctl(std::vector<std::string> args, const testing::EnvVars& env = {}) {
    args.insert(args.begin(), {"--server", server_});
    return RunBtxctl(args, env, dir_);
  }
  std::string TokenFile(const std::string& token) {
    const std::string path = dir_ + "/" + token + ".token";
    testing::WriteFile(path, token);
    return path;
  }
  std::string Submit() {
    CliResult r = Ctl({"--tls-ca", ca_->cert_file(), "--token-file", TokenFile("user-token"), "submit", "spec.yaml", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? json::parse(r.out)["pipeline"]["id"].get<std::string>() : "";
  }

  std::string dir_, conninfo_, server_;
  std::unique_ptr<btx::testing::TestCa> ca_;
  btx::testing::IssuedCert ops_;
  ManualClock clock_;
  std::unique_ptr<storage::ConnectionPool> pool_;
  std::unique_ptr<storage::Store> store_;
  std::unique_ptr<scheduler::Scheduler> scheduler_;
};

TEST_F(CliTlsTest, UserTokenOverTlsFromFlagsEnvironmentOrConfigFile) {
  const std::string id = Submit();
  CliResult r = Ctl({"get", "pipelines", "-o", "json"}, {{"BTX_TLS_CA", ca_->cert_file()}, {"BTX_TOKEN", "user-token"}});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out).at(0)["id"], id);
  // The config file names the CA relative to itself.
  testing::WriteFile(dir_ + "/conf/config.yaml", "server: " + server_ + "\ntoken: user-token\ntls_ca: ../btx-ca.pem\n");
  r = RunBtxctl({"get", "pipeline", id, "-o", "json"}, {{"BTX_CONFIG", dir_ + "/conf/config.yaml"}});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["id"], id);
}

TEST_F(CliTlsTest, ClearErrorsForMissingTlsBadTokensAndWrongRoles) {
  const std::string id = Submit();
  // Plaintext against the TLS port.
  CliResult r = Ctl({"--token-file", TokenFile("user-token"), "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("if the scheduler serves TLS, pass --tls-ca"), std::string::npos) << r.err;
  // No token, a wrong one.
  r = Ctl({"--tls-ca", ca_->cert_file(), "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_NE(r.err.find("no credentials"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("pass a valid --token"), std::string::npos) << r.err;
  r = Ctl({"--tls-ca", ca_->cert_file(), "--token-file", TokenFile("guess"), "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_NE(r.err.find("invalid bearer token"), std::string::npos) << r.err;
  // A worker's token may not cancel.
  r = Ctl({"--tls-ca", ca_->cert_file(), "--token-file", TokenFile("worker-token"), "cancel", id});
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_NE(r.err.find("worker 'node' may not call /btx.v1.PipelineService/"), std::string::npos) << r.err;
  EXPECT_NE(store_->GetPipeline(id)->state, "CANCELLED");
  // A CA that did not sign the scheduler's certificate.
  btx::testing::TestCa other(dir_, "other");
  r = Ctl({"--tls-ca", other.cert_file(), "--token-file", TokenFile("user-token"), "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("the TLS handshake failed"), std::string::npos) << r.err;
  // Unreadable TLS files stop btxctl before it connects.
  r = Ctl({"--tls-ca", dir_ + "/missing-ca.pem", "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("missing-ca.pem"), std::string::npos) << r.err;
  r = RunBtxctl({"--tls-ca", ca_->cert_file(), "get", "pipelines"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--tls-ca is for a remote scheduler"), std::string::npos) << r.err;
}

TEST_F(CliTlsTest, AdminCertificateCancelsWithoutAToken) {
  const std::string id = Submit();
  CliResult r = Ctl({"--tls-ca", ca_->cert_file(), "--tls-cert", ops_.cert_file, "--tls-key", ops_.key_file, "cancel", id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(store_->GetPipeline(id)->state, "CANCELLED");
}

// `btxctl run` on the embedded default with several local workers (no trainer needed: the test only
// looks at who registered). Each local worker has its own stable name; the first keeps the name a
// single local worker has always had.
TEST(LocalWorkers, NamesAndDisjointGpuShares) {
  const std::vector<std::string> names = LocalWorkerNames(3);
  ASSERT_EQ(names.size(), 3u);
  EXPECT_EQ(names[0].rfind("btxctl@", 0), 0u);
  EXPECT_EQ(names[1], names[0] + "-2");
  EXPECT_EQ(names[2], names[0] + "-3");
  EXPECT_EQ(LocalWorkerNames(0), LocalWorkerNames(1));
  auto share = [](int gpus, int index, int count) {
    const GpuShare s = LocalWorkerGpus(gpus, index, count);
    return std::make_pair(s.first, s.count);
  };
  EXPECT_EQ(share(8, 0, 2), std::make_pair(0, 4));
  EXPECT_EQ(share(8, 1, 2), std::make_pair(4, 4));
  EXPECT_EQ(share(3, 1, 2), std::make_pair(1, 1));  // the third GPU stays unused
  EXPECT_EQ(share(1, 1, 2).second, 0);                // fewer GPUs than workers: all on the CPU
  EXPECT_EQ(share(0, 0, 1).second, 0);
}

class EmbeddedLocalWorkersTest : public ::testing::Test {
 protected:
  EmbeddedLocalWorkersTest() : dir_(testing::MakeTestDir()), state_(dir_ + "/state") {
    WriteFile(dir_ + "/code.txt", "def f(x): return x\n");
  }
  ~EmbeddedLocalWorkersTest() override { std::filesystem::remove_all(dir_); }

  void WriteSpec(const std::string& resources) {
    WriteFile(dir_ + "/spec.yaml",
              "name: local-workers\nseed: {init: {preset: tiny}, pretrain: {data: {train: [code.txt]}, steps: 2}}\n"
              "experts: [{name: code, data: {train: code.txt}, steps: 2}]\n" +
                  resources);
  }
  std::vector<std::string> Run(const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"run", "spec.yaml", "--state-dir", state_, "--train-binary", "/bin/true"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
  // The names of the workers registered in the state dir, once there are `count` of them.
  std::set<std::string> WorkerNames(size_t count) {
    std::set<std::string> names;
    WaitFor(
        [&] {
          CliResult r = RunBtxctl({"get", "workers", "-o", "json", "--state-dir", state_});
          const json workers = json::parse(r.out, nullptr, false);
          if (r.exit_code != 0 || !workers.is_array()) return false;
          names.clear();
          for (const auto& w : workers) names.insert(w.value("name", ""));
          return names.size() >= count;
        },
        120);
    return names;
  }
  // Ctrl-C: the pipeline is cancelled, the local workers drain, btxctl ends.
  static void Interrupt(Btxctl& run) {
    run.Signal(SIGINT);
    CliResult r = run.Wait();
    EXPECT_EQ(r.err.find("[killed after timeout]"), std::string::npos) << r.err;
  }

  std::string dir_, state_;
};

TEST_F(EmbeddedLocalWorkersTest, LocalWorkersFlagStartsThatManyNamedWorkers) {
  WriteSpec("");
  Btxctl run(Run({"--local-workers", "2"}), {}, dir_);
  ASSERT_TRUE(WaitFor([&] { return run.out().find("submitted pipeline local-workers") != std::string::npos; }, 120))
      << run.err();
  EXPECT_NE(run.out().find("(local: 2 workers x 1 slot(s), "), std::string::npos) << run.out();
  const std::vector<std::string> expected = LocalWorkerNames(2);
  EXPECT_EQ(expected[1], expected[0] + "-2");
  EXPECT_EQ(WorkerNames(2), std::set<std::string>(expected.begin(), expected.end()));
  Interrupt(run);
}

TEST_F(EmbeddedLocalWorkersTest, GangSpecStartsNodesPerJobWorkersAndTooFewAreRefused) {
  WriteSpec("resources: {nodes_per_job: 3}\n");
  // Fewer local workers than a gang spans: refused before anything is submitted.
  CliResult r = RunBtxctl(Run({"--local-workers", "2"}), {}, dir_);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("spec: resources.nodes_per_job: 3 but this btxctl runs 2 local worker(s)"), std::string::npos)
      << r.err;
  r = RunBtxctl({"get", "pipelines", "-o", "json", "--state-dir", state_});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out, nullptr, false), json::array()) << r.out;

  // Without the flag: as many local workers as the spec's gangs span (the 2 of the refused run stay registered).
  Btxctl run(Run({}), {}, dir_);
  EXPECT_EQ(WorkerNames(3).size(), 3u) << run.err();
  const std::vector<std::string> expected = LocalWorkerNames(3);
  EXPECT_EQ(WorkerNames(3), std::set<std::string>(expected.begin(), expected.end()));
  Interrupt(run);
}

}  // namespace
}  // namespace btx::cli
