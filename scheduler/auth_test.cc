// Authentication and authorisation: the identities file, the one method → role table, the
// start-up checks, and the whole thing over real TLS / mutual TLS against a scheduler on a real
// PostgreSQL, with certificate authorities made for the run.
#include "btx/scheduler/auth.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <future>
#include <set>

#include <gtest/gtest.h>

#include "btx/common/fs.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/server.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "pg_fixture.h"
#include "test_certs.h"
#include "test_util.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
namespace v1 = btx::v1;

TEST(Identities, ParsesTokensAndCertificates) {
  const std::string text = "# who may call\n\n" + TokenDigest("s3cret") + " user alice   # laptop\n" +
                           TokenDigest("w") + "\tworker  node-1\r\ncert:ops admin ops-laptop\n";
  auto ids = ParseIdentities(text, "ids.txt");
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ(ids->tokens.size(), 2u);
  EXPECT_EQ(ids->tokens[0].role, Role::kUser);
  EXPECT_EQ(ids->tokens[0].name, "alice");
  EXPECT_EQ(ids->tokens[1].role, Role::kWorker);
  ASSERT_EQ(ids->certs.size(), 1u);
  EXPECT_EQ(ids->certs[0].common_name, "ops");
  EXPECT_EQ(ids->certs[0].role, Role::kAdmin);
  // Upper-case hex, as some tools print it, is the same digest.
  std::string upper = TokenDigest("s3cret");
  for (size_t i = 7; i < upper.size(); ++i) upper[i] = static_cast<char>(std::toupper(upper[i]));
  auto again = ParseIdentities(upper + " admin a\n", "f");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->tokens[0].sha256, ids->tokens[0].sha256);
}

