// LISTEN/NOTIFY: how one process tells every other process on the same database that something
// changed, so that long polls and watch streams on any scheduler replica wake at once.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "btx/common/clock.h"

namespace btx::storage {

// Channels NOTIFY'd on commit.
inline constexpr char kJobsChannel[] = "btx_jobs";      // a job may have become claimable
inline constexpr char kGangsChannel[] = "btx_gangs";    // a gang formed (migration 0008): members pick their leases up
inline constexpr char kEventsChannel[] = "btx_events";  // new events or log lines

// Sends NOTIFYs outside any transaction, on one connection opened on first use and reopened after
// an error. Not thread-safe: one sender per thread.
class NotifySender {
 public:
  explicit NotifySender(std::string conninfo);
  ~NotifySender();
  NotifySender(const NotifySender&) = delete;
  NotifySender& operator=(const NotifySender&) = delete;
  // One NOTIFY per channel, in one round trip. UNAVAILABLE when the database cannot be reached.
  absl::Status Notify(const std::vector<std::string>& channels);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// LISTENs on channels and calls each channel's handler, on the thread that calls Wait, once per
// notification received.
class NotifyListener {
 public:
  using Handlers = std::vector<std::pair<std::string, std::function<void()>>>;  // channel, handler
  NotifyListener(std::string conninfo, Handlers handlers);
  ~NotifyListener();
  NotifyListener(const NotifyListener&) = delete;
  NotifyListener& operator=(const NotifyListener&) = delete;
  // Connects and LISTENs if not connected yet, then waits up to max_wait for notifications. An error
  // (UNAVAILABLE: the database went away) drops the connection; the next call reconnects, and what
  // was committed meanwhile was not heard: callers treat an error as "anything may have changed".
  absl::Status Wait(Duration max_wait);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace btx::storage
