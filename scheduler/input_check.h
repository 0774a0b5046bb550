// Submit-time checks of the files a pipeline names: every one must lie under the operator's data roots
// (a job must never read the worker's key or another user's data), and every one this scheduler can see
// must be usable (a seed without weights is refused now, not when its job starts).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "btx/storage/store.h"

namespace btx::scheduler {

// InvalidArgument with one field violation per bad input ("job <name>: <field>"), or OK.
absl::Status CheckJobInputs(const std::vector<storage::NewJob>& jobs, const std::vector<std::string>& data_roots);

// Absolute, normalised roots with symlinks resolved, or InvalidArgument naming the bad one.
absl::StatusOr<std::vector<std::string>> NormaliseDataRoots(const std::vector<std::string>& roots);

}  // namespace btx::scheduler
