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
#include "test_util.h"

namespace btx::scheduler {
namespace {
using namespace std::chrono_literals;
namespace v1 = btx::v1;

using testing::kDagSpec;
using testing::QueryText;

class ServiceTest : public testing::SchedulerFixture {};

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

// What btx-train would refuse is refused at submit, naming the pipeline's own field: nothing is stored.
TEST_F(ServiceTest, SubmitRefusesWhatTheTrainerWouldRefuse) {
  const std::string base = "name: x\nexperts: [{name: a, data: {train: [/x]}}]\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {base + "seed: {model: /m}\ntrain: {lr: 0}", "train.lr"},
      {base + "seed: {init: {preset: tiny, num_layers: 4, hidden_size: 96}, pretrain: {data: {train: /p}}}",
       "seed.init.num_layers"},
      {base + "seed: {model: /m}\nresources: {gpus_per_job: 65}", "resources.gpus_per_job"},
  };
  for (const auto& [spec, field] : cases) {
    grpc::Status st;
    Submit(spec, "", &st);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << spec;
    const auto v = FieldViolationsOf(st);
    ASSERT_EQ(v.size(), 1u) << st.error_message();
    EXPECT_EQ(v[0].field, field);
  }
  EXPECT_EQ(testing::QueryInt(conninfo_, "SELECT count(*) FROM pipelines"), 0);
  // The Hugging Face name is accepted, and the job btx-train gets says it.
  const auto ok = Submit(base + "seed: {init: {preset: tiny, num_hidden_layers: 4}, pretrain: {data: {train: /p}}}");
  const v1::Job* pretrain = nullptr;
  for (const auto& j : ok.pipeline().jobs()) {
    if (j.name() == "pretrain") pretrain = &j;
  }
  ASSERT_NE(pretrain, nullptr);
  EXPECT_EQ(nlohmann::json::parse(pretrain->spec_json())["init"]["num_hidden_layers"], 4);
}

// A rank group runs on one worker: a pipeline whose training jobs need more GPUs, or more CPU ranks
// (one CPU thread each), than the largest registered worker has is refused naming that worker; once
// one is big enough it is accepted, and its jobs carry their ranks to the worker.
TEST_F(ServiceTest, MultiRankJobsNeedAWorkerWithThatManyGpusOrCpuThreads) {
  auto register_worker = [&](const std::string& name, int gpus, int cpu_threads) {
    grpc::ClientContext ctx;
    v1::RegisterRequest req;
    req.set_name(name);
    req.mutable_capabilities()->set_slots(1);
    req.mutable_capabilities()->set_gpus(gpus);
    req.mutable_capabilities()->set_cpu_threads(cpu_threads);
    v1::RegisterResponse resp;
    EXPECT_TRUE(workers_->Register(&ctx, req, &resp).ok());
    return resp.worker_id();
  };
  register_worker("one-gpu", 1, 2);
  register_worker("wide-cpu", 0, 3);
  grpc::Status st;
  Submit(std::string(kDagSpec) + "resources: {gpus_per_job: 2}\n", "", &st);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find("'one-gpu', has 1 GPU"), std::string::npos) << st.error_message();
  Submit(std::string(kDagSpec) + "resources: {ranks_per_job: 4}\n", "", &st);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find("4 CPU ranks each (resources.ranks_per_job)"), std::string::npos) << st.error_message();
  EXPECT_NE(st.error_message().find("'wide-cpu', has 3 CPU threads"), std::string::npos) << st.error_message();

  const std::string big = register_worker("big-cpu", 0, 4);
  const auto accepted = Submit(std::string(kDagSpec) + "resources: {ranks_per_job: 4}\n", "", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const auto leased = Acquire(big);
  ASSERT_TRUE(leased.has_job());
  EXPECT_EQ(leased.job().resources().gpus(), 0);
  EXPECT_EQ(leased.job().resources().ranks(), leased.job().kind() == v1::JOB_KIND_BRANCH ? 4 : 1)
      << leased.job().name();
}

