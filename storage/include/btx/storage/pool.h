// A small connection pool: the scheduler serves many concurrent RPCs; each borrows a connection for
// one transaction. Broken connections are dropped and reopened, so a PostgreSQL restart heals.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <pqxx/pqxx>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace btx::storage {

class ConnectionPool {
 public:
  ConnectionPool(std::string conninfo, int size);

  class Lease {
   public:
    Lease(ConnectionPool* pool, std::unique_ptr<pqxx::connection> c) : pool_(pool), conn_(std::move(c)) {}
    Lease(Lease&& o) noexcept : pool_(std::exchange(o.pool_, nullptr)), conn_(std::move(o.conn_)) {}
    Lease& operator=(Lease&&) = delete;
    ~Lease();
    pqxx::connection& operator*() { return *conn_; }
    pqxx::connection* operator->() { return conn_.get(); }
    // The connection failed: do not return it to the pool.
    void Discard() { conn_.reset(); }

   private:
    ConnectionPool* pool_;
    std::unique_ptr<pqxx::connection> conn_;
  };

  absl::StatusOr<Lease> Acquire();
  const std::string& conninfo() const { return conninfo_; }

 private:
  void Return(std::unique_ptr<pqxx::connection> c);

  std::string conninfo_;
  int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<pqxx::connection>> idle_;
  int open_ = 0;
};

}  // namespace btx::storage
