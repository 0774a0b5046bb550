#include "btx/storage/notify.h"

#include <pqxx/pqxx>

#include "btx/common/strings.h"

namespace btx::storage {
namespace {

class Receiver final : public pqxx::notification_receiver {
 public:
  Receiver(pqxx::connection_base& c, const std::string& channel, std::function<void()> on_notify)
      : notification_receiver(c, channel), on_notify_(std::move(on_notify)) {}
  void operator()(const std::string&, int) override { on_notify_(); }

 private:
  std::function<void()> on_notify_;
};

}  // namespace

struct NotifySender::Impl {
  std::string conninfo;
  std::unique_ptr<pqxx::connection> conn;
};

NotifySender::NotifySender(std::string conninfo) : impl_(std::make_unique<Impl>()) {
  impl_->conninfo = std::move(conninfo);
}
NotifySender::~NotifySender() = default;

absl::Status NotifySender::Notify(const std::vector<std::string>& channels) {
  if (channels.empty()) return absl::OkStatus();
  std::string sql;
  for (const auto& c : channels) sql += Cat("NOTIFY ", c, ";");
  try {
    if (!impl_->conn) impl_->conn = std::make_unique<pqxx::connection>(impl_->conninfo);
    pqxx::nontransaction(*impl_->conn).exec(sql);
    return absl::OkStatus();
  } catch (const std::exception& e) {
    impl_->conn.reset();
    return absl::UnavailableError(Cat("NOTIFY: ", e.what()));
  }
}

struct NotifyListener::Impl {
  std::string conninfo;
  Handlers handlers;
  // Receivers unregister from their connection when destroyed: declared after it, they go first.
  std::unique_ptr<pqxx::connection> conn;
  std::vector<std::unique_ptr<Receiver>> receivers;

  void Drop() {
    receivers.clear();
    conn.reset();
  }
};

NotifyListener::NotifyListener(std::string conninfo, Handlers handlers) : impl_(std::make_unique<Impl>()) {
  impl_->conninfo = std::move(conninfo);
  impl_->handlers = std::move(handlers);
}

NotifyListener::~NotifyListener() { impl_->Drop(); }

absl::Status NotifyListener::Wait(Duration max_wait) {
  try {
    if (!impl_->conn) {
      impl_->conn = std::make_unique<pqxx::connection>(impl_->conninfo);
      for (const auto& [channel, handler] : impl_->handlers) {
        impl_->receivers.push_back(std::make_unique<Receiver>(*impl_->conn, channel, handler));
      }
    }
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(max_wait).count();
    impl_->conn->await_notification(static_cast<long>(us / 1'000'000), static_cast<long>(us % 1'000'000));
    return absl::OkStatus();
  } catch (const std::exception& e) {
    impl_->Drop();
    return absl::UnavailableError(Cat("LISTEN: ", e.what()));
  }
}

}  // namespace btx::storage
