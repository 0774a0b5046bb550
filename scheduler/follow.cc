#include "follow.h"

#include "btx/common/strings.h"

namespace btx::scheduler {

namespace {

std::string EventFeedKey(const std::string& pipeline_id, const std::optional<std::string>& owner) {
  if (!pipeline_id.empty()) return pipeline_id;
  return owner ? Cat("*=", *owner) : std::string("*");
}

bool JobEnded(const std::string& state) { return state == "SUCCEEDED" || state == "FAILED" || state == "CANCELLED"; }

}  // namespace

Followers::Followers(const SchedulerConfig& config, std::string conninfo, WakeUps& wakeups,
                     const std::atomic<bool>& stopping)
    : config_(config),
      wakeups_(wakeups),
      stopping_(stopping),
      pool_(std::move(conninfo), config.follower_db_connections),
      store_(pool_) {}

Followers::~Followers() { Stop(); }

void Followers::Start() {
  if (!reader_.joinable()) reader_ = std::thread([this] { Loop(); });
}

void Followers::Stop() {
  stop_ = true;
  Kick();
  if (reader_.joinable()) reader_.join();
  // Followers wait on their feed, not on the wake-ups: tell each one.
  {
    std::lock_guard lock(mu_);
    for (auto& [k, e] : events_) {
      { std::lock_guard f(e.second->mu); }
      e.second->cv.notify_all();
    }
    for (auto& [k, l] : logs_) {
      { std::lock_guard f(l->mu); }
      l->cv.notify_all();
    }
  }
}

// ---- caps ----------------------------------------------------------------------------------------

absl::StatusOr<Followers::Slot> Followers::Open(const std::string& user) {
  std::lock_guard lock(mu_);
  const std::string who = user.empty() ? "the anonymous caller" : Cat("user '", user, "'");
  int& mine = per_user_[user];
  if (mine >= config_.max_streams_per_user) {
    const int held = mine;
    if (mine == 0) per_user_.erase(user);
    return absl::ResourceExhaustedError(
        Cat("too many open Watch/Logs streams for ", who, ": ", held, " open, the cap is ",
            config_.max_streams_per_user, " per user (btx-scheduler --max-streams-per-user); end one first"));
  }
  if (open_ >= config_.max_streams) {
    if (mine == 0) per_user_.erase(user);
    return absl::ResourceExhaustedError(Cat("too many open Watch/Logs streams on this scheduler: ", open_,
                                            " open, the cap is ", config_.max_streams,
                                            " (btx-scheduler --max-streams); try again later"));
  }
  ++mine;
  ++open_;
  return Slot(this, user);
}

Followers::Slot::~Slot() {
  if (f_) f_->Close(user_);
}

void Followers::Close(const std::string& user) {
  std::lock_guard lock(mu_);
  --open_;
  auto it = per_user_.find(user);
  if (it != per_user_.end() && --it->second <= 0) per_user_.erase(it);
}

int Followers::open_streams() {
  std::lock_guard lock(mu_);
  return open_;
}

// ---- feeds ---------------------------------------------------------------------------------------

Followers::Membership<storage::EventRecord> Followers::JoinEvents(const std::string& pipeline_id,
                                                                  const std::optional<std::string>& owner, int64_t after) {
  const std::string key = EventFeedKey(pipeline_id, owner);
  std::shared_ptr<EventFeed> feed;
  bool created = false;
  {
    std::lock_guard lock(mu_);
    auto& slot = events_[key];
    if (!slot.second) {
      slot.first = {pipeline_id, pipeline_id.empty() ? owner : std::nullopt};
      slot.second = std::make_shared<EventFeed>();
      slot.second->base = slot.second->cursor = after;
      created = true;
    }
    ++slot.second->followers;
    feed = slot.second;
  }
  if (created) Kick();
  return {this, key, std::move(feed)};
}

Followers::Membership<storage::LogRecord> Followers::JoinLogs(const std::string& job_id, int64_t after) {
  std::shared_ptr<LogFeed> feed;
  bool created = false;
  {
    std::lock_guard lock(mu_);
    auto& slot = logs_[job_id];
    // An ended feed reads no more, but a retried job logs again: its followers still hold the old one.
    if (!slot || slot->ended) {
      slot = std::make_shared<LogFeed>();
      slot->base = slot->cursor = after;
      created = true;
    }
    ++slot->followers;
    feed = slot;
  }
  if (created) Kick();
  return {this, job_id, std::move(feed)};
}

void Followers::Leave(const std::string& key, const void* feed) {
  std::lock_guard lock(mu_);
  if (auto it = events_.find(key); it != events_.end() && it->second.second.get() == feed) {
    if (--it->second.second->followers == 0) events_.erase(it);
    return;
  }
  if (auto it = logs_.find(key); it != logs_.end() && it->second.get() == feed) {
    if (--it->second->followers == 0) logs_.erase(it);
  }
}

size_t Followers::feeds() {
  std::lock_guard lock(mu_);
  return events_.size() + logs_.size();
}

int Followers::members() {
  std::lock_guard lock(mu_);
  int n = 0;
  for (const auto& [k, e] : events_) n += e.second->followers;
  for (const auto& [k, l] : logs_) n += l->followers;
  return n;
}

// ---- reads ---------------------------------------------------------------------------------------

absl::StatusOr<storage::PipelineRecord> Followers::GetPipeline(const std::string& id) {
  ++queries_;
  return store_.GetPipeline(id);
}

absl::StatusOr<storage::JobRecord> Followers::GetJob(const std::string& id) {
  ++queries_;
  return store_.GetJob(id);
}

absl::StatusOr<std::vector<storage::EventRecord>> Followers::EventsAfter(const std::string& pipeline_id, int64_t after,
                                                                         int limit,
                                                                         const std::optional<std::string>& owner) {
  ++queries_;
  return store_.EventsAfter(pipeline_id, after, limit, owner);
}

absl::StatusOr<std::vector<storage::LogRecord>> Followers::LogsAfter(const std::string& job_id, int64_t after, int limit) {
  ++queries_;
  return store_.LogsAfter(job_id, after, limit);
}

namespace {

// Publishes one read's outcome to a feed's followers.
template <typename Row>
void Publish(Feed<Row>& feed, absl::StatusOr<std::vector<Row>> rows, size_t page, std::optional<bool> ended = {}) {
  bool changed = false;
  {
    std::lock_guard lock(feed.mu);
    if (!rows.ok()) {
      changed = feed.error.ok();
      feed.error = rows.status();
      feed.full_page = false;
    } else {
      changed = !feed.error.ok() || !rows->empty();
      feed.error = absl::OkStatus();
      feed.full_page = rows->size() >= page;
      if (ended && *ended && !feed.full_page && !feed.ended) {
        feed.ended = true;
        changed = true;
      }
      feed.Append(*std::move(rows));
    }
    if (changed) ++feed.version;
  }
  // Followers are woken only when their feed changed, not on every commit of the cluster.
  if (changed) feed.cv.notify_all();
}

}  // namespace

bool Followers::ReadOnce() {
  std::vector<std::pair<EventKey, std::shared_ptr<EventFeed>>> events;
  std::vector<std::pair<std::string, std::shared_ptr<LogFeed>>> logs;
  {
    std::lock_guard lock(mu_);
    for (const auto& [k, e] : events_) events.push_back(e);
    for (const auto& [k, l] : logs_) logs.emplace_back(k, l);
  }
  bool more = false;
  for (auto& [key, feed] : events) {
    int64_t cursor;
    {
      std::lock_guard lock(feed->mu);
      cursor = feed->cursor;
    }
    ++feed_reads_;
    Publish(*feed, EventsAfter(key.pipeline_id, cursor, kEventPage, key.owner), kEventPage);
    std::lock_guard lock(feed->mu);
    more |= feed->full_page;
  }
  for (auto& [job_id, feed] : logs) {
    int64_t cursor;
    bool ended;
    {
      std::lock_guard lock(feed->mu);
      cursor = feed->cursor;
      ended = feed->ended;
    }
    if (ended) continue;  // its followers have every line; a job that ended logs no more
    ++feed_reads_;
    // The state first: lines read after seeing the job ended are all its lines.
    auto job = GetJob(job_id);
    if (!job.ok()) {
      Publish<storage::LogRecord>(*feed, job.status(), kLogPage);
      continue;
    }
    Publish(*feed, LogsAfter(job_id, cursor, kLogPage), kLogPage, JobEnded(job->state));
    std::lock_guard lock(feed->mu);
    more |= feed->full_page;
  }
  ++passes_;
  return more;
}

void Followers::Kick() { wakeups_.events().Notify(); }

void Followers::Loop() {
  while (!stop_ && !stopping_) {
    const uint64_t gen = wakeups_.events().generation();
    const bool more = ReadOnce();
    if (more) continue;
    // Every commit that adds events or log lines notifies (another replica's through LISTEN/NOTIFY);
    // the bounded wait is a safety net. Commits during a pass ride on the next one.
    wakeups_.events().WaitFor(gen, std::chrono::seconds(1));
  }
}

}  // namespace btx::scheduler
