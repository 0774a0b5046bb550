// Threads for handler bodies that block (long polls, batched database calls) behind gRPC's callback
// API. The sync API would run them on its own threads, but each of those also polls the completion
// queue: with hundreds of workers in long polls, hundreds of pollers take turns on every event, and
// a trivial call cost about twice what it costs with two pollers (bench/scheduler). Here gRPC keeps
// its few pollers, and a blocked body holds a thread that polls nothing.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace btx::scheduler {

class HandlerPool {
 public:
  // A task waits in the queue only while max_threads bodies are running; threads, once made, stay
  // (making one per call cost more than the handlers when long polls come and go).
  explicit HandlerPool(size_t max_threads) : max_threads_(max_threads == 0 ? 1 : max_threads) {}
  HandlerPool(const HandlerPool&) = delete;
  HandlerPool& operator=(const HandlerPool&) = delete;
  // Runs what is queued, then joins: the tasks' callers (gRPC reactors) must see every call finished.
  ~HandlerPool() {
    {
      std::lock_guard lock(mu_);
      closing_ = true;
    }
    ready_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void Submit(std::function<void()> task) {
    std::unique_lock lock(mu_);
    queue_.push_back(std::move(task));
    // Idle threads that are already woken but have not taken their task yet count as busy.
    if (queue_.size() > idle_ && threads_.size() < max_threads_) {
      threads_.emplace_back([this] { Loop(); });
      return;
    }
    lock.unlock();
    ready_.notify_one();
  }

  size_t threads() const {
    std::lock_guard lock(mu_);
    return threads_.size();
  }
  // Threads waiting for a task (for tests: when one call is done, its thread is back here).
  size_t idle_threads() const {
    std::lock_guard lock(mu_);
    return idle_;
  }

 private:
  void Loop() {
    std::unique_lock lock(mu_);
    while (true) {
      ++idle_;
      ready_.wait(lock, [&] { return !queue_.empty() || closing_; });
      --idle_;
      if (queue_.empty()) return;  // closing, nothing left
      auto task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  const size_t max_threads_;
  mutable std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  size_t idle_ = 0;
  bool closing_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace btx::scheduler
