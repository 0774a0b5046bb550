// The scheduler's gRPC API end to end over loopback, against a real PostgreSQL, with a manual clock.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <nlohmann/json.hpp>
#include <future>
#include <thread>

#include <gtest/gtest.h>

#include "btx/rpc_status.h"
#include "btx/scheduler/server.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "pg_fixture.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
namespace v1 = btx::v1;

const char* kSpec = R"(
name: svc
seed: {model: /models/seed}
experts:
  - {name: code, data: {train: [/d/code]}, steps: 3}
  - {name: math, data: {train: [/d/math]}, steps: 3}
evaluate: {baselines: []}
)";

class ServiceTest : public ::testing::Test {
 protected:
  ServiceTest()
      : conninfo_(btx::testing::NewMigratedDatabase()), pool_(conninfo_, 8), store_(pool_),
        scheduler_(Config(), store_, clock_, conninfo_) {
    auto port = scheduler_.Start();
    EXPECT_TRUE(port.ok()) << port.status();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(*port), grpc::InsecureChannelCredentials());
    pipelines_ = v1::PipelineService::NewStub(channel_);
    workers_ = v1::WorkerService::NewStub(channel_);
  }
  static SchedulerConfig Config() {
    SchedulerConfig c;
    c.artifact_root = "/tmp/btx-test-artifacts";
    c.lease = 10s;
    c.reap_interval = 3600s;  // the test drives the reaper itself
    return c;
  }
  std::string RegisterWorker(const std::string& name) {
    grpc::ClientContext ctx;
    v1::RegisterRequest req;
    req.set_name(name);
    req.mutable_capabilities()->set_slots(1);
    v1::RegisterResponse resp;
    EXPECT_TRUE(workers_->Register(&ctx, req, &resp).ok());
    return resp.worker_id();
  }
  v1::SubmitResponse Submit(const std::string& spec, const std::string& key, grpc::Status* status) {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_spec(spec);
    req.set_idempotency_key(key);
    v1::SubmitResponse resp;
    *status = pipelines_->Submit(&ctx, req, &resp);
    return resp;
  }
  v1::AcquireJobResponse Acquire(const std::string& worker, int64_t wait_ms = 0) {
    grpc::ClientContext ctx;
    v1::AcquireJobRequest req;
    req.set_worker_id(worker);
    req.set_wait_timeout_ms(wait_ms);
    v1::AcquireJobResponse resp;
    EXPECT_TRUE(workers_->AcquireJob(&ctx, req, &resp).ok());
    return resp;
  }
  grpc::Status Complete(const std::string& worker, const v1::JobAssignment& job, int attempt) {
    grpc::ClientContext ctx;
    v1::CompleteRequest req;
    req.set_worker_id(worker);
    req.set_job_id(job.job_id());
    req.set_attempt(attempt);
    req.set_artifact_uri(job.output_uri());
    v1::CompleteResponse resp;
    return workers_->Complete(&ctx, req, &resp);
  }

  ManualClock clock_;
  std::string conninfo_;
  storage::ConnectionPool pool_;
  storage::Store store_;
  Scheduler scheduler_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PipelineService::Stub> pipelines_;
  std::unique_ptr<v1::WorkerService::Stub> workers_;
};

TEST_F(ServiceTest, ReflectionListsServicesAndHealthIsServing) {
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  // ServerReflectionRequest{list_services: ""}: field 7, length-delimited, empty.
  const char request[] = {0x3a, 0x00};
  grpc::Slice slice(request, sizeof(request));
  grpc::ByteBuffer request_buffer(&slice, 1);  // must outlive the asynchronous write
  call->Write(request_buffer, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_NE(bytes.find("btx.v1.PipelineService"), std::string::npos);
  EXPECT_NE(bytes.find("btx.v1.WorkerService"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  ctx.TryCancel();
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(4));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }

  // grpc.health.v1.Health/Check with an empty request answers SERVING (status = 1).
  grpc::ClientContext hctx;
  grpc::Slice nothing(static_cast<const void*>(""), 0);
  grpc::ByteBuffer empty(&nothing, 1), health;  // a default ByteBuffer is not a valid message
  std::promise<grpc::Status> done;
  stub.UnaryCall(&hctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &empty, &health,
                 [&](grpc::Status s) { done.set_value(s); });
  ASSERT_TRUE(done.get_future().get().ok());
  std::vector<grpc::Slice> hs;
  ASSERT_TRUE(health.Dump(&hs).ok());
  std::string hb;
  for (const auto& s : hs) hb.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_EQ(hb, std::string("\x08\x01", 2));
}

TEST_F(ServiceTest, BadSpecIsInvalidArgumentWithFieldDetails) {
  grpc::Status st;
  Submit("name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}, steps: -1}]", "", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  auto v = FieldViolationsOf(st);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].field, "experts[0].steps");
  EXPECT_NE(st.error_message().find("experts[0].steps"), std::string::npos);
}

