#include "client.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <optional>
#include <thread>

#include "btx/common/strings.h"
#include "google/rpc/status.pb.h"

namespace btx::cli {
absl::Status FromGrpc(const grpc::Status& s, const std::string& what, const std::string& target) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = s.error_message();
  switch (s.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
      return absl::UnavailableError(Cat("cannot reach the scheduler at ", target, " (", msg,
                                        "); start it, or point --server / BTX_SERVER at a running one"));
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return absl::DeadlineExceededError(
          Cat(what, ": no answer from the scheduler at ", target, " in time; check that it is healthy"));
    case grpc::StatusCode::UNAUTHENTICATED:
      return absl::UnauthenticatedError(Cat(what, ": ", msg, "; pass a valid --token (or set BTX_TOKEN)"));
    case grpc::StatusCode::PERMISSION_DENIED:
      return absl::PermissionDeniedError(Cat(what, ": ", msg, "; use a token (or certificate) with that role"));
    case grpc::StatusCode::CANCELLED:
      return absl::CancelledError("interrupted");
    case grpc::StatusCode::INVALID_ARGUMENT: {
      absl::Status out = absl::InvalidArgumentError(Cat(what, ": ", msg));
      const auto violations = FieldViolationsOf(s);
      if (!violations.empty()) {
        out.SetPayload(kFieldViolationsPayload, *InvalidFields(violations).GetPayload(kFieldViolationsPayload));
      }
      return out;
    }
    default:
      return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.error_code())), Cat(what, ": ", msg));
  }
}

std::vector<FieldViolation> ViolationsOf(const absl::Status& status) {
  std::vector<FieldViolation> out;
  auto payload = status.GetPayload(kFieldViolationsPayload);
  if (!payload) return out;
  google::rpc::BadRequest bad;
  if (!bad.ParseFromString(std::string(*payload))) return out;
  for (const auto& fv : bad.field_violations()) out.push_back({fv.field(), fv.description()});
  return out;
}

// One RPC's context, registered so that CancelAll can reach it.
class Client::Call {
 public:
  Call(Client* client, Duration timeout, bool register_for_cancel = true) : client_(client) {
    if (!client_->config_.token.empty()) ctx.AddMetadata("authorization", "Bearer " + client_->config_.token);
    if (timeout.count() > 0) ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    if (!register_for_cancel) return;
    std::lock_guard lock(client_->mu_);
    if (client_->cancelled_) {
      refused = true;
      return;
    }
    client_->in_flight_.insert(&ctx);
    registered_ = true;
  }
  ~Call() {
    if (!registered_) return;
    std::lock_guard lock(client_->mu_);
    client_->in_flight_.erase(&ctx);
  }
  grpc::ClientContext ctx;
  bool refused = false;

 private:
  Client* client_;
  bool registered_ = false;
};

Client::Client(std::shared_ptr<grpc::Channel> channel, ClientConfig config)
    : channel_(std::move(channel)), stub_(v1::PipelineService::NewStub(channel_)), config_(std::move(config)) {
  if (config_.display_target.empty()) config_.display_target = config_.target;
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(ClientConfig config) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);  // a pipeline with many jobs and their specs
  auto credentials = tls::ChannelCredentials(config.tls, args);
  if (!credentials.ok()) return credentials.status();
  // No client keepalive pings: a server with default settings answers frequent pings on an idle
  // Watch with GOAWAY. A stream that breaks anyway is resumed (Stream below).
  auto channel = grpc::CreateCustomChannel(config.target, *credentials, args);
  return std::make_unique<Client>(std::move(channel), std::move(config));
}

absl::Status Client::Error(const grpc::Status& s, const std::string& what) const {
  if (s.error_code() == grpc::StatusCode::CANCELLED || cancelled_) return absl::CancelledError("interrupted");
  absl::Status out = FromGrpc(s, what, config_.display_target);
  if (out.code() != absl::StatusCode::kUnavailable || !config_.tls_hints) return out;
  // gRPC reports a failed handshake like any other unreachable server; say what to check.
  const std::string& m = s.error_message();
  const bool refused = m.find("refused") != std::string::npos;
  if (config_.tls.enabled() && !refused) {
    return absl::UnavailableError(Cat(out.message(),
                                      "; if the scheduler is up, the TLS handshake failed: check that --tls-ca holds the CA "
                                      "of the scheduler's certificate, that the certificate names the host in --server (or "
                                      "give --tls-server-name), and --tls-cert/--tls-key"));
  }
  if (!config_.tls.enabled() && !refused) {
    return absl::UnavailableError(Cat(out.message(), "; if the scheduler serves TLS, pass --tls-ca (or set BTX_TLS_CA)"));
  }
  return out;
}