TEST(Identities, DigestIsSha256OfTheTokenText) {
  EXPECT_EQ(TokenDigest("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Identities, BadLinesNameTheLineAndNeverEchoASecret) {
  const std::string d = TokenDigest("x");
  struct Case {
    std::string text, expect;
  };
  for (const auto& c : std::vector<Case>{
           {"\n" + d + " user\n", "f:2: expected 'sha256:<hex> ROLE NAME'"},
           {d + " root alice\n", "f:1: role 'root': expected user, worker or admin"},
           {"sha256:abcd user alice\n", "f:1: expected sha256: and 64 hex digits"},
           {d + " user a\n" + d + " admin b\n", "f:2: the same token is listed twice"},
           {"cert:w worker a\ncert:w admin b\n", "f:2: certificate 'w' is listed twice"},
           {"cert: worker a\n", "f:1: expected sha256:<hex>"},
           {"hunter2-plain-token user alice\n", "f:1: expected sha256:<hex> (the SHA-256 of a token"},
       }) {
    auto r = ParseIdentities(c.text, "f");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos) << r.status();
    EXPECT_EQ(r.status().message().find("hunter2"), std::string::npos) << r.status();
  }
  auto missing = LoadIdentities("/nonexistent/tokens");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/tokens"), std::string::npos);
}

TEST(Authorization, OneTableForEveryMethod) {
  const Principal user{Role::kUser, "u"}, worker{Role::kWorker, "w"}, admin{Role::kAdmin, "a"};
  const absl::StatusOr<Principal> nobody = absl::UnauthenticatedError("no credentials");
  auto code = [](std::string_view m, const absl::StatusOr<Principal>& who) { return Authorize(m, who).code(); };
  using C = absl::StatusCode;
  for (const char* m : {"/btx.v1.PipelineService/Submit", "/btx.v1.PipelineService/Cancel",
                        "/btx.v1.PipelineService/Retry", "/btx.v1.PipelineService/Get", "/btx.v1.PipelineService/Watch"}) {
    EXPECT_EQ(code(m, user), C::kOk) << m;
    EXPECT_EQ(code(m, admin), C::kOk) << m;
    EXPECT_EQ(code(m, worker), C::kPermissionDenied) << m;
    EXPECT_EQ(code(m, nobody), C::kUnauthenticated) << m;
  }
  for (const char* m : {"/btx.v1.WorkerService/Register", "/btx.v1.WorkerService/AcquireJob",
                        "/btx.v1.WorkerService/Heartbeat", "/btx.v1.WorkerService/Complete", "/btx.v1.WorkerService/Fail"}) {
    EXPECT_EQ(code(m, worker), C::kOk) << m;
    EXPECT_EQ(code(m, admin), C::kOk) << m;
    EXPECT_EQ(code(m, user), C::kPermissionDenied) << m;
    EXPECT_EQ(code(m, nobody), C::kUnauthenticated) << m;
  }
  EXPECT_EQ(code("/grpc.health.v1.Health/Check", nobody), C::kOk);
  EXPECT_EQ(code("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", worker), C::kOk);
  EXPECT_EQ(code("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", nobody), C::kUnauthenticated);
  // Anything the table does not name is for admins (and looks alike to the others).
  EXPECT_EQ(code("/btx.v1.AdminService/Drop", admin), C::kOk);
  EXPECT_EQ(code("/btx.v1.AdminService/Drop", user), C::kPermissionDenied);
  EXPECT_EQ(code("/btx.v1.PipelineServiceX/Submit", user), C::kPermissionDenied);
  const std::string msg(Authorize("/btx.v1.PipelineService/Cancel", worker).message());
  EXPECT_EQ(msg, "worker 'w' may not call /btx.v1.PipelineService/Cancel (allowed: user or admin)");
}

TEST(Authentication, TokenFirstThenCertificate) {
  auto digest = ParseIdentities(
      TokenDigest("t-alice") + " user alice\ncert:ops admin ops-laptop\ncert:node-7 worker gpu-7\n", "f");
  ASSERT_TRUE(digest.ok());
  Authenticator auth(*digest);
  auto who = auth.Authenticate({"Bearer t-alice"}, "");
  ASSERT_TRUE(who.ok()) << who.status();
  EXPECT_EQ(who->name, "alice");
  EXPECT_TRUE(auth.Authenticate({"bearer t-alice"}, "").ok());  // the scheme is case-insensitive
  EXPECT_EQ(auth.Authenticate({"Bearer t-alice"}, "ops")->role, Role::kUser);
  EXPECT_EQ(auth.Authenticate({}, "ops")->role, Role::kAdmin);
  EXPECT_EQ(auth.Authenticate({}, "node-7")->role, Role::kWorker);
  EXPECT_EQ(auth.Authenticate({}, "node-7")->name, "gpu-7");
  for (const std::vector<std::string_view>& bad :
       {std::vector<std::string_view>{"Bearer wrong"}, {"Basic dXNlcg=="}, {"Bearer "}, {"t-alice"},
        {"Bearer t-alice", "Bearer t-alice"}, {}}) {
    auto r = auth.Authenticate(bad, "");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnauthenticated) << r.status();
  }
  // A certificate the CA signed is no worker unless the identities file lists it.
  auto unlisted = auth.Authenticate({}, "node-8");
  ASSERT_FALSE(unlisted.ok());
  EXPECT_EQ(unlisted.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(unlisted.status().message().find("'node-8' is not listed"), std::string::npos) << unlisted.status();
  // A bad token is not rescued by a good certificate.
  EXPECT_FALSE(auth.Authenticate({"Bearer wrong"}, "ops").ok());
  EXPECT_NE(Authenticator({}).Authenticate({"Bearer x"}, "").status().message().find("--tokens-file"),
            std::string::npos);
}

TEST(StartupChecks, InsecureOnlyOnLoopbackUnlessAllowed) {
  SecurityConfig plain;
  EXPECT_TRUE(CheckSecurity("127.0.0.1:0", plain).ok());
  EXPECT_TRUE(CheckSecurity("[::1]:50051", plain).ok());
  auto refused = CheckSecurity("0.0.0.0:50051", plain);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.message().find("--allow-insecure-remote"), std::string::npos) << refused;
  EXPECT_FALSE(InsecurityWarning("127.0.0.1:0", plain).empty());
  plain.allow_insecure_remote = true;
  EXPECT_TRUE(CheckSecurity("0.0.0.0:50051", plain).ok());
  EXPECT_NE(InsecurityWarning("0.0.0.0:50051", plain).find("--allow-insecure-remote"), std::string::npos);

  SecurityConfig tls_only{.cert_pem = "c", .key_pem = "k"};
  EXPECT_EQ(CheckSecurity("10.0.0.1:50051", tls_only).code(), absl::StatusCode::kFailedPrecondition);
  SecurityConfig secure{.cert_pem = "c", .key_pem = "k", .client_ca_pem = "ca"};
  EXPECT_TRUE(CheckSecurity("0.0.0.0:50051", secure).ok());
  EXPECT_EQ(InsecurityWarning("0.0.0.0:50051", secure), "");

  SecurityConfig tokens_in_clear;
  tokens_in_clear.identities = *ParseIdentities(TokenDigest("t") + " user a\n", "f");
  auto clear = CheckSecurity("127.0.0.1:0", tokens_in_clear);
  EXPECT_EQ(clear.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(clear.message().find("plain text"), std::string::npos) << clear;
  EXPECT_EQ(CheckSecurity("127.0.0.1:0", {.client_ca_pem = "ca"}).code(), absl::StatusCode::kInvalidArgument);
  SecurityConfig certs_without_ca{.cert_pem = "c", .key_pem = "k"};
  certs_without_ca.identities = *ParseIdentities("cert:ops admin o\n", "f");
  EXPECT_EQ(CheckSecurity("127.0.0.1:0", certs_without_ca).code(), absl::StatusCode::kInvalidArgument);
}

const char* kSpec = R"(
name: auth
seed: {model: /models/seed}
experts:
  - {name: code, data: {train: [/d/code]}, steps: 3}
evaluate: {baselines: []}
)";

