// Serves a Registry over HTTP for Prometheus: GET /metrics and GET /healthz.
#pragma once

#include <memory>
#include <string>

#include "btx/metrics/metrics.h"

namespace btx::metrics {

class Exposer {
 public:
  // Binds before returning, so port() is final and scrapes can connect at once. Port 0 picks
  // an ephemeral port. Throws std::runtime_error naming host:port when the bind fails. The
  // registry must outlive the exposer.
  Exposer(const Registry& registry, std::string host, int port);
  ~Exposer();  // stops serving and joins the server thread
  Exposer(const Exposer&) = delete;
  Exposer& operator=(const Exposer&) = delete;

  int port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace btx::metrics
