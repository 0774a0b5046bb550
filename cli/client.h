// The PipelineService calls btxctl makes, with the bearer token attached, deadlines on unary calls,
// gRPC errors turned into one-line absl::Status messages (what failed, where, how to fix), and
// cancellation of everything in flight when the user presses Ctrl-C.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/common/clock.h"
#include "btx/common/tls.h"
#include "btx/rpc_status.h"
#include "btx/v1/pipeline_service.grpc.pb.h"

namespace btx::cli {

struct ClientConfig {
  std::string target;                                 // gRPC target, e.g. "127.0.0.1:50051"
  std::string display_target;                         // how errors name it (default: target)
  std::string token;                                  // sent as "authorization: Bearer <token>"
  tls::ClientOptions tls;                             // plaintext unless a TLS file is named
  bool tls_hints = true;  // unreachable errors suggest TLS fixes (not for the embedded stack)
  Duration timeout = std::chrono::seconds(30);        // per unary call
  Duration reconnect_for = std::chrono::seconds(60);  // streams resume for this long after a break
};

// gRPC status -> absl::Status with a message that names the server and says how to fix it; field
// violations ride along as the kFieldViolationsPayload (see ViolationsOf).
absl::Status FromGrpc(const grpc::Status& status, const std::string& what, const std::string& target);
// The field violations carried by an INVALID_ARGUMENT status (empty if none).
std::vector<FieldViolation> ViolationsOf(const absl::Status& status);

class Client {
 public:
  Client(std::shared_ptr<grpc::Channel> channel, ClientConfig config);
  // Fails only on unreadable or inconsistent TLS files; the connection itself is made lazily.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(ClientConfig config);

  absl::StatusOr<v1::SubmitResponse> Submit(const v1::SubmitRequest& request);
  absl::StatusOr<v1::Pipeline> GetPipeline(const std::string& id);
  // All pages up to `max` pipelines, newest first.
  absl::StatusOr<std::vector<v1::Pipeline>> ListPipelines(v1::PipelineState state, const std::string& name_prefix,
                                                          int max);
  absl::StatusOr<v1::Pipeline> Cancel(const std::string& id, const std::string& reason);
  absl::StatusOr<v1::Pipeline> Retry(const std::string& id);
  absl::StatusOr<std::vector<v1::Job>> ListJobs(const std::string& pipeline_id, v1::JobState state, int limit);
  absl::StatusOr<std::vector<v1::Worker>> ListWorkers();

  // Streams events to on_event until the stream ends (OK), on_event returns false (OK), or
  // CancelAll. A broken connection is resumed from the last event id for reconnect_for.
  absl::Status Watch(v1::WatchRequest request, const std::function<bool(const v1::Event&)>& on_event);
  // Same for a job's log lines (resumed from the last seq).
  absl::Status Logs(v1::LogsRequest request, const std::function<bool(const v1::LogLine&)>& on_line);

  // Pipeline by full id, unique id prefix, or name (the newest pipeline of that name).
  absl::StatusOr<std::string> ResolvePipelineId(const std::string& ref);
  // Job by full id or unique id prefix (among the newest 1000 jobs), or by name within a pipeline.
  absl::StatusOr<std::string> ResolveJobId(const std::string& ref, const std::string& pipeline_ref);

  // From any thread (the signal thread): ends every call in flight with CANCELLED, and makes
  // later calls fail the same way. Calls made with `AllowAfterCancel` still go through.
  void CancelAll();
  bool cancelled() const { return cancelled_.load(); }
  // Cancel (the RPC) must still work after Ctrl-C has cancelled the watch.
  absl::StatusOr<v1::Pipeline> CancelEvenIfInterrupted(const std::string& id, const std::string& reason);

  const ClientConfig& config() const { return config_; }

 private:
  class Call;  // registers a ClientContext for CancelAll for its lifetime
  absl::Status Begin(const char* what) const;
  absl::Status Error(const grpc::Status& s, const std::string& what) const;
  template <typename Req, typename Item>
  absl::Status Stream(const char* what, Req request, const std::function<bool(const Item&)>& on_item,
                      const std::function<void(Req&, const Item&)>& advance,
                      const std::function<std::unique_ptr<grpc::ClientReader<Item>>(grpc::ClientContext*, const Req&)>& open);

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::PipelineService::Stub> stub_;
  ClientConfig config_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::set<grpc::ClientContext*> in_flight_;
};

}  // namespace btx::cli