void Client::CancelAll() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  for (auto* ctx : in_flight_) ctx->TryCancel();
}

#define BTX_UNARY(what, method, req, resp)                                 \
  Call call(this, config_.timeout);                                        \
  if (call.refused) return absl::CancelledError("interrupted");            \
  grpc::Status s = stub_->method(&call.ctx, req, &resp);                   \
  if (!s.ok()) return Error(s, what);

absl::StatusOr<v1::SubmitResponse> Client::Submit(const v1::SubmitRequest& request) {
  v1::SubmitResponse resp;
  BTX_UNARY("submit", Submit, request, resp);
  return resp;
}

absl::StatusOr<v1::Pipeline> Client::GetPipeline(const std::string& id) {
  v1::GetPipelineRequest req;
  req.set_id(id);
  v1::Pipeline resp;
  BTX_UNARY(Cat("get pipeline ", id), Get, req, resp);
  return resp;
}

absl::StatusOr<std::vector<v1::Pipeline>> Client::ListPipelines(v1::PipelineState state, const std::string& name_prefix,
                                                                int max) {
  std::vector<v1::Pipeline> out;
  v1::ListPipelinesRequest req;
  req.set_state(state);
  req.set_name_prefix(name_prefix);
  while (static_cast<int>(out.size()) < max) {
    req.set_page_size(std::min(500, max - static_cast<int>(out.size())));
    v1::ListPipelinesResponse resp;
    BTX_UNARY("list pipelines", List, req, resp);
    for (auto& p : *resp.mutable_pipelines()) out.push_back(std::move(p));
    if (resp.next_page_token().empty()) break;
    req.set_page_token(resp.next_page_token());
  }
  return out;
}

absl::StatusOr<v1::Pipeline> Client::Cancel(const std::string& id, const std::string& reason) {
  v1::CancelRequest req;
  req.set_id(id);
  req.set_reason(reason);
  v1::Pipeline resp;
  BTX_UNARY(Cat("cancel pipeline ", id), Cancel, req, resp);
  return resp;
}

absl::StatusOr<v1::Pipeline> Client::CancelEvenIfInterrupted(const std::string& id, const std::string& reason) {
  v1::CancelRequest req;
  req.set_id(id);
  req.set_reason(reason);
  v1::Pipeline resp;
  Call call(this, config_.timeout, /*register_for_cancel=*/false);
  grpc::Status s = stub_->Cancel(&call.ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s, Cat("cancel pipeline ", id), config_.display_target);
  return resp;
}

absl::StatusOr<v1::Pipeline> Client::Retry(const std::string& id) {
  v1::RetryRequest req;
  req.set_id(id);
  v1::Pipeline resp;
  BTX_UNARY(Cat("retry pipeline ", id), Retry, req, resp);
  return resp;
}

absl::StatusOr<std::vector<v1::Job>> Client::ListJobs(const std::string& pipeline_id, v1::JobState state, int limit) {
  std::vector<v1::Job> out;
  std::string token;
  // The server pages at most 1000 jobs at a time; follow its pages up to `limit`.
  do {
    v1::ListJobsRequest req;
    req.set_pipeline_id(pipeline_id);
    req.set_state(state);
    req.set_limit(std::min(1000, limit - static_cast<int>(out.size())));
    req.set_page_token(token);
    v1::ListJobsResponse resp;
    BTX_UNARY("list jobs", ListJobs, req, resp);
    out.insert(out.end(), resp.jobs().begin(), resp.jobs().end());
    token = resp.next_page_token();
  } while (!token.empty() && static_cast<int>(out.size()) < limit);
  return out;
}

absl::StatusOr<std::vector<v1::Worker>> Client::ListWorkers() {
  v1::ListWorkersRequest req;
  v1::ListWorkersResponse resp;
  BTX_UNARY("list workers", ListWorkers, req, resp);
  return std::vector<v1::Worker>(resp.workers().begin(), resp.workers().end());
}

#undef BTX_UNARY

