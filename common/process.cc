#include "btx/common/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "btx/common/strings.h"

extern char** environ;

namespace btx {
namespace {

int ExitCodeOf(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

class PosixProcess final : public Process {
 public:
  PosixProcess(pid_t pid, int out, int err, int progress) : pid_(pid), out_(out), err_(err), progress_(progress) {}
  ~PosixProcess() override {
    if (!exit_code_) {
      ::kill(-pid_, SIGKILL);
      Wait();
    }
    for (int fd : {out_, err_, progress_}) {
      if (fd >= 0) ::close(fd);
    }
  }
  pid_t pid() const override { return pid_; }
  int stdout_fd() const override { return out_; }
  int stderr_fd() const override { return err_; }
  int progress_fd() const override { return progress_; }
  void Signal(int sig) override {
    if (exit_code_) return;
    // Process group first (children of the child too); fall back to the pid alone.
    if (::kill(-pid_, sig) != 0) ::kill(pid_, sig);
  }
  int Wait() override {
    if (exit_code_) return *exit_code_;
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0) {
      if (errno != EINTR) return -1;
    }
    exit_code_ = ExitCodeOf(status);
    return *exit_code_;
  }
  std::optional<int> Poll() override {
    if (exit_code_) return exit_code_;
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) exit_code_ = ExitCodeOf(status);
    return exit_code_;
  }

