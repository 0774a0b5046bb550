#include "cli_test_util.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <thread>

#include "btx/common/fs.h"

namespace btx::cli::testing {

std::string MakeTestDir() {
  auto dir = MakeTempDir("btxctl-test-");
  if (!dir.ok()) throw std::runtime_error(std::string(dir.status().message()));
  ::chmod(dir->c_str(), 0755);
  return *dir;
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path) << contents;
}

bool WaitFor(const std::function<bool()>& done, int timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

Btxctl::Btxctl(const std::vector<std::string>& args, const EnvVars& env, const std::string& cwd) {
  // One empty HOME per test process, removed at exit.
  static const struct Home {
    std::string path = MakeTestDir();
    ~Home() { std::filesystem::remove_all(path); }
  } home_dir;
  const std::string& home = home_dir.path;
  io_ = MakeTestDir();
  ProcessSpec spec;
  spec.argv = {BTXCTL_PATH};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  spec.env = {{"HOME", home}, {"XDG_CONFIG_HOME", home + "/.config"}, {"BTX_CONFIG", ""}, {"BTX_SERVER", ""},
              {"BTX_TOKEN", ""}, {"BTX_STATE_DIR", ""}, {"BTX_TLS_CA", ""}, {"BTX_TLS_CERT", ""},
              {"BTX_TLS_KEY", ""}, {"BTX_TLS_SERVER_NAME", ""}};
  for (const auto& kv : env) {
    auto same = std::find_if(spec.env.begin(), spec.env.end(), [&](const auto& e) { return e.first == kv.first; });
    if (same != spec.env.end()) same->second = kv.second;
    else spec.env.push_back(kv);
  }
  spec.working_dir = cwd;
  spec.stdout_path = io_ + "/out";
  spec.stderr_path = io_ + "/err";
  PosixProcessLauncher launcher;
  auto child = launcher.Launch(spec);
  if (!child.ok()) throw std::runtime_error(std::string(child.status().message()));
  child_ = std::move(*child);
}

Btxctl::~Btxctl() {
  if (child_ && !child_->Poll()) {
    child_->Signal(SIGKILL);
    child_->Wait();
  }
  std::filesystem::remove_all(io_);
}

std::string Btxctl::out() const { return ReadFile(io_ + "/out").value_or(""); }
std::string Btxctl::err() const { return ReadFile(io_ + "/err").value_or(""); }
void Btxctl::Signal(int sig) { child_->Signal(sig); }

CliResult Btxctl::Wait(int timeout_s) {
  CliResult r;
  std::optional<int> code;
  if (!WaitFor([&] { return (code = child_->Poll()).has_value(); }, timeout_s)) {
    child_->Signal(SIGKILL);
    code = child_->Wait();
    r.err = "[killed after timeout]\n";
  }
  r.exit_code = *code;
  r.out = out();
  r.err += err();
  return r;
}

CliResult RunBtxctl(const std::vector<std::string>& args, const EnvVars& env, const std::string& cwd, int timeout_s) {
  return Btxctl(args, env, cwd).Wait(timeout_s);
}

}  // namespace btx::cli::testing
