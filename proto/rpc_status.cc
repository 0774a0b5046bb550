#include "btx/rpc_status.h"

#include "google/rpc/status.pb.h"

namespace btx {

absl::Status InvalidFields(const std::vector<FieldViolation>& violations) {
  google::rpc::BadRequest bad_request;
  std::string message;
  for (const auto& v : violations) {
    auto* fv = bad_request.add_field_violations();
    fv->set_field(v.field);
    fv->set_description(v.description);
    if (!message.empty()) message += "; ";
    message += v.field + ": " + v.description;
  }
  absl::Status status = absl::InvalidArgumentError(message);
  status.SetPayload(kFieldViolationsPayload, absl::Cord(bad_request.SerializeAsString()));
  return status;
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  const auto code = static_cast<grpc::StatusCode>(static_cast<int>(status.code()));
  std::string message(status.message());
  if (auto payload = status.GetPayload(kFieldViolationsPayload)) {
    google::rpc::Status rich;
    rich.set_code(static_cast<int>(code));
    rich.set_message(message);
    auto* any = rich.add_details();
    any->set_type_url(kFieldViolationsPayload);
    any->set_value(std::string(*payload));
    return grpc::Status(code, message, rich.SerializeAsString());
  }
  return grpc::Status(code, message);
}

std::vector<FieldViolation> FieldViolationsOf(const grpc::Status& status) {
  std::vector<FieldViolation> out;
  google::rpc::Status rich;
  if (status.error_details().empty() || !rich.ParseFromString(status.error_details())) return out;
  for (const auto& any : rich.details()) {
    google::rpc::BadRequest bad_request;
    if (any.type_url() != kFieldViolationsPayload || !bad_request.ParseFromString(any.value())) continue;
    for (const auto& fv : bad_request.field_violations()) out.push_back({fv.field(), fv.description()});
  }
  return out;
}

}  // namespace btx
