// Child processes behind an interface, so the worker's supervision logic can be tested with real
// short-lived programs and the launch itself swapped where needed.
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace btx {

// Members all have initializers so that designated initializers may name only what they set (-Wextra).
struct ProcessSpec {
  std::vector<std::string> argv{};  // argv[0] is the program path
  std::vector<std::pair<std::string, std::string>> env{};  // added to / overriding the parent's environment
  // Names of variables of the parent's environment the child must not get (credentials: secrets.h).
  std::vector<std::string> unset_env{};
  std::string working_dir{};
  bool capture_stdout = false;
  bool capture_stderr = false;
  bool progress_pipe = false;     // the child's fd 3 is the write end of a pipe we read
  std::string stdout_path{};      // append stdout here (when not captured); empty = inherit
  std::string stderr_path{};
  std::optional<uid_t> uid{};     // drop privileges before exec (running as root)
  std::optional<gid_t> gid{};
  bool new_session = true;        // own session + process group, so a signal reaches its children
  // SIGKILL the child when the launching thread's process dies (Linux PR_SET_PDEATHSIG): a worker
  // killed with -9 must not leave a trainer running on a job that will be leased to someone else.
  bool kill_with_parent = false;
};

class Process {
 public:
  virtual ~Process() = default;
  virtual pid_t pid() const = 0;
  // Read ends of the captured pipes, or -1. Owned by the Process.
  virtual int stdout_fd() const = 0;
  virtual int stderr_fd() const = 0;
  virtual int progress_fd() const = 0;
  // Signals the whole process group.
  virtual void Signal(int sig) = 0;
  // Blocks until exit. Returns the exit code, or 128 + signal number if killed by a signal.
  virtual int Wait() = 0;
  // Non-blocking; the exit code if it has exited.
  virtual std::optional<int> Poll() = 0;
};

class ProcessLauncher {
 public:
  virtual ~ProcessLauncher() = default;
  virtual absl::StatusOr<std::unique_ptr<Process>> Launch(const ProcessSpec& spec) = 0;
};

class PosixProcessLauncher final : public ProcessLauncher {
 public:
  absl::StatusOr<std::unique_ptr<Process>> Launch(const ProcessSpec& spec) override;
};

// Runs to completion, returning the exit code and the combined output (for short tools like initdb).
struct RunResult {
  int exit_code = -1;
  std::string output;
};
absl::StatusOr<RunResult> RunAndCapture(ProcessLauncher& launcher, ProcessSpec spec);

// Directory of the running executable (to find sibling binaries such as btx-train).
std::string SelfExeDir();

// The first executable file `name` in the directories of $PATH; empty when there is none.
std::string FindOnPath(const std::string& name);

// `name` next to the running executable, else the first on $PATH; empty when neither exists.
// Siblings win so that a build tree or an install prefix uses its own helpers (btx-train,
// btx-model-tool) rather than whichever version happens to be on PATH.
std::string FindSiblingExecutable(const std::string& name);

}  // namespace btx
