// Watch and Logs followers on a shared cluster (docs/reliability.md, "Followers"):
//  - caps on open streams, per caller and per replica, so that one user cannot hold every thread;
//  - a database budget of their own (a small pool beside the one heartbeats and claims use), so that
//    thousands of followers can never delay a heartbeat past its lease;
//  - one shared reader per followed pipeline (or job): one query per wake-up hands new rows to every
//    follower of it, each keeping its own cursor, instead of one identical query per follower.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/scheduler/server.h"
#include "btx/storage/pool.h"
#include "btx/storage/store.h"

namespace btx::scheduler {

// Rows a feed keeps for followers that are a little behind; one further behind reads the database itself.
inline constexpr size_t kFeedWindow = 2000;

// What one shared reader has read of a pipeline's events or of a job's log. Rows are in id order and
// hold every row with an id in (base, cursor] that the reads saw.
template <typename Row>
struct Feed {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Row> rows;
  int64_t base = 0, cursor = 0;
  // Logs: the job had ended when the rows up to `cursor` were read, so there will be no more.
  bool ended = false;
  absl::Status error;    // the last read's, handed to the followers (a database outage ends their streams)
  uint64_t version = 0;  // bumped by every read that changed anything above
  bool full_page = false;  // the last read filled its page: read again without waiting for a wake-up
  // Guarded by Followers::mu_.
  int followers = 0;

  // Appends rows read after `cursor`; keeps at most kFeedWindow.
  void Append(std::vector<Row> fresh) {
    for (auto& r : fresh) {
      if (r.id <= cursor) continue;
      cursor = r.id;
      rows.push_back(std::move(r));
    }
    while (rows.size() > kFeedWindow) {
      base = rows.front().id;
      rows.pop_front();
    }
  }
};

using EventFeed = Feed<storage::EventRecord>;
using LogFeed = Feed<storage::LogRecord>;

class Followers {
 public:
  // Opens its own pool of `config.follower_db_connections` connections to `conninfo`.
  Followers(const SchedulerConfig& config, std::string conninfo, WakeUps& wakeups, const std::atomic<bool>& stopping);
  ~Followers();
  void Start();  // the shared reader's thread
  void Stop();   // wakes every follower (they end with UNAVAILABLE) and joins the thread

  // One open stream: holds its place under the caps until destroyed.
  class Slot {
   public:
    Slot(Followers* f, std::string user) : f_(f), user_(std::move(user)) {}
    Slot(Slot&& o) noexcept : f_(std::exchange(o.f_, nullptr)), user_(std::move(o.user_)) {}
    Slot& operator=(Slot&&) = delete;
    ~Slot();

   private:
    Followers* f_;
    std::string user_;
  };
  // RESOURCE_EXHAUSTED when `user` already holds max_streams_per_user streams, or this replica
  // max_streams; the message says how many, the cap and the flag that sets it.
  absl::StatusOr<Slot> Open(const std::string& user);
  int open_streams();
  // Stop() was called: followers end their streams.
  bool stopped() const { return stop_ || stopping_; }

  // A follower's place in a feed: the feed stays while one follower holds it.
  template <typename Row>
  class Membership {
   public:
    Membership(Followers* f, std::string key, std::shared_ptr<Feed<Row>> feed)
        : f_(f), key_(std::move(key)), feed_(std::move(feed)) {}
    Membership(Membership&& o) noexcept
        : f_(std::exchange(o.f_, nullptr)), key_(std::move(o.key_)), feed_(std::move(o.feed_)) {}
    Membership& operator=(Membership&&) = delete;
    ~Membership() {
      if (f_) f_->Leave(key_, feed_.get());
    }
    Feed<Row>& operator*() { return *feed_; }
    Feed<Row>* operator->() { return feed_.get(); }

   private:
    Followers* f_;
    std::string key_;
    std::shared_ptr<Feed<Row>> feed_;
  };
  // The feed of a pipeline's events (`pipeline_id` empty: every pipeline `owner` sees, none: all),
  // created at `after` when nobody follows it yet. The caller has checked the pipeline is visible.
  Membership<storage::EventRecord> JoinEvents(const std::string& pipeline_id, const std::optional<std::string>& owner,
                                              int64_t after);
  Membership<storage::LogRecord> JoinLogs(const std::string& job_id, int64_t after);

  // Reads for a stream's own checks and catch-up, on the followers' pool (counted in queries()).
  absl::StatusOr<storage::PipelineRecord> GetPipeline(const std::string& id);
  absl::StatusOr<storage::JobRecord> GetJob(const std::string& id);
  absl::StatusOr<std::vector<storage::EventRecord>> EventsAfter(const std::string& pipeline_id, int64_t after, int limit,
                                                                const std::optional<std::string>& owner);
  absl::StatusOr<std::vector<storage::LogRecord>> LogsAfter(const std::string& job_id, int64_t after, int limit);

  // One pass of the shared reader over every feed with followers (its thread loops on this).
  // Returns whether a feed filled its page (more is waiting).
  bool ReadOnce();

  // For tests and the benchmark.
  uint64_t queries() const { return queries_; }  // every statement run on the followers' pool
  uint64_t feed_reads() const { return feed_reads_; }  // reads by the shared reader, one per feed per pass
  uint64_t passes() const { return passes_; }
  size_t feeds();
  int members();  // followers reading from feeds (past their catch-up)

  static constexpr int kEventPage = 500;
  static constexpr int kLogPage = 1000;

 private:
  friend class Slot;
  void Close(const std::string& user);
  void Leave(const std::string& key, const void* feed);
  void Loop();
  // Wakes the reader: a new feed must not wait for the next commit to be read.
  void Kick();

  const SchedulerConfig& config_;
  WakeUps& wakeups_;
  const std::atomic<bool>& stopping_;
  storage::ConnectionPool pool_;
  storage::Store store_;

  std::mutex mu_;
  std::map<std::string, int> per_user_;
  int open_ = 0;
  struct EventKey {
    std::string pipeline_id;
    std::optional<std::string> owner;
  };
  std::map<std::string, std::pair<EventKey, std::shared_ptr<EventFeed>>> events_;
  std::map<std::string, std::shared_ptr<LogFeed>> logs_;

  std::atomic<uint64_t> queries_{0}, feed_reads_{0}, passes_{0};
  std::atomic<bool> stop_{false};
  std::thread reader_;
};

}  // namespace btx::scheduler
