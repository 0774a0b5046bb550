// Groups concurrent calls into batches (flat combining). A busy scheduler receives hundreds of
// claims and completions per second whose database work is a few rows each; sent one by one, each
// also pays a statement, a transaction and a round trip. Here the calls that arrive while earlier
// batches are at the database wait and then go as one. The calling threads run the batches
// themselves (no thread of its own), and a call that finds a free slot runs at once, alone if need
// be, so an idle scheduler adds no latency.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace btx::scheduler {

struct BatcherConfig {
  int max_batch = 64;      // calls per batch
  int max_in_flight = 4;   // batches running at once (each holds a database connection)
};

template <typename Request, typename Result>
class Batcher {
 public:
  // Answers requests[i] with result[i]; must return one result per request and not throw.
  using RunFn = std::function<std::vector<Result>(std::vector<Request>&)>;
  // Only requests with equal keys share a batch (e.g. claims for the same free GPU count).
  using KeyFn = std::function<int64_t(const Request&)>;

  Batcher(BatcherConfig config, RunFn run, KeyFn key = {})
      : config_(config), run_(std::move(run)), key_(std::move(key)) {}

  Result Call(Request request) {
    Slot slot{std::move(request)};
    std::unique_lock lock(mu_);
    queue_.push_back(&slot);
    while (!slot.result) {
      if (in_flight_ < config_.max_in_flight && !queue_.empty()) {
        RunOne(lock);
      } else {
        slot.cv.wait(lock);
      }
    }
    return std::move(*slot.result);
  }

  // Batches run so far and the calls they carried, for tests and the benchmark.
  std::pair<int64_t, int64_t> BatchesAndCalls() {
    std::lock_guard lock(mu_);
    return {batches_, calls_};
  }
  // Calls waiting for a batch.
  int Queued() {
    std::lock_guard lock(mu_);
    return static_cast<int>(queue_.size());
  }

 private:
  struct Slot {
    Request request;
    std::optional<Result> result{};
    std::condition_variable cv{};
  };

  // Takes the oldest waiting call and those that may join it, runs them without the lock, and hands
  // out the results. Called and returns with `lock` held.
  void RunOne(std::unique_lock<std::mutex>& lock) {
    std::vector<Slot*> batch;
    const int64_t key = key_ ? key_(queue_.front()->request) : 0;
    for (auto it = queue_.begin(); it != queue_.end() && static_cast<int>(batch.size()) < config_.max_batch;) {
      if (!key_ || key_((*it)->request) == key) {
        batch.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    ++in_flight_;
    ++batches_;
    // Calls left behind (another key, or past max_batch) need not wait for this batch to end.
    if (!queue_.empty() && in_flight_ < config_.max_in_flight) queue_.front()->cv.notify_one();
    calls_ += static_cast<int64_t>(batch.size());
    lock.unlock();
    // The owners wait until their results are in, and never look at their requests again.
    std::vector<Request> requests;
    requests.reserve(batch.size());
    for (Slot* s : batch) requests.push_back(std::move(s->request));
    std::vector<Result> results = run_(requests);
    lock.lock();
    --in_flight_;
    // A slot's owner may return (and its Slot go) as soon as the lock is released: every access to
    // a slot happens before that.
    for (size_t i = 0; i < batch.size(); ++i) {
      batch[i]->result.emplace(std::move(results[i]));
      batch[i]->cv.notify_one();
    }
    // The oldest waiting call leads the next batch.
    if (!queue_.empty()) queue_.front()->cv.notify_one();
  }

  const BatcherConfig config_;
  const RunFn run_;
  const KeyFn key_;
  std::mutex mu_;
  std::deque<Slot*> queue_;
  int in_flight_ = 0;
  int64_t batches_ = 0, calls_ = 0;
};

}  // namespace btx::scheduler
