#include "handler_pool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "absl/cleanup/cleanup.h"

namespace btx::scheduler {
namespace {

// Tasks that block until the test lets them go, like long polls.
struct Latch {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  int waiting = 0;
  void Wait() {
    std::unique_lock lock(mu);
    ++waiting;
    cv.notify_all();
    cv.wait(lock, [&] { return open; });
  }
  // False after a minute: a pool that never runs them all fails the test instead of hanging it.
  bool WaitForWaiting(int n) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, std::chrono::minutes(1), [&] { return waiting >= n; });
  }
  void Open() {
    std::lock_guard lock(mu);
    open = true;
    cv.notify_all();
  }
};

TEST(HandlerPool, BlockedTasksDoNotHoldUpOthersWhileThreadsAreLeft) {
  Latch latch;
  std::atomic<int> done{0};
  {
    HandlerPool pool(8);
    // Before the pool's destructor, which waits for the blocked tasks, also when an assertion fails.
    absl::Cleanup release = [&] { latch.Open(); };
    for (int i = 0; i < 5; ++i) pool.Submit([&] { latch.Wait(); });
    ASSERT_TRUE(latch.WaitForWaiting(5)) << "five blocked tasks did not all run at once";
    // (each got a thread of its own)
    EXPECT_EQ(pool.threads(), 5u);
    pool.Submit([&] { ++done; });
  }  // the destructor runs what is queued and joins
  EXPECT_EQ(done.load(), 1);
}

TEST(HandlerPool, AtTheLimitTasksQueueAndAllRun) {
  Latch latch;
  std::atomic<int> done{0};
  {
    HandlerPool pool(2);
    absl::Cleanup release = [&] { latch.Open(); };
    pool.Submit([&] { latch.Wait(); });
    pool.Submit([&] { latch.Wait(); });
    ASSERT_TRUE(latch.WaitForWaiting(2));
    for (int i = 0; i < 10; ++i) pool.Submit([&] { ++done; });
    EXPECT_EQ(pool.threads(), 2u);
    EXPECT_EQ(done.load(), 0);  // both threads are blocked: the ten wait in the queue
  }
  EXPECT_EQ(done.load(), 10);
}

TEST(HandlerPool, IdleThreadsAreReusedInsteadOfMadeAgain) {
  HandlerPool pool(64);
  std::atomic<int> done{0};
  for (int round = 1; round <= 50; ++round) {
    pool.Submit([&] { ++done; });
    // The call is over once its thread waits again; the next call must find that thread.
    while (done.load() < round || pool.idle_threads() < pool.threads()) std::this_thread::yield();
  }
  EXPECT_EQ(pool.threads(), 1u);
}

TEST(HandlerPool, ManyThreadsSubmittingAtOnceLoseNothing) {
  std::atomic<int> done{0};
  {
    HandlerPool pool(16);
    std::vector<std::thread> submitters;
    for (int t = 0; t < 8; ++t)
      submitters.emplace_back([&] {
        for (int i = 0; i < 500; ++i) pool.Submit([&] { ++done; });
      });
    for (auto& t : submitters) t.join();
  }
  EXPECT_EQ(done.load(), 4000);
}

}  // namespace
}  // namespace btx::scheduler