// A gang over gRPC: the first worker's poll offers it and holds nothing, the second's forms it (node 0),
// the first's next poll picks its member lease up; the rendezvous node 0 reports reaches node 1; a gang
// larger than the registered fleet is refused at submit.
TEST_F(ServiceTest, AGangIsLeasedToAllItsWorkersAtOnce) {
  const std::string a = RegisterWorker("a"), b = RegisterWorker("b");
  grpc::Status st;
  Submit(std::string(kDagSpec) + "resources: {nodes_per_job: 3}\n", "", &st);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find("span 3 workers at once (resources.nodes_per_job)"), std::string::npos)
      << st.error_message();
  EXPECT_NE(st.error_message().find("2 registered workers have (a, b)"), std::string::npos) << st.error_message();

  const auto p = Submit(std::string(kDagSpec) + "resources: {nodes_per_job: 2}\n", "", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_FALSE(Acquire(a).has_job());
  {
    grpc::ClientContext ctx;
    v1::GetPipelineRequest req;
    req.set_id(p.pipeline().id());
    v1::Pipeline got;
    ASSERT_TRUE(pipelines_->Get(&ctx, req, &got).ok());
    // The head gang says whom it waits for; the gangs queued after it say so.
    int head = 0, behind = 0;
    for (const auto& j : got.jobs()) {
      if (j.resources().nodes() != 2 || j.state() != v1::JOB_STATE_READY) continue;
      head += j.pending_reason().find("1 idle (a)") != std::string::npos;
      behind += j.pending_reason().find("queued behind the gang") != std::string::npos;
    }
    EXPECT_EQ(head, 1);
    EXPECT_GE(head + behind, 2);
  }
  const auto n0 = Acquire(b);
  ASSERT_TRUE(n0.has_job());
  EXPECT_EQ(n0.job().node_rank(), 0);
  EXPECT_EQ(n0.job().nodes(), 2);
  EXPECT_EQ(n0.job().resources().nodes(), 2);
  const auto n1 = Acquire(a);
  ASSERT_TRUE(n1.has_job());
  EXPECT_EQ(n1.job().job_id(), n0.job().job_id());
  EXPECT_EQ(n1.job().attempt(), n0.job().attempt());
  EXPECT_EQ(n1.job().node_rank(), 1);
  EXPECT_EQ(n1.job().output_uri(), n0.job().output_uri());

  auto beat = [&](const std::string& worker, const v1::JobAssignment& job, const std::string& rendezvous) {
    grpc::ClientContext ctx;
    v1::HeartbeatRequest req;
    req.set_worker_id(worker);
    auto* r = req.add_jobs();
    r->set_job_id(job.job_id());
    r->set_attempt(job.attempt());
    r->set_rendezvous(rendezvous);
    v1::HeartbeatResponse resp;
    grpc::Status s = workers_->Heartbeat(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.jobs_size() == 1 ? resp.jobs(0) : v1::JobStatus();
  };
  EXPECT_EQ(beat(a, n1.job(), "").rendezvous(), "");
  EXPECT_EQ(beat(b, n0.job(), "127.0.0.1:4242").directive(), v1::JOB_DIRECTIVE_CONTINUE);
  const auto st1 = beat(a, n1.job(), "");
  EXPECT_EQ(st1.directive(), v1::JOB_DIRECTIVE_CONTINUE);
  EXPECT_EQ(st1.rendezvous(), "127.0.0.1:4242");
  {
    grpc::ClientContext ctx;
    v1::HeartbeatRequest req;
    req.set_worker_id(b);
    auto* r = req.add_jobs();
    r->set_job_id(n0.job().job_id());
    r->set_attempt(n0.job().attempt());
    r->set_rendezvous("no port; rm -rf /");
    v1::HeartbeatResponse resp;
    auto s = workers_->Heartbeat(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("jobs[0].rendezvous"), std::string::npos) << s.error_message();
  }
  grpc::ClientContext ctx;
  v1::ListJobsRequest req;
  req.set_pipeline_id(p.pipeline().id());
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(pipelines_->ListJobs(&ctx, req, &jobs).ok());
  for (const auto& j : jobs.jobs()) {
    if (j.id() != n0.job().job_id()) continue;
    ASSERT_EQ(j.members_size(), 2);
    EXPECT_EQ(j.members(0).worker_name(), "b");
    EXPECT_EQ(j.members(1).worker_name(), "a");
    EXPECT_EQ(j.rendezvous(), "127.0.0.1:4242");
  }
}

// A pipeline whose jobs no registered worker has the GPUs for would wait forever: refused, naming the
// largest worker. With no worker registered yet it is accepted and waits for one.
TEST_F(ServiceTest, APipelineNoRegisteredWorkerCanRunIsRefused) {
  const std::string gpu_spec = std::string(kDagSpec) + "resources: {gpus_per_job: 1}\n";
  grpc::Status st;
  const auto waiting = Submit(gpu_spec, "before-any-worker", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(waiting.created());
  clock_.Advance(1s);  // claims go oldest pipeline first

  const std::string cpu = RegisterWorker("cpu-node", 2, 0);
  RegisterWorker("small-cpu-node", 1, 0);
  Submit(gpu_spec, "", &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << st.error_message();
  EXPECT_NE(st.error_message().find("'cpu-node'"), std::string::npos) << st.error_message();
  EXPECT_NE(st.error_message().find("has 0 GPUs"), std::string::npos) << st.error_message();
  EXPECT_NE(st.error_message().find("resources.gpus_per_job"), std::string::npos) << st.error_message();
  // A dry run is told the same; CPU jobs are for any worker.
  {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_spec(gpu_spec);
    req.set_dry_run(true);
    v1::SubmitResponse resp;
    EXPECT_EQ(pipelines_->Submit(&ctx, req, &resp).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  const auto cpu_jobs = Submit(kDagSpec, "cpu-jobs", &st);
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(testing::QueryInt(conninfo_, "SELECT count(*) FROM pipelines"), 2);

  // Once a worker with a GPU has registered, the same pipeline is accepted, and that worker runs it.
  const std::string gpu = RegisterWorker("gpu-node", 1, 1);
  Submit(gpu_spec, "", &st);
  EXPECT_TRUE(st.ok()) << st.error_message();
  grpc::ClientContext ctx;
  v1::AcquireJobRequest req;
  req.set_worker_id(gpu);
  req.set_free_gpus(1);
  v1::AcquireJobResponse resp;
  ASSERT_TRUE(workers_->AcquireJob(&ctx, req, &resp).ok());
  ASSERT_TRUE(resp.has_job());
  EXPECT_EQ(resp.job().pipeline_id(), waiting.pipeline().id());
  // A worker without GPUs only ever gets the CPU pipeline's jobs.
  const auto on_cpu = Acquire(cpu);
  ASSERT_TRUE(on_cpu.has_job());
  EXPECT_EQ(on_cpu.job().pipeline_id(), cpu_jobs.pipeline().id());
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
  auto a = Submit(kDagSpec, "k1", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(a.created());
  auto b = Submit(kDagSpec, "k1", &st);
  ASSERT_TRUE(st.ok());
  EXPECT_FALSE(b.created());
  EXPECT_EQ(a.pipeline().id(), b.pipeline().id());
}

TEST_F(ServiceTest, LeaseFencingAndDependentsThroughTheApi) {
  grpc::Status st;
  auto sub = Submit(kDagSpec, "", &st);
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
  EXPECT_EQ(Complete(w1, j1.job()).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // Drain the two branches with w2, then merge becomes claimable at once.
  std::vector<v1::JobAssignment> held = {again.job()};
  if (other.job().job_id() != again.job().job_id()) held.push_back(other.job());
  while (held.size() < 2) {
    auto more = Acquire(w2);
    ASSERT_TRUE(more.has_job());
    held.push_back(more.job());
  }
  for (const auto& j : held) ASSERT_TRUE(Complete(w2, j).ok()) << j.name();
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
  Submit(kDagSpec, "", &st);
  ASSERT_TRUE(st.ok());
  auto resp = got.get_future().get();
  poller.join();
  EXPECT_TRUE(resp.has_job());
  // Woken by the submit, not by the 20 s timeout.
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
}

// A long poll the worker cancelled must not take a job with it: it would stay leased to nobody until its
// lease expired, and cost an attempt. (Without the check the cancelled poll and the live one race for it.)
TEST_F(ServiceTest, ACancelledLongPollLeavesTheJobToOthersWithItsAttemptBudget) {
  const std::string gone = RegisterWorker("gone"), live = RegisterWorker("live");
  grpc::ClientContext ctx;
  v1::AcquireJobRequest req;
  req.set_worker_id(gone);
  req.set_wait_timeout_ms(20000);
  v1::AcquireJobResponse ignored;
  std::promise<grpc::Status> cancelled;
  std::thread poller([&] { cancelled.set_value(workers_->AcquireJob(&ctx, req, &ignored)); });
  ctx.TryCancel();
  EXPECT_EQ(cancelled.get_future().get().error_code(), grpc::StatusCode::CANCELLED);
  poller.join();
  Submit(kDagSpec);
  const auto got = Acquire(live, 20000);
  ASSERT_TRUE(got.has_job());
  EXPECT_EQ(QueryText(conninfo_, "SELECT worker_id::text FROM jobs WHERE id = '" + got.job().job_id() + "'"), live);
  // Handed back as an interruption, if claimed at all: the budget is whole.
  EXPECT_EQ(testing::QueryInt(conninfo_, "SELECT count(*) FROM jobs WHERE max_attempts - attempt < 2 AND attempt > 0 "
                                         "AND id = '" + got.job().job_id() + "'"), 0);
}

TEST_F(ServiceTest, WatchStreamsEventsAndResumes) {
  grpc::Status st;
  auto sub = Submit(kDagSpec, "", &st);
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

// A long reason (or a worker's error) is cut at a character boundary, never inside one: half a character would
// be invalid UTF-8 in the database and in every later Get of the pipeline.
TEST_F(ServiceTest, LongCancelReasonsAndErrorsAreCutBetweenCharacters) {
  grpc::Status st;
  auto sub = Submit(kDagSpec, "", &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const std::string w = RegisterWorker("w1");
  auto j = Acquire(w);
  ASSERT_TRUE(j.has_job());
  grpc::ClientContext fctx;
  v1::FailRequest freq;
  freq.set_worker_id(w);
  freq.set_job_id(j.job().job_id());
  freq.set_attempt(j.job().attempt());
  freq.set_error(std::string(8191, 'e') + "\xc3\xa9 and more");  // 'é' straddles byte 8192
  v1::FailResponse fresp;
  ASSERT_TRUE(workers_->Fail(&fctx, freq, &fresp).ok());
  grpc::ClientContext cctx;
  v1::CancelRequest creq;
  creq.set_id(sub.pipeline().id());
  creq.set_reason(std::string(1023, 'r') + "\xc3\xa9");  // likewise at byte 1024
  v1::Pipeline p;
  grpc::Status cancelled = pipelines_->Cancel(&cctx, creq, &p);
  ASSERT_TRUE(cancelled.ok()) << cancelled.error_message();
  grpc::ClientContext gctx;
  v1::GetPipelineRequest greq;
  greq.set_id(sub.pipeline().id());
  v1::Pipeline got;
  grpc::Status read = pipelines_->Get(&gctx, greq, &got);
  ASSERT_TRUE(read.ok()) << read.error_message();
  // The job's error keeps every whole character that fits: 8191 bytes, without the half 'é'.
  bool found = false;
  for (const auto& job : got.jobs()) {
    if (job.id() != j.job().job_id()) continue;
    found = true;
    EXPECT_EQ(job.error(), std::string(8191, 'e'));
  }
  EXPECT_TRUE(found);
}

TEST_F(ServiceTest, CancelReachesRunningJobThroughHeartbeat) {
  grpc::Status st;
  auto sub = Submit(kDagSpec, "", &st);
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

// A claimed job whose parent's artifact cannot be resolved can never run: its attempt fails for
// good with the reason stored on the job, and the same long poll goes on to hand out other work
// instead of sending the worker an error.
TEST_F(ServiceTest, UnresolvableArtifactFailsTheJobAndTheLongPollGoesOn) {
  const auto broken = Submit(kDagSpec, "broken");
  const std::string w = RegisterWorker("w1");
  const auto first = Acquire(w), second = Acquire(w);
  ASSERT_TRUE(first.has_job() && second.has_job());
  ASSERT_TRUE(Complete(w, first.job()).ok());
  // What a restored backup or a hand edit could leave behind: the parent finished, but its
  // artifact URI no longer passes the scheduler's checks.
  testing::Execute(conninfo_, Cat("UPDATE jobs SET artifact_uri = 'file:///tmp/btx-test-artifacts/../etc' WHERE id = '",
                                  first.job().job_id(), "'"));

  std::promise<v1::AcquireJobResponse> got;
  std::thread poller([&] { got.set_value(Acquire(w, 20000)); });
  // Completing the last branch makes the merge claimable: the poll claims it and must fail it.
  ASSERT_TRUE(Complete(w, second.job()).ok());
  const std::string merge_state = Cat("SELECT state FROM jobs WHERE pipeline_id = '", broken.pipeline().id(),
                                      "' AND name = 'merge'");
  ASSERT_TRUE(testing::PollUntil([&] { return QueryText(conninfo_, merge_state) == "FAILED"; }, 15s))
      << QueryText(conninfo_, merge_state);
  // The poll is still open: new work reaches this worker through it.
  const auto next = Submit(kDagSpec, "next");
  auto resp = got.get_future().get();
  poller.join();
  ASSERT_TRUE(resp.has_job());
  EXPECT_EQ(resp.job().pipeline_id(), next.pipeline().id());
  EXPECT_EQ(resp.job().kind(), v1::JOB_KIND_BRANCH);

  grpc::ClientContext ctx;
  v1::ListJobsRequest req;
  req.set_pipeline_id(broken.pipeline().id());
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(pipelines_->ListJobs(&ctx, req, &jobs).ok());
  const v1::Job* merge = nullptr;
  for (const auto& j : jobs.jobs()) {
    if (j.name() == "merge") merge = &j;
  }
  ASSERT_NE(merge, nullptr);
  EXPECT_EQ(merge->state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(merge->attempt(), 1);
  EXPECT_NE(merge->error().find(first.job().name()), std::string::npos) << merge->error();
  EXPECT_NE(merge->error().find(".."), std::string::npos) << merge->error();
  // Not retryable: another attempt would find the same reference.
  EXPECT_EQ(testing::QueryInt(conninfo_, Cat("SELECT count(*) FROM job_attempts WHERE job_id = '", merge->id(),
                                             "' AND outcome = 'FAILED'")),
            1);
  grpc::ClientContext gctx;
  v1::GetPipelineRequest get;
  get.set_id(broken.pipeline().id());
  v1::Pipeline pipeline;
  ASSERT_TRUE(pipelines_->Get(&gctx, get, &pipeline).ok());
  EXPECT_EQ(pipeline.state(), v1::PIPELINE_STATE_FAILED);
}

}  // namespace
}  // namespace btx::scheduler
