// Ctrl-C without work in a signal handler: SIGINT and SIGTERM are blocked in every thread and one
// thread takes them with sigwait, then runs whatever the current command asked for (cancel the
// pipeline, end a stream, drain the workers). Child processes get a clean mask (see process.cc).
#pragma once

#include <functional>

namespace btx::cli {

class Signals {
 public:
  // Call first in main, before any thread exists, so that every thread inherits the mask.
  static void Install();
  // The action for later signals; count is 1 for the first signal, 2 for the second, ...
  static void SetAction(std::function<void(int count)> action);
  static void ClearAction();
  // Whether SIGINT/SIGTERM has arrived since Install.
  static bool Interrupted();
  static void Uninstall();
};

// Restores the previous (empty) action when a command returns.
class ScopedSignalAction {
 public:
  explicit ScopedSignalAction(std::function<void(int count)> action) { Signals::SetAction(std::move(action)); }
  ~ScopedSignalAction() { Signals::ClearAction(); }
};

}  // namespace btx::cli
