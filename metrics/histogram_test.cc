#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include "btx/metrics/metrics.h"

namespace btx::metrics {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(Histogram, BoundsAreInclusiveAndCumulative) {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 2.0, 2.0, 5.0, 5.1, 100.0, -3.0}) h.Observe(v);
  const auto s = h.Collect();
  EXPECT_EQ(s.cumulative, (std::vector<std::uint64_t>{3, 6, 7, 9}));  // le=1: 0.5, 1, -3
  EXPECT_EQ(s.count, 9u);
  EXPECT_DOUBLE_EQ(s.sum, 0.5 + 1 + 1.5 + 2 + 2 + 5 + 5.1 + 100 - 3);
}

TEST(Histogram, InfinitiesLandInEdgeBucketsAndNaNIsDropped) {
  Histogram h({1});
  h.Observe(kInf);
  h.Observe(-kInf);
  h.Observe(std::numeric_limits<double>::quiet_NaN());
  const auto s = h.Collect();
  EXPECT_EQ(s.cumulative, (std::vector<std::uint64_t>{1, 2}));
  EXPECT_EQ(s.count, 2u);
  EXPECT_TRUE(std::isnan(s.sum));  // +Inf + -Inf; honest, and only reachable by misuse
}

TEST(Histogram, TrailingInfBoundIsImplicit) {
  Histogram h({0.5, kInf});
  EXPECT_EQ(h.Collect().bounds, (std::vector<double>{0.5}));
  Histogram none({});
  none.Observe(3);
  EXPECT_EQ(none.Collect().cumulative, (std::vector<std::uint64_t>{1}));
}

TEST(Histogram, RejectsBadBounds) {
  EXPECT_THROW(Histogram({2, 1}), std::invalid_argument);
  EXPECT_THROW(Histogram({1, 1}), std::invalid_argument);
  EXPECT_THROW(Histogram({std::nan(""), 1}), std::invalid_argument);
  EXPECT_THROW(Histogram({-kInf, 1}), std::invalid_argument);
  EXPECT_THROW(Histogram({kInf, 1}), std::invalid_argument);
}

TEST(Histogram, ConcurrentObservationsAreAllCounted) {
  Histogram h({0.25, 0.5, 0.75});
  constexpr int kThreads = 8, kPerThread = 50000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&h, t] {
      for (int i = 0; i < kPerThread; ++i) h.Observe((t % 4) * 0.25);  // 0, .25, .5, .75
    });
  }
  for (auto& th : threads) th.join();
  const auto s = h.Collect();
  constexpr std::uint64_t kQuarter = kThreads / 4 * kPerThread;
  EXPECT_EQ(s.cumulative, (std::vector<std::uint64_t>{2 * kQuarter, 3 * kQuarter, 4 * kQuarter,
                                                       4 * kQuarter}));
  EXPECT_DOUBLE_EQ(s.sum, kQuarter * (0.25 + 0.5 + 0.75));
}

TEST(ExponentialBuckets, Values) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 4), (std::vector<double>{1, 2, 4, 8}));
  const auto b = ExponentialBuckets(0.001, 10, 3);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_DOUBLE_EQ(b[2], 0.1);
  EXPECT_NO_THROW(Histogram{ExponentialBuckets(0.0005, 2, 20)});
}

TEST(ExponentialBuckets, RejectsBadArguments) {
  EXPECT_THROW(ExponentialBuckets(0, 2, 3), std::invalid_argument);
  EXPECT_THROW(ExponentialBuckets(-1, 2, 3), std::invalid_argument);
  EXPECT_THROW(ExponentialBuckets(1, 1, 3), std::invalid_argument);
  EXPECT_THROW(ExponentialBuckets(1, 2, 0), std::invalid_argument);
  EXPECT_THROW(ExponentialBuckets(std::nan(""), 2, 3), std::invalid_argument);
}

}  // namespace
}  // namespace btx::metrics
