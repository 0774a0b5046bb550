// Malformed API calls, one table: each gets the status and the field it names, and none of them changes
// the database — the leased job still completes normally afterwards.
#include <grpcpp/grpcpp.h>

#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "btx/rpc_status.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "test_util.h"

namespace btx::scheduler {
namespace {
namespace v1 = btx::v1;
using testing::kDagSpec;
using testing::QueryText;

struct BadCall {
  std::string what;
  std::function<grpc::Status()> call;
  grpc::StatusCode code;
  std::string field;  // expected in the field violations; empty: none required
};

class BadInputTest : public testing::SchedulerFixture {
 protected:
  // Everything a bad call could alter: jobs, attempts, events, pipelines, workers.
  std::string DatabaseDigest() {
    return QueryText(conninfo_,
                     "SELECT md5(concat_ws('|',"
                     " (SELECT string_agg(id::text || state || attempt, ',' ORDER BY id) FROM jobs),"
                     " (SELECT count(*) FROM job_attempts), (SELECT count(*) FROM events),"
                     " (SELECT string_agg(id::text || state, ',' ORDER BY id) FROM pipelines),"
                     " (SELECT count(*) FROM workers), (SELECT count(*) FROM job_logs)))");
  }
};

template <typename Req, typename Resp, typename Stub>
grpc::Status Call(Stub* stub, grpc::Status (Stub::*method)(grpc::ClientContext*, const Req&, Resp*), const Req& req) {
  grpc::ClientContext ctx;
  Resp resp;
  return (stub->*method)(&ctx, req, &resp);
}

TEST_F(BadInputTest, EachBadCallGetsItsStatusAndFieldAndChangesNothing) {
  Submit(kDagSpec);
  const std::string worker = RegisterWorker("w1");
  const v1::AcquireJobResponse leased = Acquire(worker);
  ASSERT_TRUE(leased.has_job());
  const v1::JobAssignment& job = leased.job();
  auto* p = pipelines_.get();
  auto* w = workers_.get();
  using PS = v1::PipelineService::Stub;
  using WS = v1::WorkerService::Stub;

  auto complete = [&](std::function<void(v1::CompleteRequest&)> edit) {
    v1::CompleteRequest r;
    r.set_worker_id(worker);
    r.set_job_id(job.job_id());
    r.set_attempt(job.attempt());
    r.set_artifact_uri(job.output_uri());
    edit(r);
    return Call<v1::CompleteRequest, v1::CompleteResponse>(w, &WS::Complete, r);
  };
  auto heartbeat = [&](std::function<void(v1::JobReport&)> edit, int reports = 1) {
    v1::HeartbeatRequest r;
    r.set_worker_id(worker);
    for (int i = 0; i < reports; ++i) {
      v1::JobReport* rep = r.add_jobs();
      rep->set_job_id(job.job_id());
      rep->set_attempt(job.attempt());
      edit(*rep);
    }
    return Call<v1::HeartbeatRequest, v1::HeartbeatResponse>(w, &WS::Heartbeat, r);
  };
  auto submit = [&](const std::string& spec, const std::string& key) {
    v1::SubmitRequest r;
    r.set_spec(spec);
    r.set_idempotency_key(key);
    return Call<v1::SubmitRequest, v1::SubmitResponse>(p, &PS::Submit, r);
  };
  auto get = [&](const std::string& id) {
    v1::GetPipelineRequest r;
    r.set_id(id);
    return Call<v1::GetPipelineRequest, v1::Pipeline>(p, &PS::Get, r);
  };

  const std::vector<BadCall> table = {
      {"pipeline id with path traversal", [&] { return get("../../etc/passwd"); },
       grpc::StatusCode::INVALID_ARGUMENT, "id"},
      {"unknown pipeline", [&] { return get("00000000-0000-0000-0000-000000000000"); },
       grpc::StatusCode::NOT_FOUND, ""},
      {"cancel with a bad id",
       [&] {
         v1::CancelRequest r;
         r.set_id("'; DROP TABLE jobs; --");
         return Call<v1::CancelRequest, v1::Pipeline>(p, &PS::Cancel, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "id"},
      {"negative page size",
       [&] {
         v1::ListPipelinesRequest r;
         r.set_page_size(-1);
         return Call<v1::ListPipelinesRequest, v1::ListPipelinesResponse>(p, &PS::List, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "page_size"},
      {"unknown pipeline state",
       [&] {
         v1::ListPipelinesRequest r;
         r.set_state(static_cast<v1::PipelineState>(99));
         return Call<v1::ListPipelinesRequest, v1::ListPipelinesResponse>(p, &PS::List, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "state"},
      {"negative job limit",
       [&] {
         v1::ListJobsRequest r;
         r.set_limit(-5);
         return Call<v1::ListJobsRequest, v1::ListJobsResponse>(p, &PS::ListJobs, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "limit"},
      {"job page token that no page gave",
       [&] {
         v1::ListJobsRequest r;
         r.set_page_token("'; --");
         return Call<v1::ListJobsRequest, v1::ListJobsResponse>(p, &PS::ListJobs, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "page_token"},
      {"unknown job state",
       [&] {
         v1::ListJobsRequest r;
         r.set_state(static_cast<v1::JobState>(-3));
         return Call<v1::ListJobsRequest, v1::ListJobsResponse>(p, &PS::ListJobs, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "state"},
      {"spec over the 1 MiB limit", [&] { return submit("# " + std::string(2 << 20, 'x'), ""); },
       grpc::StatusCode::INVALID_ARGUMENT, "spec"},
      {"message over the server's 4 MiB limit", [&] { return submit(std::string(5 << 20, '#'), ""); },
       grpc::StatusCode::RESOURCE_EXHAUSTED, ""},
      {"spec that is not valid UTF-8", [&] { return submit("name: \xff\xfe\n", ""); },
       grpc::StatusCode::INVALID_ARGUMENT, "spec"},
      {"idempotency key with spaces", [&] { return submit(kDagSpec, "a key"); },
       grpc::StatusCode::INVALID_ARGUMENT, "idempotency_key"},
      {"a learning rate btx-train would refuse", [&] { return submit(Cat(kDagSpec, "train: {lr: 0}\n"), ""); },
       grpc::StatusCode::INVALID_ARGUMENT, "train.lr"},
      {"a model size named as another tool names it",
       [&] {
         return submit("name: x\nseed: {init: {num_layers: 4}, pretrain: {data: {train: /p}}}\n"
                       "experts: [{name: a, data: {train: /x}}]\n", "");
       },
       grpc::StatusCode::INVALID_ARGUMENT, "seed.init.num_layers"},
      {"a job on more GPUs than a rank group may have",
       [&] { return submit(Cat(kDagSpec, "resources: {gpus_per_job: 65}\n"), ""); },
       grpc::StatusCode::INVALID_ARGUMENT, "resources.gpus_per_job"},
      {"CPU ranks and GPUs both given, differently",
       [&] { return submit(Cat(kDagSpec, "resources: {gpus_per_job: 2, ranks_per_job: 3}\n"), ""); },
       grpc::StatusCode::INVALID_ARGUMENT, "resources.ranks_per_job"},
      {"CPU ranks when no registered worker has the CPU threads",
       [&] { return submit(Cat(kDagSpec, "resources: {ranks_per_job: 2}\n"), ""); },
       grpc::StatusCode::FAILED_PRECONDITION, ""},
      {"GPU jobs when no registered worker has a GPU",
       [&] { return submit(Cat(kDagSpec, "resources: {gpus_per_job: 1}\n"), ""); },
       grpc::StatusCode::FAILED_PRECONDITION, ""},
      {"worker without a name",
       [&] {
         v1::RegisterRequest r;
         return Call<v1::RegisterRequest, v1::RegisterResponse>(w, &WS::Register, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "name"},
      {"worker with negative GPUs",
       [&] {
         v1::RegisterRequest r;
         r.set_name("w2");
         r.mutable_capabilities()->set_gpus(-1);
         return Call<v1::RegisterRequest, v1::RegisterResponse>(w, &WS::Register, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "capabilities"},
      {"acquire with negative free GPUs",
       [&] {
         v1::AcquireJobRequest r;
         r.set_worker_id(worker);
         r.set_free_gpus(-1);
         return Call<v1::AcquireJobRequest, v1::AcquireJobResponse>(w, &WS::AcquireJob, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "free_gpus"},
      {"acquire with a day-long poll",
       [&] {
         v1::AcquireJobRequest r;
         r.set_worker_id(worker);
         r.set_wait_timeout_ms(86'400'000);
         return Call<v1::AcquireJobRequest, v1::AcquireJobResponse>(w, &WS::AcquireJob, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "wait_timeout_ms"},
      {"heartbeat with too many reports", [&] { return heartbeat([](v1::JobReport&) {}, 65); },
       grpc::StatusCode::INVALID_ARGUMENT, "jobs"},
      {"checkpoint URI escaping the artifact root",
       [&] { return heartbeat([](v1::JobReport& r) { r.set_checkpoint_uri("file:///tmp/btx-test-artifacts/../../etc"); }); },
       grpc::StatusCode::INVALID_ARGUMENT, "jobs[0].checkpoint_uri"},
      {"heartbeat with too many log lines",
       [&] {
         return heartbeat([](v1::JobReport& r) {
           for (int i = 0; i < 2001; ++i) r.add_logs()->set_text("x");
         });
       },
       grpc::StatusCode::INVALID_ARGUMENT, "jobs[0].logs"},
      {"artifact outside the artifact root",
       [&] { return complete([](v1::CompleteRequest& r) { r.set_artifact_uri("file:///etc/passwd"); }); },
       grpc::StatusCode::INVALID_ARGUMENT, "artifact_uri"},
      {"artifact URI with path traversal",
       [&] {
         return complete([](v1::CompleteRequest& r) { r.set_artifact_uri("file:///tmp/btx-test-artifacts/../x"); });
       },
       grpc::StatusCode::INVALID_ARGUMENT, "artifact_uri"},
      {"the output of another job, inside the artifact root",
       [&] {
         return complete([&](v1::CompleteRequest& r) { r.set_artifact_uri(job.output_uri() + "/../../another-job/model"); });
       },
       grpc::StatusCode::INVALID_ARGUMENT, "artifact_uri"},
      {"a checkpoint outside the job's checkpoint dir",
       [&] {
         return heartbeat([&](v1::JobReport& r) { r.set_checkpoint_uri(job.output_uri() + "/../../another-job/checkpoints/x"); });
       },
       grpc::StatusCode::INVALID_ARGUMENT, "jobs[0].checkpoint_uri"},
      {"result that is not a JSON object",
       [&] { return complete([](v1::CompleteRequest& r) { r.set_result_json("[1, 2]"); }); },
       grpc::StatusCode::INVALID_ARGUMENT, "result_json"},
      {"result with a NUL character, which valid JSON may hold but the database cannot",
       [&] { return complete([](v1::CompleteRequest& r) { r.set_result_json(R"({"note": "a\u0000b"})"); }); },
       grpc::StatusCode::INVALID_ARGUMENT, "result_json"},
      {"complete for a later attempt", [&] { return complete([](v1::CompleteRequest& r) { r.set_attempt(99); }); },
       grpc::StatusCode::FAILED_PRECONDITION, ""},
      {"complete for a negative attempt", [&] { return complete([](v1::CompleteRequest& r) { r.set_attempt(-1); }); },
       grpc::StatusCode::FAILED_PRECONDITION, ""},
      {"fail with a job id that is not a UUID",
       [&] {
         v1::FailRequest r;
         r.set_worker_id(worker);
         r.set_job_id("job-1");
         return Call<v1::FailRequest, v1::FailResponse>(w, &WS::Fail, r);
       },
       grpc::StatusCode::INVALID_ARGUMENT, "job_id"},
  };

  const std::string before = DatabaseDigest();
  for (const BadCall& c : table) {
    SCOPED_TRACE(c.what);
    const grpc::Status st = c.call();
    EXPECT_EQ(st.error_code(), c.code) << st.error_message();
    EXPECT_FALSE(st.error_message().empty());
    if (!c.field.empty()) {
      bool found = false;
      for (const auto& v : FieldViolationsOf(st)) found = found || v.field == c.field;
      EXPECT_TRUE(found) << "no violation for field '" << c.field << "' in: " << st.error_message();
    }
  }
  EXPECT_EQ(DatabaseDigest(), before);
  // The lease the bad calls aimed at is intact: the real completion is accepted.
  const grpc::Status done = Complete(worker, job);
  EXPECT_TRUE(done.ok()) << done.error_message();
}

}  // namespace
}  // namespace btx::scheduler
