// The one bridge from the contract's Status (what the trainer side and the contract library use: they must
// build without absl) to absl::Status (what the services use inside, mapped to gRPC codes in proto/).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "btx/contract/status.h"

namespace btx {

absl::Status ToAbsl(const Status& status);

template <typename T>
absl::StatusOr<T> ToAbsl(StatusOr<T> value) {
  if (!value.ok()) return ToAbsl(value.status());
  return std::move(value).value();
}

}  // namespace btx
