#include "signals.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <thread>

namespace btx::cli {
namespace {

std::mutex g_mu;
std::function<void(int)> g_action;
std::atomic<int> g_count{0};
std::thread* g_thread = nullptr;
sigset_t g_set;

void Loop() {
  for (;;) {
    int sig = 0;
    if (sigwait(&g_set, &sig) != 0) continue;
    if (sig == SIGUSR2) return;  // Uninstall
    const int n = ++g_count;
    std::function<void(int)> action;
    {
      std::lock_guard lock(g_mu);
      action = g_action;
    }
    if (action) {
      action(n);
    } else if (n >= 2) {
      // Nothing registered to end the command gracefully and the user insists.
      ::_exit(130);
    }
  }
}

}  // namespace

void Signals::Install() {
  if (g_thread != nullptr) return;
  sigemptyset(&g_set);
  sigaddset(&g_set, SIGINT);
  sigaddset(&g_set, SIGTERM);
  sigaddset(&g_set, SIGUSR2);
  pthread_sigmask(SIG_BLOCK, &g_set, nullptr);
  g_thread = new std::thread(Loop);
}

void Signals::SetAction(std::function<void(int)> action) {
  std::lock_guard lock(g_mu);
  g_action = std::move(action);
}

void Signals::ClearAction() { SetAction(nullptr); }

bool Signals::Interrupted() { return g_count.load() > 0; }

void Signals::Uninstall() {
  if (g_thread == nullptr) return;
  pthread_kill(g_thread->native_handle(), SIGUSR2);
  g_thread->join();
  delete g_thread;
  g_thread = nullptr;
}

}  // namespace btx::cli
