// Helpers shared by the scheduler's integration tests.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <pqxx/pqxx>
#include <string>
#include <thread>

#include "btx/common/clock.h"
#include "btx/common/strings.h"
#include "btx/metrics/metrics.h"
#include "btx/scheduler/server.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "btx/v1/worker_service.grpc.pb.h"
#include "pg_fixture.h"

namespace btx::scheduler::testing {

// A five-job BTX pipeline: two branches, merge, finetune, eval.
inline const char* kDagSpec = R"(
name: dag
seed: {model: /models/seed}
experts:
  - {name: code, data: {train: [/d/code]}, steps: 3}
  - {name: math, data: {train: [/d/math]}, steps: 3}
evaluate: {baselines: []}
)";

// Prometheus text -> {"name{labels}": value}; comments skipped.
inline std::map<std::string, double> ParseExposition(const std::string& text) {
  std::map<std::string, double> out;
  for (const auto& line : Split(text, '\n', true)) {
    if (line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    out[line.substr(0, sp)] = std::stod(line.substr(sp + 1));
  }
  return out;
}

// Polls `done` until it holds or `timeout` passes; the state is read, never waited for blindly.
inline bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout,
                      std::chrono::milliseconds every = std::chrono::milliseconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(every);
  }
  return true;
}

inline int64_t QueryInt(const std::string& conninfo, const std::string& sql) {
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  return tx.exec(sql)[0][0].as<int64_t>();
}

inline std::string QueryText(const std::string& conninfo, const std::string& sql) {
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  return tx.exec(sql)[0][0].as<std::string>();
}

inline void Execute(const std::string& conninfo, const std::string& sql) {
  pqxx::connection c(conninfo);
  pqxx::nontransaction tx(c);
  tx.exec(sql);
}

// One scheduler serving gRPC on a loopback port (port 0) over a fresh, migrated database, with a
// manual clock: the test advances time and runs the reaper and the metrics refresh itself. The
// helpers are the worker's and the client's side of the API, one RPC each.
// A scheduler on its own connection pool and store: what every in-process scheduler test builds.
// With `with_metrics`, the scheduler registers its families in `registry` (serving them is the
// test's business).
struct SchedulerStack {
  SchedulerStack(const std::string& conninfo, int connections, const Clock& clock, SchedulerConfig config,
                 bool with_metrics)
      : pool(conninfo, connections),
        store(pool),
        scheduler(std::move(config), store, clock, conninfo, with_metrics ? &registry : nullptr) {}
  storage::ConnectionPool pool;
  storage::Store store;
  metrics::Registry registry;
  Scheduler scheduler;
};

class SchedulerFixture : public ::testing::Test {
 protected:
  explicit SchedulerFixture(bool with_metrics = false) : SchedulerFixture(TestConfig(), with_metrics) {}
  SchedulerFixture(SchedulerConfig config, bool with_metrics)
      : conninfo_(btx::testing::NewMigratedDatabase()), stack_(conninfo_, 8, clock_, std::move(config), with_metrics) {
    auto port = scheduler_.Start();
    EXPECT_TRUE(port.ok()) << port.status();
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port.ok() ? *port : 0),
                                   grpc::InsecureChannelCredentials());
    pipelines_ = v1::PipelineService::NewStub(channel_);
    workers_ = v1::WorkerService::NewStub(channel_);
  }

  static SchedulerConfig TestConfig() {
    SchedulerConfig c;
    c.artifact_root = "/tmp/btx-test-artifacts";
    c.lease = std::chrono::seconds(10);
    c.reap_interval = std::chrono::hours(1);    // the test drives the reaper
    c.metrics_refresh = std::chrono::hours(1);  // and the metrics refresh
    return c;
  }

  std::string RegisterWorker(const std::string& name, int slots = 1, int gpus = 0) {
    grpc::ClientContext ctx;
    v1::RegisterRequest req;
    req.set_name(name);
    req.mutable_capabilities()->set_slots(slots);
    req.mutable_capabilities()->set_gpus(gpus);
    v1::RegisterResponse resp;
    const grpc::Status st = workers_->Register(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.worker_id();
  }

  // Without `status`, the submission is expected to succeed.
  v1::SubmitResponse Submit(const std::string& spec, const std::string& key = "", grpc::Status* status = nullptr) {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_spec(spec);
    req.set_idempotency_key(key);
    v1::SubmitResponse resp;
    const grpc::Status st = pipelines_->Submit(&ctx, req, &resp);
    if (status != nullptr) {
      *status = st;
    } else {
      EXPECT_TRUE(st.ok()) << st.error_message();
    }
    return resp;
  }

  // The call itself is expected to succeed; whether a job came is the caller's to check.
  v1::AcquireJobResponse Acquire(const std::string& worker, int64_t wait_ms = 0) {
    grpc::ClientContext ctx;
    v1::AcquireJobRequest req;
    req.set_worker_id(worker);
    req.set_wait_timeout_ms(wait_ms);
    v1::AcquireJobResponse resp;
    const grpc::Status st = workers_->AcquireJob(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp;
  }

  grpc::Status Complete(const std::string& worker, const v1::JobAssignment& job, const std::string& result_json = "") {
    grpc::ClientContext ctx;
    v1::CompleteRequest req;
    req.set_worker_id(worker);
    req.set_job_id(job.job_id());
    req.set_attempt(job.attempt());
    req.set_artifact_uri(job.output_uri());
    req.set_result_json(result_json);
    v1::CompleteResponse resp;
    return workers_->Complete(&ctx, req, &resp);
  }

  grpc::Status Fail(const std::string& worker, const v1::JobAssignment& job, bool retryable,
                    const std::string& error = "boom") {
    grpc::ClientContext ctx;
    v1::FailRequest req;
    req.set_worker_id(worker);
    req.set_job_id(job.job_id());
    req.set_attempt(job.attempt());
    req.set_error(error);
    req.set_retryable(retryable);
    v1::FailResponse resp;
    return workers_->Fail(&ctx, req, &resp);
  }

  ManualClock clock_;
  std::string conninfo_;
  SchedulerStack stack_;
  storage::Store& store_ = stack_.store;
  metrics::Registry& registry_ = stack_.registry;
  Scheduler& scheduler_ = stack_.scheduler;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PipelineService::Stub> pipelines_;
  std::unique_ptr<v1::WorkerService::Stub> workers_;
};

}  // namespace btx::scheduler::testing