TEST_F(ServiceTest, BadIdsAndEnumsAreInvalidArgument) {
  grpc::ClientContext c1;
  v1::GetPipelineRequest get;
  get.set_id("../../etc");
  v1::Pipeline p;
  EXPECT_EQ(pipelines_->Get(&c1, get, &p).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  grpc::ClientContext c2;
  get.set_id("00000000-0000-0000-0000-000000000000");
  EXPECT_EQ(pipelines_->Get(&c2, get, &p).error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::ClientContext c3;
  v1::ListPipelinesRequest list;
  list.set_state(static_cast<v1::PipelineState>(99));
  v1::ListPipelinesResponse lr;
  EXPECT_EQ(pipelines_->List(&c3, list, &lr).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  grpc::ClientContext c4;
  v1::AcquireJobRequest acq;
  acq.set_worker_id("00000000-0000-0000-0000-000000000000");
  v1::AcquireJobResponse ar;
  EXPECT_EQ(workers_->AcquireJob(&c4, acq, &ar).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(ServiceTest, SubmitIsIdempotentPerKey) {
  grpc::Status st;
  auto a = Submit(kSpec, "k1", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(a.created());
  auto b = Submit(kSpec, "k1", &st);
  ASSERT_TRUE(st.ok());
  EXPECT_FALSE(b.created());
  EXPECT_EQ(a.pipeline().id(), b.pipeline().id());
}

TEST_F(ServiceTest, LeaseFencingAndDependentsThroughTheApi) {
  grpc::Status st;
  auto sub = Submit(kSpec, "", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const std::string w1 = RegisterWorker("w1"), w2 = RegisterWorker("w2");
  auto j1 = Acquire(w1);
  ASSERT_TRUE(j1.has_job());
  EXPECT_EQ(j1.job().kind(), v1::JOB_KIND_BRANCH);
  EXPECT_EQ(j1.job().attempt(), 1);
  auto spec = nlohmann::json::parse(j1.job().spec_json());
  EXPECT_EQ(spec["seed"], "/models/seed");
  // Let the lease expire; the reaper requeues; another worker gets attempt 2.
  clock_.Advance(11s);
  ASSERT_TRUE(scheduler_.ReapOnce().ok());
  auto again = Acquire(w2);
  ASSERT_TRUE(again.has_job());
  auto other = again.job().job_id() == j1.job().job_id() ? again : Acquire(w2);
  // The stale completion from w1 is refused.
  EXPECT_EQ(Complete(w1, j1.job(), 1).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // Drain the two branches with w2, then merge becomes claimable at once.
  std::vector<v1::JobAssignment> held = {again.job()};
  if (other.job().job_id() != again.job().job_id()) held.push_back(other.job());
  while (held.size() < 2) {
    auto more = Acquire(w2);
    ASSERT_TRUE(more.has_job());
    held.push_back(more.job());
  }
  for (const auto& j : held) ASSERT_TRUE(Complete(w2, j, j.attempt()).ok()) << j.name();
  auto merge = Acquire(w2);
  ASSERT_TRUE(merge.has_job());
  EXPECT_EQ(merge.job().name(), "merge");
  auto mspec = nlohmann::json::parse(merge.job().spec_json());
  EXPECT_EQ(mspec["experts"].size(), 2u);
  EXPECT_EQ(mspec["experts"][0]["model"].get<std::string>().find("/tmp/btx-test-artifacts/"), 0u);
}

TEST_F(ServiceTest, LongPollWakesWhenAJobBecomesReady) {
  const std::string w = RegisterWorker("w1");
  std::promise<v1::AcquireJobResponse> got;
  std::thread poller([&] { got.set_value(Acquire(w, 20000)); });
  grpc::Status st;
  auto start = std::chrono::steady_clock::now();
  Submit(kSpec, "", &st);
  ASSERT_TRUE(st.ok());
  auto resp = got.get_future().get();
  poller.join();
  EXPECT_TRUE(resp.has_job());
  // Woken by the submit, not by the 20 s timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
}

TEST_F(ServiceTest, WatchStreamsEventsAndResumes) {
  grpc::Status st;
  auto sub = Submit(kSpec, "", &st);
  grpc::ClientContext ctx;
  v1::WatchRequest req;
  req.set_pipeline_id(sub.pipeline().id());
  auto reader = pipelines_->Watch(&ctx, req);
  v1::Event e;
  std::vector<v1::Event> events;
  while (reader->Read(&e)) events.push_back(e);
  ASSERT_TRUE(reader->Finish().ok());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events[0].type(), "pipeline.submitted");
  grpc::ClientContext ctx2;
  req.set_after_event_id(events[0].id());
  auto r2 = pipelines_->Watch(&ctx2, req);
  size_t n = 0;
  while (r2->Read(&e)) {
    EXPECT_GT(e.id(), events[0].id());
    ++n;
  }
  EXPECT_EQ(n, events.size() - 1);
}

TEST_F(ServiceTest, CancelReachesRunningJobThroughHeartbeat) {
  grpc::Status st;
  auto sub = Submit(kSpec, "", &st);
  const std::string w = RegisterWorker("w1");
  auto j = Acquire(w);
  ASSERT_TRUE(j.has_job());
  grpc::ClientContext cctx;
  v1::CancelRequest creq;
  creq.set_id(sub.pipeline().id());
  v1::Pipeline p;
  ASSERT_TRUE(pipelines_->Cancel(&cctx, creq, &p).ok());
  EXPECT_EQ(p.state(), v1::PIPELINE_STATE_CANCELLED);
  grpc::ClientContext hctx;
  v1::HeartbeatRequest hb;
  hb.set_worker_id(w);
  auto* rep = hb.add_jobs();
  rep->set_job_id(j.job().job_id());
  rep->set_attempt(1);
  v1::HeartbeatResponse hr;
  ASSERT_TRUE(workers_->Heartbeat(&hctx, hb, &hr).ok());
  ASSERT_EQ(hr.jobs_size(), 1);
  EXPECT_EQ(hr.jobs(0).directive(), v1::JOB_DIRECTIVE_CANCEL);
}

}  // namespace
}  // namespace btx::scheduler
