// The one mapping from internal errors (absl::Status) to gRPC statuses.
#pragma once

#include <grpcpp/support/status.h>

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace btx {

// Field violations ride on the absl::Status as the payload kFieldViolationsPayload (a serialized
// google.rpc.BadRequest) and come out as gRPC rich-error details.
inline constexpr char kFieldViolationsPayload[] = "type.googleapis.com/google.rpc.BadRequest";

struct FieldViolation {
  std::string field;
  std::string description;
};

// INVALID_ARGUMENT naming each offending field; message is "field: description; ...".
absl::Status InvalidFields(const std::vector<FieldViolation>& violations);

grpc::Status ToGrpcStatus(const absl::Status& status);

// Client side: decodes the field violations of a rich error, if any.
std::vector<FieldViolation> FieldViolationsOf(const grpc::Status& status);

}  // namespace btx