// Credentials made once for the suite: our CA (server, worker, admin-by-certificate client) and a
// foreign CA whose certificate must be refused.
struct Pki {
  std::string dir;
  std::unique_ptr<btx::testing::TestCa> ca, foreign;
  btx::testing::IssuedCert server, worker, ops, stranger, unlisted;
};

class AuthServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    pki_ = new Pki;
    pki_->dir = *MakeTempDir("btx-auth-test");
    pki_->ca = std::make_unique<btx::testing::TestCa>(pki_->dir, "btx");
    pki_->foreign = std::make_unique<btx::testing::TestCa>(pki_->dir, "foreign");
    pki_->server = pki_->ca->IssueServer("scheduler");
    pki_->worker = pki_->ca->IssueClient("node-1");
    pki_->ops = pki_->ca->IssueClient("ops");
    // The same common name as our worker, from the wrong CA.
    pki_->stranger = pki_->foreign->IssueClient("node-1");
    // Signed by our CA, but not in the identities file.
    pki_->unlisted = pki_->ca->IssueClient("node-9");
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(pki_->dir);
    delete pki_;
  }

  AuthServiceTest()
      : conninfo_(btx::testing::NewMigratedDatabase()), stack_(conninfo_, 4, clock_, Config(), /*with_metrics=*/true) {
    auto port = scheduler_.Start();
    EXPECT_TRUE(port.ok()) << port.status();
    target_ = "127.0.0.1:" + std::to_string(port.value_or(0));
  }
  static SchedulerConfig Config() {
    SchedulerConfig c;
    c.artifact_root = "/tmp/btx-test-artifacts";
    c.reap_interval = 3600s;
    c.security.cert_pem = pki_->server.cert_pem;
    c.security.key_pem = pki_->server.key_pem;
    c.security.client_ca_pem = pki_->ca->cert_pem();
    c.security.identities = *ParseIdentities(TokenDigest("user-token") + " user alice\n" + TokenDigest("bob-token") +
                                                 " user bob\n" + TokenDigest("worker-token") +
                                                 " worker node-2\n" + TokenDigest("admin-token") + " admin root\n" +
                                                 "cert:ops admin ops-laptop\ncert:node-1 worker node-1\n",
                                             "tokens");
    return c;
  }

  // A TLS channel trusting our CA, optionally presenting a client certificate.
  std::shared_ptr<grpc::Channel> Channel(const btx::testing::IssuedCert* client = nullptr) {
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = pki_->ca->cert_pem();
    if (client != nullptr) {
      o.pem_cert_chain = client->cert_pem;
      o.pem_private_key = client->key_pem;
    }
    return grpc::CreateChannel(target_, grpc::SslCredentials(o));
  }
  static void Prepare(grpc::ClientContext& ctx, const std::string& token) {
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  }
  grpc::Status Register(const std::shared_ptr<grpc::Channel>& ch, const std::string& token = "",
                        std::string* id = nullptr) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::RegisterRequest req;
    req.set_name("w");
    req.mutable_capabilities()->set_slots(1);
    v1::RegisterResponse resp;
    auto s = v1::WorkerService::NewStub(ch)->Register(&ctx, req, &resp);
    if (id) *id = resp.worker_id();
    return s;
  }
  grpc::Status Acquire(const std::shared_ptr<grpc::Channel>& ch, const std::string& worker_id,
                       v1::AcquireJobResponse* resp, const std::string& token = "") {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::AcquireJobRequest req;
    req.set_worker_id(worker_id);
    req.set_wait_timeout_ms(0);
    return v1::WorkerService::NewStub(ch)->AcquireJob(&ctx, req, resp);
  }
  grpc::Status Submit(const std::shared_ptr<grpc::Channel>& ch, const std::string& token, std::string* id = nullptr) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::SubmitRequest req;
    req.set_spec(kSpec);
    v1::SubmitResponse resp;
    auto s = v1::PipelineService::NewStub(ch)->Submit(&ctx, req, &resp);
    if (id) *id = resp.pipeline().id();
    return s;
  }
  grpc::Status Cancel(const std::shared_ptr<grpc::Channel>& ch, const std::string& token, const std::string& id) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::CancelRequest req;
    req.set_id(id);
    v1::Pipeline resp;
    return v1::PipelineService::NewStub(ch)->Cancel(&ctx, req, &resp);
  }
  grpc::Status List(const std::shared_ptr<grpc::Channel>& ch, const std::string& token) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::ListPipelinesRequest req;
    v1::ListPipelinesResponse resp;
    return v1::PipelineService::NewStub(ch)->List(&ctx, req, &resp);
  }
  grpc::Status SubmitWithKey(const std::string& token, const std::string& key, const std::string& spec,
                             v1::SubmitResponse* resp) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::SubmitRequest req;
    req.set_spec(spec);
    req.set_idempotency_key(key);
    return v1::PipelineService::NewStub(Channel())->Submit(&ctx, req, resp);
  }
  grpc::Status Get(const std::string& token, const std::string& id) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::GetPipelineRequest req;
    req.set_id(id);
    v1::Pipeline resp;
    return v1::PipelineService::NewStub(Channel())->Get(&ctx, req, &resp);
  }
  grpc::Status Retry(const std::string& token, const std::string& id) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::RetryRequest req;
    req.set_id(id);
    v1::Pipeline resp;
    return v1::PipelineService::NewStub(Channel())->Retry(&ctx, req, &resp);
  }
  // The ids of the pipelines List shows to this token.
  std::set<std::string> ListIds(const std::string& token) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::ListPipelinesResponse resp;
    auto s = v1::PipelineService::NewStub(Channel())->List(&ctx, v1::ListPipelinesRequest(), &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    std::set<std::string> ids;
    for (const auto& p : resp.pipelines()) ids.insert(p.id());
    return ids;
  }
  // Watch without following: the status, and the pipeline ids of the events it streamed.
  grpc::Status Watch(const std::string& token, const std::string& pipeline_id, std::set<std::string>* seen) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::WatchRequest req;
    req.set_pipeline_id(pipeline_id);
    req.set_follow(false);
    auto reader = v1::PipelineService::NewStub(Channel())->Watch(&ctx, req);
    v1::Event e;
    while (reader->Read(&e)) seen->insert(e.pipeline_id());
    return reader->Finish();
  }
  grpc::Status Logs(const std::string& token, const std::string& job_id) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::LogsRequest req;
    req.set_job_id(job_id);
    req.set_follow(false);
    auto reader = v1::PipelineService::NewStub(Channel())->Logs(&ctx, req);
    v1::LogLine line;
    while (reader->Read(&line)) {
    }
    return reader->Finish();
  }
  grpc::Status ListJobs(const std::string& token, const std::string& pipeline_id, std::set<std::string>* pipelines) {
    grpc::ClientContext ctx;
    Prepare(ctx, token);
    v1::ListJobsRequest req;
    req.set_pipeline_id(pipeline_id);
    v1::ListJobsResponse resp;
    auto s = v1::PipelineService::NewStub(Channel())->ListJobs(&ctx, req, &resp);
    for (const auto& j : resp.jobs()) pipelines->insert(j.pipeline_id());
    return s;
  }
  std::string PipelineState(const std::string& id) {
    auto p = store_.GetPipeline(id);
    return p.ok() ? p->state : p.status().ToString();
  }
  std::string UserSubmits() {
    std::string id;
    auto s = Submit(Channel(), "user-token", &id);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return id;
  }

  static Pki* pki_;
  ManualClock clock_;
  std::string conninfo_;
  testing::SchedulerStack stack_;
  storage::Store& store_ = stack_.store;
  metrics::Registry& registry_ = stack_.registry;
  Scheduler& scheduler_ = stack_.scheduler;
  std::string target_;
};
Pki* AuthServiceTest::pki_ = nullptr;

