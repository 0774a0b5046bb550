// btxctl's exit codes (documented in docs/cli.md). Scripts branch on these, so they never change
// meaning: new situations get new numbers.
#pragma once

#include "absl/status/status.h"

namespace btx::cli {

enum ExitCode : int {
  kExitOk = 0,
  kExitFailed = 1,        // the pipeline failed or was cancelled elsewhere, or an unexpected error
  kExitUsage = 2,         // bad flags, unreadable file, or a spec/argument the server rejected
  kExitUnreachable = 3,   // no scheduler at --server, or the embedded stack could not start
  kExitNotFound = 4,      // no such pipeline, job or worker
  kExitRefused = 5,       // the server refused the request in the current state, or the token
  kExitInterrupted = 130  // Ctrl-C (SIGINT) or SIGTERM
};

// The exit code for an error status (OK maps to kExitOk).
int ExitCodeFor(const absl::Status& status);

}  // namespace btx::cli
