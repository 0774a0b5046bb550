// The btx-train job runner (see docs/btx-train-protocol.md): parses JOB.json, runs the kind, publishes.
#pragma once

#include <atomic>
#include <string>

namespace btx {

inline constexpr int kExitOk = 0;
inline constexpr int kExitInvalidJob = 65;
inline constexpr int kExitInterrupted = 75;
inline constexpr int kExitFailed = 1;

// progress_fd < 0: no progress events. `stop` is raised by SIGTERM.
int RunJobFile(const std::string& job_path, int progress_fd, const std::atomic<bool>* stop);

}  // namespace btx
