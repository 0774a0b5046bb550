#include "batcher.h"

#include <atomic>
#include <future>
#include <thread>

#include <gtest/gtest.h>

namespace btx::scheduler {
namespace {

// A run function the test holds at its start until released, so that calls pile up behind it.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  std::atomic<int> entered{0};
  std::vector<std::vector<int>> batches;

  std::vector<int> Run(std::vector<int>& requests) {
    std::unique_lock lock(mu);
    batches.push_back(requests);
    ++entered;
    cv.wait(lock, [&] { return open; });
    std::vector<int> out;
    for (int r : requests) out.push_back(r * 10);
    return out;
  }
  void Open() {
    std::lock_guard lock(mu);
    open = true;
    cv.notify_all();
  }
};

void SpinUntil(const std::function<bool()>& done) {
  while (!done()) std::this_thread::yield();
}

TEST(Batcher, ACallAloneRunsAtOnceAsABatchOfOne) {
  Batcher<int, int> b({}, [](std::vector<int>& r) { return std::vector<int>{r[0] + 1}; });
  EXPECT_EQ(b.Call(41), 42);
  EXPECT_EQ(b.BatchesAndCalls(), std::make_pair(int64_t{1}, int64_t{1}));
}

TEST(Batcher, CallsArrivingWhileBatchesRunGoTogetherAndEachGetsItsOwnResult) {
  Gate gate;
  Batcher<int, int> b({.max_batch = 64, .max_in_flight = 1}, [&](std::vector<int>& r) { return gate.Run(r); });
  auto first = std::async(std::launch::async, [&] { return b.Call(1); });
  SpinUntil([&] { return gate.entered == 1; });
  std::vector<std::future<int>> rest;
  for (int i = 2; i <= 9; ++i) rest.push_back(std::async(std::launch::async, [&b, i] { return b.Call(i); }));
  SpinUntil([&] { return b.Queued() == 8; });
  gate.Open();
  EXPECT_EQ(first.get(), 10);
  for (int i = 2; i <= 9; ++i) EXPECT_EQ(rest[i - 2].get(), i * 10);
  ASSERT_EQ(gate.batches.size(), 2u);
  EXPECT_EQ(gate.batches[1].size(), 8u);
  EXPECT_EQ(b.BatchesAndCalls(), std::make_pair(int64_t{2}, int64_t{9}));
}

TEST(Batcher, RespectsMaxBatchAndMaxInFlight) {
  Gate gate;
  Batcher<int, int> b({.max_batch = 3, .max_in_flight = 2}, [&](std::vector<int>& r) { return gate.Run(r); });
  std::vector<std::future<int>> calls;
  for (int i = 0; i < 2; ++i) calls.push_back(std::async(std::launch::async, [&b, i] { return b.Call(i); }));
  SpinUntil([&] { return gate.entered == 2; });  // two batches of one hold both slots
  for (int i = 2; i < 9; ++i) calls.push_back(std::async(std::launch::async, [&b, i] { return b.Call(i); }));
  SpinUntil([&] { return b.Queued() == 7; });
  gate.Open();
  for (int i = 0; i < 9; ++i) EXPECT_EQ(calls[i].get(), i * 10);
  for (const auto& batch : gate.batches) EXPECT_LE(batch.size(), 3u);
  EXPECT_EQ(b.BatchesAndCalls().second, 9);
  EXPECT_GE(b.BatchesAndCalls().first, 5);  // 2 + ceil(7 / 3)
}

TEST(Batcher, RequestsWithDifferentKeysNeverShareABatch) {
  Gate gate;
  Batcher<int, int> b({.max_batch = 64, .max_in_flight = 1}, [&](std::vector<int>& r) { return gate.Run(r); },
                      [](const int& r) { return int64_t{r % 2}; });
  auto first = std::async(std::launch::async, [&] { return b.Call(100); });
  SpinUntil([&] { return gate.entered == 1; });
  std::vector<std::future<int>> rest;
  for (int i = 1; i <= 6; ++i) rest.push_back(std::async(std::launch::async, [&b, i] { return b.Call(i); }));
  SpinUntil([&] { return b.Queued() == 6; });
  gate.Open();
  first.get();
  for (int i = 1; i <= 6; ++i) EXPECT_EQ(rest[i - 1].get(), i * 10);
  ASSERT_EQ(gate.batches.size(), 3u);
  for (size_t k = 1; k < 3; ++k) {
    ASSERT_EQ(gate.batches[k].size(), 3u);
    for (int r : gate.batches[k]) EXPECT_EQ(r % 2, gate.batches[k][0] % 2);
  }
}

TEST(Batcher, ManyThreadsHammeringGetTheirOwnAnswers) {
  Batcher<int, int> b({.max_batch = 8, .max_in_flight = 2}, [](std::vector<int>& r) {
    std::vector<int> out;
    for (int x : r) out.push_back(-x);
    return out;
  });
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        const int v = t * 1000 + i;
        if (b.Call(v) != -v) ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(b.BatchesAndCalls().second, 16 * 500);
}

}  // namespace
}  // namespace btx::scheduler