#define EXPECT_CODE(status, code_)                                                                   \
  do {                                                                                               \
    const grpc::Status s_ = (status);                                                                \
    EXPECT_EQ(s_.error_code(), grpc::StatusCode::code_) << #status << ": " << s_.error_message();    \
  } while (0)

TEST_F(AuthServiceTest, MutualTlsWorkerRegistersAndLeasesAJob) {
  UserSubmits();
  auto worker = Channel(&pki_->worker);
  std::string worker_id;
  EXPECT_CODE(Register(worker, "", &worker_id), OK);
  v1::AcquireJobResponse job;
  EXPECT_CODE(Acquire(worker, worker_id, &job), OK);
  EXPECT_TRUE(job.has_job()) << job.DebugString();
}

TEST_F(AuthServiceTest, WorkerServiceRefusesClientsWithoutAWorkerCertificate) {
  // TLS without a client certificate or token: through the handshake, refused by the table.
  EXPECT_CODE(Register(Channel()), UNAUTHENTICATED);
  // A certificate from another CA does not even get through the handshake.
  EXPECT_CODE(Register(Channel(&pki_->stranger)), UNAVAILABLE);
  // Plaintext to a TLS port: no handshake either.
  grpc::ClientContext ctx;
  Prepare(ctx, "");
  v1::RegisterResponse resp;
  EXPECT_CODE(v1::WorkerService::NewStub(grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()))
                  ->Register(&ctx, v1::RegisterRequest(), &resp),
              UNAVAILABLE);
  EXPECT_TRUE(store_.ListWorkers()->empty());
}

