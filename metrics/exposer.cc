// HTTP endpoint for scrapes, on cpp-httplib. The server runs on its own thread with a small
// pool: scrapes are rare and cheap, and a daemon should not spend a thread per core on them.
#include "btx/metrics/exposer.h"

#include <httplib.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace btx::metrics {

struct Exposer::Impl {
  httplib::Server server;
  int port = 0;
  std::atomic<bool> done{false};
  std::thread thread;
};

Exposer::Exposer(const Registry& registry, std::string host, int port)
    : impl_(std::make_unique<Impl>()) {
  auto& server = impl_->server;
  server.new_task_queue = [] { return new httplib::ThreadPool(2); };
  // httplib's default sets SO_REUSEPORT, which lets a second daemon bind the same port and
  // silently receive half the scrapes. SO_REUSEADDR alone still allows a quick restart.
  server.set_socket_options([](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  server.Get("/metrics", [&registry](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry.Serialize(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain; charset=utf-8");
  });

  errno = 0;
  const int bound = port == 0 ? server.bind_to_any_port(host)
                              : (server.bind_to_port(host, port) ? port : -1);
  if (bound < 0) {
    const int err = errno;
    std::string msg = "metrics exposer: cannot listen on " + host + ":" + std::to_string(port);
    if (err != 0) msg += std::string(": ") + std::strerror(err);
    throw std::runtime_error(msg);
  }
  impl_->port = bound;
  impl_->thread = std::thread([impl = impl_.get()] {
    impl->server.listen_after_bind();
    impl->done = true;
  });
}

Exposer::~Exposer() {
  // stop() is a no-op until the listen loop has started, so a destructor running right after
  // the constructor must wait for the loop (or its early exit) before stopping it.
  while (!impl_->server.is_running() && !impl_->done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  impl_->server.stop();
  impl_->thread.join();
}

int Exposer::port() const { return impl_->port; }

}  // namespace btx::metrics
