#include "btx/common/status.h"

namespace btx {

absl::Status ToAbsl(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk: return absl::OkStatus();
    case StatusCode::kInvalidArgument: return absl::InvalidArgumentError(status.message());
    case StatusCode::kNotFound: return absl::NotFoundError(status.message());
    case StatusCode::kDataLoss: return absl::DataLossError(status.message());
    case StatusCode::kFailedPrecondition: return absl::FailedPreconditionError(status.message());
    case StatusCode::kCancelled: return absl::CancelledError(status.message());
    case StatusCode::kInternal: return absl::InternalError(status.message());
    case StatusCode::kUnavailable: return absl::UnavailableError(status.message());
  }
  return absl::InternalError(status.message());
}

}  // namespace btx