template <typename Req, typename Item>
absl::Status Client::Stream(const char* what, Req request, const std::function<bool(const Item&)>& on_item,
                            const std::function<void(Req&, const Item&)>& advance,
                            const std::function<std::unique_ptr<grpc::ClientReader<Item>>(grpc::ClientContext*, const Req&)>& open) {
  bool received = false;
  auto backoff = std::chrono::milliseconds(250);
  // Since when the stream has been failing; a time point with a flag rather than an optional, which
  // GCC 12 takes for read before set.
  bool broken = false;
  std::chrono::steady_clock::time_point broken_since{};
  while (true) {
    grpc::Status status;
    {
      Call call(this, Duration(0));
      if (call.refused) return absl::CancelledError("interrupted");
      auto reader = open(&call.ctx, request);
      Item item;
      while (reader->Read(&item)) {
        received = true;
        broken = false;
        backoff = std::chrono::milliseconds(250);
        advance(request, item);
        if (!on_item(item)) {
          call.ctx.TryCancel();
          reader->Finish();
          return absl::OkStatus();
        }
      }
      status = reader->Finish();
    }
    if (status.ok()) return absl::OkStatus();
    if (cancelled_) return absl::CancelledError("interrupted");
    // Resume only a stream that was established: a first connection failure is reported at once.
    const bool transient = status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                           status.error_code() == grpc::StatusCode::INTERNAL;
    if (!received || !transient) return Error(status, what);
    const auto now = std::chrono::steady_clock::now();
    if (!broken) broken_since = now;
    broken = true;
    if (now - broken_since > config_.reconnect_for) return Error(status, what);
    // Wall-clock wait is the point here: we are waiting for a remote server to come back.
    std::this_thread::sleep_for(backoff);
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, std::chrono::seconds(5));
  }
}

absl::Status Client::Watch(v1::WatchRequest request, const std::function<bool(const v1::Event&)>& on_event) {
  return Stream<v1::WatchRequest, v1::Event>(
      "watch", std::move(request), on_event,
      [](v1::WatchRequest& r, const v1::Event& e) { r.set_after_event_id(e.id()); },
      [this](grpc::ClientContext* ctx, const v1::WatchRequest& r) { return stub_->Watch(ctx, r); });
}

absl::Status Client::Logs(v1::LogsRequest request, const std::function<bool(const v1::LogLine&)>& on_line) {
  return Stream<v1::LogsRequest, v1::LogLine>(
      "logs", std::move(request), on_line, [](v1::LogsRequest& r, const v1::LogLine& l) { r.set_after_seq(l.seq()); },
      [this](grpc::ClientContext* ctx, const v1::LogsRequest& r) { return stub_->Logs(ctx, r); });
}

absl::StatusOr<std::string> Client::ResolvePipelineId(const std::string& ref) {
  if (ref.empty()) return absl::InvalidArgumentError("expected a pipeline id or name, got ''");
  if (IsUuid(ref)) return ref;
  auto named = ListPipelines(v1::PIPELINE_STATE_UNSPECIFIED, ref, 500);
  if (!named.ok()) return named.status();
  for (const auto& p : *named) {
    if (p.name() == ref) return p.id();  // newest first
  }
  const bool hex_prefix = ref.find_first_not_of("0123456789abcdefABCDEF-") == std::string::npos;
  if (hex_prefix) {
    auto all = ListPipelines(v1::PIPELINE_STATE_UNSPECIFIED, "", 5000);
    if (!all.ok()) return all.status();
    std::vector<std::string> hits;
    for (const auto& p : *all) {
      if (p.id().rfind(ref, 0) == 0) hits.push_back(p.id());
    }
    if (hits.size() == 1) return hits[0];
    if (hits.size() > 1) {
      return absl::InvalidArgumentError(
          Cat("pipeline id prefix '", ref, "' matches ", hits.size(), " pipelines; give more characters"));
    }
  }
  return absl::NotFoundError(
      Cat("no pipeline with id or name '", ref, "' at ", config_.display_target, " (list them: btxctl get pipelines)"));
}

absl::StatusOr<std::string> Client::ResolveJobId(const std::string& ref, const std::string& pipeline_ref) {
  if (ref.empty()) return absl::InvalidArgumentError("expected a job id or name, got ''");
  if (IsUuid(ref)) return ref;
  std::string pipeline_id;
  if (!pipeline_ref.empty()) {
    auto p = ResolvePipelineId(pipeline_ref);
    if (!p.ok()) return p.status();
    pipeline_id = *p;
  }
  auto jobs = ListJobs(pipeline_id, v1::JOB_STATE_UNSPECIFIED, 1000);
  if (!jobs.ok()) return jobs.status();
  // Newest first: a bare name picks the job of that name in the newest pipeline.
  for (const auto& j : *jobs) {
    if (j.name() == ref) return j.id();
  }
  std::vector<std::string> hits;
  for (const auto& j : *jobs) {
    if (j.id().rfind(ref, 0) == 0) hits.push_back(j.id());
  }
  if (hits.size() == 1) return hits[0];
  if (hits.size() > 1) {
    return absl::InvalidArgumentError(Cat("job id prefix '", ref, "' matches ", hits.size(), " jobs; give more characters"));
  }
  return absl::NotFoundError(Cat("no job with id or name '", ref, "'",
                                 pipeline_ref.empty() ? "" : Cat(" in pipeline ", pipeline_ref), " at ",
                                 config_.display_target, " (list them: btxctl get jobs --pipeline ID)"));
}

}  // namespace btx::cli
