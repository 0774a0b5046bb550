#include "btx/storage/pool.h"

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

absl::StatusOr<ConnectionPool::Lease> ConnectionPool::Acquire() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return !idle_.empty() || open_ < size_; });
  if (!idle_.empty()) {
    auto c = std::move(idle_.back());
    idle_.pop_back();
    return Lease(this, std::move(c));
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
