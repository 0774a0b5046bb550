#include "btx/storage/pool.h"

#include <sys/socket.h>

#include <cerrno>

#include "btx/common/strings.h"

namespace btx::storage {

ConnectionPool::ConnectionPool(std::string conninfo, int size) : conninfo_(std::move(conninfo)), size_(size) {}

ConnectionPool::Lease::~Lease() {
  // A discarded (null) connection still frees its slot.
  if (pool_) pool_->Return(std::move(conn_));
}

void ConnectionPool::Return(std::unique_ptr<pqxx::connection> c) {
  {
    std::lock_guard lock(mu_);
    if (c && c->is_open()) {
      idle_.push_back(std::move(c));
    } else {
      --open_;
    }
  }
  // Outside the lock: a waiter woken while we still hold it would only block again on the mutex
  // (with hundreds of RPC threads sharing a few connections, that is a context switch per call).
  cv_.notify_one();
}

namespace {

// An idle connection whose server went away (a PostgreSQL restart, pg_terminate_backend) still
// reports CONNECTION_OK: libpq learns otherwise only when it next reads the socket, and the first
// statement sent on it fails. Handed out, every such connection would cost one failed call after a
// restart, and a claim or completion (single statements outside a transaction) is not retried by
// the client library. So look first, without blocking: an idle session is owed nothing by the
// server, so the end of the stream, an error, or any unsolicited bytes (a dying server's FATAL,
// a rare notice) mean "replace it".
bool StillConnected(const pqxx::connection& c) {
  if (!c.is_open()) return false;
  const int fd = c.sock();
  if (fd < 0) return false;
  char byte;
  const ssize_t n = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

}  // namespace

absl::StatusOr<ConnectionPool::Lease> ConnectionPool::Acquire() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return !idle_.empty() || open_ < size_; });
  while (!idle_.empty()) {
    auto c = std::move(idle_.back());
    idle_.pop_back();
    lock.unlock();
    if (StillConnected(*c)) return Lease(this, std::move(c));
    c.reset();  // its slot is reused below for a fresh connection
    lock.lock();
    --open_;
  }
  ++open_;
  lock.unlock();
  try {
    return Lease(this, std::make_unique<pqxx::connection>(conninfo_));
  } catch (const std::exception& e) {
    std::lock_guard relock(mu_);
    --open_;
    cv_.notify_one();
    return absl::UnavailableError(Cat("database unavailable: ", e.what()));
  }
}

}  // namespace btx::storage