TEST_F(AuthServiceTest, UnlistedCertificateFromOurCaIsNoWorker) {
  grpc::ClientContext ctx;
  Prepare(ctx, "");
  v1::RegisterRequest req;
  req.set_name("w");
  v1::RegisterResponse resp;
  const grpc::Status s = v1::WorkerService::NewStub(Channel(&pki_->unlisted))->Register(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  EXPECT_NE(s.error_message().find("'node-9' is not listed in the identities file"), std::string::npos)
      << s.error_message();
  EXPECT_CODE(List(Channel(&pki_->unlisted), ""), UNAUTHENTICATED);
  EXPECT_TRUE(store_.ListWorkers()->empty());
  // The listed one is.
  EXPECT_CODE(Register(Channel(&pki_->worker)), OK);
}

TEST_F(AuthServiceTest, UserTokenCannotCallWorkerService) {
  auto user = Channel();
  EXPECT_CODE(Submit(user, "user-token"), OK);
  EXPECT_CODE(List(user, "user-token"), OK);
  EXPECT_CODE(Register(user, "user-token"), PERMISSION_DENIED);
  v1::AcquireJobResponse job;
  EXPECT_CODE(Acquire(user, "00000000-0000-4000-8000-000000000001", &job, "user-token"), PERMISSION_DENIED);
  EXPECT_TRUE(store_.ListWorkers()->empty());
}

TEST_F(AuthServiceTest, WorkersCannotCancelOrSubmit) {
  const std::string id = UserSubmits();
  auto by_cert = Channel(&pki_->worker);
  EXPECT_CODE(Cancel(by_cert, "", id), PERMISSION_DENIED);
  EXPECT_CODE(Submit(by_cert, ""), PERMISSION_DENIED);
  EXPECT_CODE(List(by_cert, ""), PERMISSION_DENIED);
  auto by_token = Channel();
  EXPECT_CODE(Register(by_token, "worker-token"), OK);
  EXPECT_CODE(Cancel(by_token, "worker-token", id), PERMISSION_DENIED);
  // Refused before the handler: nothing changed.
  EXPECT_NE(PipelineState(id), "CANCELLED");
  EXPECT_CODE(Cancel(Channel(), "user-token", id), OK);
  EXPECT_EQ(PipelineState(id), "CANCELLED");
}

TEST_F(AuthServiceTest, MissingOrWrongTokensAreUnauthenticated) {
  const std::string id = UserSubmits();
  auto ch = Channel();
  EXPECT_CODE(List(ch, ""), UNAUTHENTICATED);
  EXPECT_CODE(Cancel(ch, "", id), UNAUTHENTICATED);
  EXPECT_CODE(Cancel(ch, "user-token-but-wrong", id), UNAUTHENTICATED);
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Basic dXNlcjpwYXNz");
  v1::ListPipelinesResponse resp;
  const grpc::Status basic = v1::PipelineService::NewStub(ch)->List(&ctx, v1::ListPipelinesRequest(), &resp);
  EXPECT_EQ(basic.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(basic.error_message(), "authorization header: expected 'Bearer <token>'");
  // A wrong token is refused even with a valid worker certificate beside it.
  EXPECT_CODE(Register(Channel(&pki_->worker), "nope"), UNAUTHENTICATED);
  EXPECT_NE(PipelineState(id), "CANCELLED");
  // Refusals never reach the handlers' request counter; they have their own.
  const std::string exposition = registry_.Serialize();
  EXPECT_NE(exposition.find(R"(btx_grpc_auth_refusals_total{method="PipelineService/Cancel",code="UNAUTHENTICATED"} 2)"),
            std::string::npos)
      << exposition;
  EXPECT_NE(exposition.find(R"(btx_grpc_auth_refusals_total{method="WorkerService/Register",code="UNAUTHENTICATED"} 1)"),
            std::string::npos)
      << exposition;
}

std::string ChangedSpec() {
  std::string spec = kSpec;
  spec.replace(spec.find("steps: 3"), 8, "steps: 4");
  return spec;
}

TEST_F(AuthServiceTest, PipelinesBelongToWhoeverSubmittedThem) {
  // Bob uses the idempotency key Alice used: his own new pipeline, never hers.
  v1::SubmitResponse alice, bob;
  EXPECT_CODE(SubmitWithKey("user-token", "nightly", kSpec, &alice), OK);
  EXPECT_CODE(SubmitWithKey("bob-token", "nightly", kSpec, &bob), OK);
  const std::string a = alice.pipeline().id(), b = bob.pipeline().id();
  ASSERT_FALSE(a.empty());
  ASSERT_FALSE(b.empty());
  EXPECT_TRUE(bob.created());
  EXPECT_NE(a, b);
  EXPECT_EQ(store_.GetPipeline(a)->owner, "alice");
  EXPECT_EQ(store_.GetPipeline(b)->owner, "bob");
  // The same owner and key: the same pipeline for the same spec, refused for another.
  v1::SubmitResponse again;
  EXPECT_CODE(SubmitWithKey("user-token", "nightly", kSpec, &again), OK);
  EXPECT_FALSE(again.created());
  EXPECT_EQ(again.pipeline().id(), a);
  const grpc::Status changed = SubmitWithKey("user-token", "nightly", ChangedSpec(), &again);
  EXPECT_EQ(changed.error_code(), grpc::StatusCode::ALREADY_EXISTS) << changed.error_message();
  EXPECT_NE(changed.error_message().find("idempotency key 'nightly'"), std::string::npos) << changed.error_message();

  // Each user sees only their own; another's pipeline is NOT_FOUND, as if it did not exist.
  EXPECT_CODE(Get("user-token", a), OK);
  EXPECT_CODE(Get("bob-token", a), NOT_FOUND);
  EXPECT_CODE(Get("user-token", b), NOT_FOUND);
  EXPECT_EQ(ListIds("user-token"), std::set<std::string>{a});
  EXPECT_EQ(ListIds("bob-token"), std::set<std::string>{b});
  EXPECT_EQ(ListIds("admin-token"), (std::set<std::string>{a, b}));
  std::set<std::string> seen;
  EXPECT_CODE(Watch("bob-token", a, &seen), NOT_FOUND);
  EXPECT_TRUE(seen.empty());
  EXPECT_CODE(Watch("bob-token", "", &seen), OK);
  EXPECT_EQ(seen, std::set<std::string>{b});
  seen.clear();
  EXPECT_CODE(Watch("admin-token", "", &seen), OK);
  EXPECT_EQ(seen, (std::set<std::string>{a, b}));
  const std::string job_of_a = store_.GetPipeline(a)->jobs.at(0).id;
  EXPECT_CODE(Logs("bob-token", job_of_a), NOT_FOUND);
  EXPECT_CODE(Logs("user-token", job_of_a), OK);
  std::set<std::string> job_pipelines;
  EXPECT_CODE(ListJobs("bob-token", a, &job_pipelines), NOT_FOUND);
  EXPECT_CODE(ListJobs("bob-token", "", &job_pipelines), OK);
  EXPECT_EQ(job_pipelines, std::set<std::string>{b});

  // Bob can neither cancel nor retry Alice's pipeline; she and an admin can.
  EXPECT_CODE(Cancel(Channel(), "bob-token", a), NOT_FOUND);
  EXPECT_CODE(Retry("bob-token", a), NOT_FOUND);
  EXPECT_EQ(PipelineState(a), "RUNNING");
  EXPECT_CODE(Cancel(Channel(), "user-token", a), OK);
  EXPECT_EQ(PipelineState(a), "CANCELLED");
  EXPECT_CODE(Retry("bob-token", a), NOT_FOUND);
  EXPECT_EQ(PipelineState(a), "CANCELLED");
  EXPECT_CODE(Retry("user-token", a), OK);
  EXPECT_EQ(PipelineState(a), "RUNNING");
  EXPECT_CODE(Cancel(Channel(), "admin-token", b), OK);
  EXPECT_EQ(PipelineState(b), "CANCELLED");
}

// gRPC shares one auth context between the calls of a connection: who calls must come from each call's
// own credentials. Alice and Bob on one channel (a proxy multiplexing users does this), each call with its
// own token: neither sees the other's pipeline, and no call passes for the anonymous admin.
TEST_F(AuthServiceTest, CallsOfSeveralUsersOnOneConnectionAreEachTheirCallersOwn) {
  auto shared = Channel();
  std::string a, b;
  ASSERT_EQ(Submit(shared, "user-token", &a).error_code(), grpc::StatusCode::OK);
  ASSERT_EQ(Submit(shared, "bob-token", &b).error_code(), grpc::StatusCode::OK);
  EXPECT_EQ(store_.GetPipeline(a)->owner, "alice");
  EXPECT_EQ(store_.GetPipeline(b)->owner, "bob");
  for (int round = 0; round < 3; ++round) {
    for (const auto& [token, mine, theirs] : {std::tuple{"user-token", a, b}, std::tuple{"bob-token", b, a}}) {
      grpc::ClientContext ctx;
      Prepare(ctx, token);
      v1::ListPipelinesResponse resp;
      ASSERT_TRUE(v1::PipelineService::NewStub(shared)->List(&ctx, v1::ListPipelinesRequest(), &resp).ok());
      std::set<std::string> seen;
      for (const auto& p : resp.pipelines()) seen.insert(p.id());
      EXPECT_EQ(seen, std::set<std::string>{mine}) << token << " round " << round;
      EXPECT_CODE(Cancel(shared, token, theirs), NOT_FOUND);
    }
  }
}

TEST_F(AuthServiceTest, AdminsByTokenOrCertificateMayDoBoth) {
  const std::string id = UserSubmits();
  auto ch = Channel();
  EXPECT_CODE(Register(ch, "admin-token"), OK);
  EXPECT_CODE(List(ch, "admin-token"), OK);
  auto ops = Channel(&pki_->ops);
  EXPECT_CODE(Register(ops), OK);
  EXPECT_CODE(Cancel(ops, "", id), OK);
  EXPECT_EQ(PipelineState(id), "CANCELLED");
}

TEST_F(AuthServiceTest, HealthNeedsNoCredentials) {
  grpc::GenericStub stub(Channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  grpc::Slice nothing(static_cast<const void*>(""), 0);
  grpc::ByteBuffer empty(&nothing, 1), health;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &empty, &health,
                 [&](grpc::Status s) { done.set_value(s); });
  EXPECT_CODE(done.get_future().get(), OK);
}

TEST(SchedulerStart, RefusesInsecureListenersOtherMachinesCanReach) {
  const std::string conninfo = btx::testing::NewMigratedDatabase();
  storage::ConnectionPool pool(conninfo, 2);
  storage::Store store(pool);
  ManualClock clock;
  SchedulerConfig c;
  c.listen = "0.0.0.0:0";
  {
    Scheduler s(c, store, clock, conninfo);
    auto port = s.Start();
    ASSERT_FALSE(port.ok());
    EXPECT_EQ(port.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(port.status().message().find("--allow-insecure-remote"), std::string::npos) << port.status();
  }
  c.security.allow_insecure_remote = true;
  Scheduler s(c, store, clock, conninfo);
  auto port = s.Start();
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
}

}  // namespace
}  // namespace btx::scheduler
