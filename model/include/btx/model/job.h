// The btx-train job runner (see docs/btx-train-protocol.md): parses JOB.json, runs the kind, publishes.
#pragma once

#include <atomic>
#include <string>

#include "btx/contract/job.h"

namespace btx::model {

using contract::kExitFailed;
using contract::kExitInterrupted;
using contract::kExitInvalidJob;
using contract::kExitOk;

// progress_fd < 0: no progress events. `stop` is raised by SIGTERM.
int RunJobFile(const std::string& job_path, int progress_fd, const std::atomic<bool>* stop);

}  // namespace btx::model