 private:
  pid_t pid_;
  int out_, err_, progress_;
  std::optional<int> exit_code_;
};

absl::Status MakePipe(int fds[2]) {
  if (::pipe2(fds, O_CLOEXEC) != 0) return absl::InternalError(Cat("pipe: ", std::strerror(errno)));
  return absl::OkStatus();
}

// Only async-signal-safe calls between fork and exec.
[[noreturn]] void ChildFail(int report_fd, const char* what) {
  int err = errno;
  (void)!::write(report_fd, &err, sizeof(err));
  (void)!::write(report_fd, what, std::strlen(what));
  ::_exit(127);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Process>> PosixProcessLauncher::Launch(const ProcessSpec& spec) {
  if (spec.argv.empty()) return absl::InvalidArgumentError("process: empty argv");
  int out[2] = {-1, -1}, err[2] = {-1, -1}, prog[2] = {-1, -1}, report[2] = {-1, -1};
  auto close_all = [&] {
    for (int* p : {out, err, prog, report})
      for (int i = 0; i < 2; ++i)
        if (p[i] >= 0) ::close(p[i]);
  };
  if (spec.capture_stdout) if (auto s = MakePipe(out); !s.ok()) return s;
  if (spec.capture_stderr) if (auto s = MakePipe(err); !s.ok()) { close_all(); return s; }
  if (spec.progress_pipe) if (auto s = MakePipe(prog); !s.ok()) { close_all(); return s; }
  if (auto s = MakePipe(report); !s.ok()) { close_all(); return s; }

  // Everything the child needs is prepared before fork: no allocation after it.
  std::vector<std::string> env_storage;
  for (char** e = environ; *e; ++e) {
    std::string kv(*e);
    bool dropped = false;
    for (const auto& [k, v] : spec.env) dropped |= kv.rfind(k + "=", 0) == 0;
    for (const auto& k : spec.unset_env) dropped |= kv.rfind(k + "=", 0) == 0;
    if (!dropped) env_storage.push_back(std::move(kv));
  }
  for (const auto& [k, v] : spec.env) env_storage.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& s : env_storage) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_storage = spec.argv;
  std::vector<char*> argv;
  for (auto& s : argv_storage) argv.push_back(s.data());
  argv.push_back(nullptr);

  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    close_all();
    return absl::InternalError(Cat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    if (spec.new_session) ::setsid();
    // Move the progress pipe to fd 3 first: dup2 onto 0..2 below must not clobber it.
    if (spec.progress_pipe) {
      if (prog[1] == 3) {
        ::fcntl(3, F_SETFD, 0);
      } else if (::dup2(prog[1], 3) < 0) {
        ChildFail(report[1], "dup2 progress");
      }
    }
    if (spec.capture_stdout) {
      if (::dup2(out[1], 1) < 0) ChildFail(report[1], "dup2 stdout");
    } else if (!spec.stdout_path.empty()) {
      int fd = ::open(spec.stdout_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd < 0 || ::dup2(fd, 1) < 0) ChildFail(report[1], "open stdout file");
    }
    if (spec.capture_stderr) {
      if (::dup2(err[1], 2) < 0) ChildFail(report[1], "dup2 stderr");
    } else if (!spec.stderr_path.empty()) {
      int fd = ::open(spec.stderr_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd < 0 || ::dup2(fd, 2) < 0) ChildFail(report[1], "open stderr file");
    }
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    if (!spec.working_dir.empty() && ::chdir(spec.working_dir.c_str()) != 0) ChildFail(report[1], "chdir");
    if (spec.gid && ::setgid(*spec.gid) != 0) ChildFail(report[1], "setgid");
    if (spec.uid && ::setuid(*spec.uid) != 0) ChildFail(report[1], "setuid");
    ::signal(SIGPIPE, SIG_DFL);
    // A daemon that takes signals with sigwait blocks them in every thread; the child must not inherit that.
    if (spec.kill_with_parent) {
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) ChildFail(report[1], "prctl");
      if (::getppid() != parent) ::_exit(137);  // the parent died before prctl took effect
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(argv[0], argv.data(), envp.data());
    ChildFail(report[1], "exec");
  }
  // Parent: close write ends; the report pipe closes on exec (O_CLOEXEC) or carries the failure.
  for (int* p : {out, err, prog, report}) {
    if (p[1] >= 0) ::close(p[1]);
    p[1] = -1;
  }
  int child_errno = 0;
  char what[64] = {0};
  ssize_t n = ::read(report[0], &child_errno, sizeof(child_errno));
  if (n == sizeof(child_errno)) {
    (void)!::read(report[0], what, sizeof(what) - 1);
    ::close(report[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    close_all();
    return absl::FailedPreconditionError(
        Cat("cannot start '", spec.argv[0], "': ", what, ": ", std::strerror(child_errno)));
  }
  ::close(report[0]);
  return std::unique_ptr<Process>(new PosixProcess(pid, out[0], err[0], prog[0]));
}

absl::StatusOr<RunResult> RunAndCapture(ProcessLauncher& launcher, ProcessSpec spec) {
  spec.capture_stdout = true;
  spec.capture_stderr = true;
  auto proc = launcher.Launch(spec);
  if (!proc.ok()) return proc.status();
  RunResult result;
  pollfd fds[2] = {{(*proc)->stdout_fd(), POLLIN, 0}, {(*proc)->stderr_fd(), POLLIN, 0}};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (auto& p : fds) {
      if (p.fd < 0 || !(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = ::read(p.fd, buf, sizeof(buf));
      if (n > 0) {
        result.output.append(buf, n);
      } else if (n == 0 || errno != EINTR) {
        p.fd = -1;
        --open_fds;
      }
    }
  }
  result.exit_code = (*proc)->Wait();
  return result;
}

std::string SelfExeDir() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : p.parent_path().string();
}

std::string FindOnPath(const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos) return {};
  const char* path = std::getenv("PATH");
  // An empty PATH entry means the current directory; a daemon must not pick up whatever
  // binary happens to sit in its working directory.
  for (const std::string& dir : Split(path ? path : "", ':', true)) {
    const std::string candidate = Cat(dir, "/", name);
    std::error_code ec;
    if (::access(candidate.c_str(), X_OK) == 0 && std::filesystem::is_regular_file(candidate, ec)) return candidate;
  }
  return {};
}

std::string FindSiblingExecutable(const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos) return {};
  const std::string sibling = Cat(SelfExeDir(), "/", name);
  std::error_code ec;
  if (::access(sibling.c_str(), X_OK) == 0 && std::filesystem::is_regular_file(sibling, ec)) return sibling;
  return FindOnPath(name);
}

}  // namespace btx
