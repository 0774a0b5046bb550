// Running the real btxctl binary from tests: separate stdout/stderr, a clean environment (no
// BTX_SERVER or config file from the developer's machine), and deadlines instead of hangs.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "btx/common/process.h"

namespace btx::cli::testing {

struct CliResult {
  int exit_code = -1;
  std::string out, err;
};

using EnvVars = std::vector<std::pair<std::string, std::string>>;

// A temp dir readable by everyone (the embedded PostgreSQL runs as another user under root).
std::string MakeTestDir();
void WriteFile(const std::string& path, const std::string& contents);

// Polls `done` until it holds or `timeout_s` passes; returns whether it held. For waiting on real
// state (a file's contents, a row in the database), never on time itself.
bool WaitFor(const std::function<bool()>& done, int timeout_s = 60);

// btxctl running in the background. HOME and XDG_CONFIG_HOME point at an empty dir and BTX_* are
// cleared unless `env` sets them.
class Btxctl {
 public:
  Btxctl(const std::vector<std::string>& args, const EnvVars& env = {}, const std::string& cwd = "");
  ~Btxctl();
  std::string out() const;  // stdout so far
  std::string err() const;
  void Signal(int sig);
  // Waits for the exit (killing it after timeout_s) and returns what it printed.
  CliResult Wait(int timeout_s = 120);

 private:
  std::string io_;
  std::unique_ptr<Process> child_;
};

CliResult RunBtxctl(const std::vector<std::string>& args, const EnvVars& env = {}, const std::string& cwd = "",
                    int timeout_s = 120);

}  // namespace btx::cli::testing
