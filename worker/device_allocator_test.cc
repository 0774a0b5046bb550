#include "device_allocator.h"

#include <set>

#include <gtest/gtest.h>

namespace btx::worker {
namespace {

using Set = std::vector<int>;

TEST(DeviceAllocator, HandsOutExactlyTheAskedNumberOfDistinctFreeDevices) {
  DeviceAllocator a(4);
  EXPECT_EQ(a.total(), 4);
  EXPECT_EQ(a.free(), 4);
  auto one = a.Acquire(1);
  ASSERT_TRUE(one);
  EXPECT_EQ(*one, Set({0}));
  auto two = a.Acquire(2);
  ASSERT_TRUE(two);
  EXPECT_EQ(*two, Set({1, 2}));
  EXPECT_EQ(a.free(), 1);
  // Never fewer than asked: two are wanted, one is free, nothing is taken.
  EXPECT_FALSE(a.Acquire(2));
  EXPECT_EQ(a.free(), 1);
  auto last = a.Acquire(1);
  ASSERT_TRUE(last);
  EXPECT_EQ(*last, Set({3}));
  EXPECT_EQ(a.free(), 0);
  EXPECT_FALSE(a.Acquire(1));
}

TEST(DeviceAllocator, CpuJobsTakeNoDevice) {
  DeviceAllocator none;
  EXPECT_EQ(none.total(), 0);
  auto cpu = none.Acquire(0);
  ASSERT_TRUE(cpu);
  EXPECT_TRUE(cpu->empty());
  EXPECT_FALSE(none.Acquire(1));
  EXPECT_TRUE(none.Release(*cpu));
  EXPECT_EQ(none.free(), 0);

  DeviceAllocator full(2);
  ASSERT_TRUE(full.Acquire(2));
  EXPECT_TRUE(full.Acquire(0));  // a busy host still runs CPU jobs
  EXPECT_EQ(full.free(), 0);
}

TEST(DeviceAllocator, ReleasedDevicesAreReusedLowestFirst) {
  DeviceAllocator a(4);
  auto first = *a.Acquire(2);   // 0, 1
  auto second = *a.Acquire(2);  // 2, 3
  ASSERT_TRUE(a.Release(first));
  EXPECT_EQ(a.free(), 2);
  EXPECT_EQ(*a.Acquire(1), Set({0}));
  ASSERT_TRUE(a.Release(second));
  EXPECT_EQ(*a.Acquire(3), Set({1, 2, 3}));
  EXPECT_EQ(a.free(), 0);
}

TEST(DeviceAllocator, ManyJobsNeverShareADeviceNorDriveFreeNegative) {
  DeviceAllocator a(8);
  std::vector<Set> held;
  // A deterministic mix of sizes and releases; after every step the held sets are disjoint and
  // free() is exactly what is not held.
  const int sizes[] = {1, 3, 2, 0, 2, 1, 4, 1, 2, 3, 1, 1};
  for (int step = 0; step < 200; ++step) {
    const int want = sizes[step % 12];
    if (auto got = a.Acquire(want)) {
      EXPECT_EQ(static_cast<int>(got->size()), want);
      held.push_back(*got);
    } else {
      EXPECT_LT(a.free(), want);
      ASSERT_FALSE(held.empty());
      const auto victim = held.begin() + step % static_cast<int>(held.size());
      ASSERT_TRUE(a.Release(*victim));
      held.erase(victim);
    }
    std::set<int> seen;
    size_t count = 0;
    for (const auto& s : held) {
      for (int d : s) {
        EXPECT_TRUE(d >= 0 && d < 8) << d;
        seen.insert(d);
        ++count;
      }
    }
    ASSERT_EQ(seen.size(), count) << "a device is held twice at step " << step;
    ASSERT_EQ(a.free(), 8 - static_cast<int>(count));
    ASSERT_GE(a.free(), 0);
  }
}

TEST(DeviceAllocator, BadReleasesFreeNothing) {
  DeviceAllocator a(3);
  auto held = *a.Acquire(2);  // 0, 1
  EXPECT_FALSE(a.Release({2}));     // not held
  EXPECT_FALSE(a.Release({0, 0}));  // twice in one set
  EXPECT_FALSE(a.Release({0, 7}));  // out of range: 0 must stay held
  EXPECT_FALSE(a.Release({-1}));
  EXPECT_FALSE(a.Acquire(-1));
  EXPECT_EQ(a.free(), 1);
  EXPECT_TRUE(a.Release(held));
  EXPECT_FALSE(a.Release(held));  // a second release of the same set
  EXPECT_EQ(a.free(), 3);
}

TEST(CudaDeviceIds, IndicesOrTheWorkersOwnNames) {
  EXPECT_EQ(CudaDeviceIds({0, 2}, {}), (std::vector<std::string>{"0", "2"}));
  // The worker itself saw only physical GPUs 4 and 6 (CUDA_VISIBLE_DEVICES=4,6): its device 1 is GPU 6.
  EXPECT_EQ(CudaDeviceIds({1}, {"4", "6"}), (std::vector<std::string>{"6"}));
  EXPECT_EQ(CudaDeviceIds({0, 1}, {"GPU-5f3c", "MIG-a1b2"}), (std::vector<std::string>{"GPU-5f3c", "MIG-a1b2"}));
  EXPECT_TRUE(CudaDeviceIds({}, {"4"}).empty());
}

TEST(SplitVisibleDevices, EntriesInOrder) {
  EXPECT_TRUE(SplitVisibleDevices("").empty());
  EXPECT_EQ(SplitVisibleDevices("3"), (std::vector<std::string>{"3"}));
  EXPECT_EQ(SplitVisibleDevices("4, 6,GPU-5f3c"), (std::vector<std::string>{"4", "6", "GPU-5f3c"}));
  // An empty entry keeps its place: the entries after it must not move up to another device's index.
  EXPECT_EQ(SplitVisibleDevices("1,,2"), (std::vector<std::string>{"1", "", "2"}));
}

}  // namespace
}  // namespace btx::worker
