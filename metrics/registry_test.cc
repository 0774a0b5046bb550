#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "btx/metrics/metrics.h"

namespace btx::metrics {
namespace {

TEST(Registry, RejectsInvalidMetricNames) {
  Registry r;
  EXPECT_THROW(r.AddGauge("", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx-jobs", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("1btx", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("__btx", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx_jobs", ""), std::invalid_argument);  // help is required
}

TEST(Registry, EnforcesTotalSuffixConvention) {
  Registry r;
  EXPECT_THROW(r.AddCounter("btx_lease_expirations", "h"), std::invalid_argument);
  EXPECT_NO_THROW(r.AddCounter("btx_lease_expirations_total", "h"));
  EXPECT_THROW(r.AddGauge("btx_jobs_total", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("btx_latency_total", "h", {1}), std::invalid_argument);
}

TEST(Registry, ReservesHistogramSuffixes) {
  Registry r;
  EXPECT_THROW(r.AddGauge("btx_x_count", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx_x_sum", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx_x_bucket", "h"), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("btx_x_count", "h", {1}), std::invalid_argument);
}

TEST(Registry, RejectsInvalidLabelNames) {
  Registry r;
  EXPECT_THROW(r.AddGauge("btx_a", "h", {"bad-label"}), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx_b", "h", {"a:b"}), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx_c", "h", {"__name"}), std::invalid_argument);
  EXPECT_THROW(r.AddGauge("btx_d", "h", {"x", "x"}), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("btx_e", "h", {1}, {"le"}), std::invalid_argument);
  EXPECT_NO_THROW(r.AddGauge("btx_f", "h", {"le"}));  // le is only reserved on histograms
}

TEST(Registry, RejectsDuplicatesAndBadBuckets) {
  Registry r;
  r.AddGauge("btx_jobs", "h", {"state"});
  EXPECT_THROW(r.AddGauge("btx_jobs", "h", {"state"}), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("btx_jobs", "h", {1}), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("btx_h", "h", {3, 2}), std::invalid_argument);
  EXPECT_NO_THROW(r.AddHistogram("btx_h", "h", {2, 3}));  // the failed attempt reserved nothing
}

TEST(Registry, WrongLabelCountThrows) {
  Registry r;
  auto& f = r.AddGauge("btx_jobs", "h", {"state", "kind"});
  EXPECT_THROW(f.WithLabels({"READY"}), std::invalid_argument);
  EXPECT_THROW(f.WithLabels({"READY", "branch", "x"}), std::invalid_argument);
  auto& plain = r.AddGauge("btx_workers_connected", "h");
  EXPECT_THROW(plain.WithLabels({"x"}), std::invalid_argument);
}

TEST(Registry, WithLabelsReturnsStableReferences) {
  Registry r;
  auto& f = r.AddCounter("btx_job_retries_total", "h", {"kind"});
  Counter& a = f.WithLabels({"branch"});
  for (int i = 0; i < 1000; ++i) f.WithLabels({std::string("k").append(std::to_string(i))});  // rehash/rebalance
  EXPECT_EQ(&a, &f.WithLabels({"branch"}));
}

TEST(Concurrency, ThreadsIncrementingOneCounter) {
  Registry r;
  auto& f = r.AddCounter("btx_grpc_requests_total", "h", {"method", "code"});
  constexpr int kThreads = 8, kPerThread = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&f] {
      auto& c = f.WithLabels({"Heartbeat", "OK"});
      for (int i = 0; i < kPerThread; ++i) c.Inc();
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(f.WithLabels({"Heartbeat", "OK"}).Value(), double(kThreads) * kPerThread);
}

TEST(Concurrency, GaugeIncDecBalance) {
  Gauge g;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&g] {
      for (int i = 0; i < 50000; ++i) {
        g.Inc();
        g.Dec();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(g.Value(), 0);
}

// Series come and go (jobs start and finish) while scrapes run; nothing may crash or tear.
TEST(Concurrency, SeriesChurnDuringScrapes) {
  Registry r;
  auto& progress = r.AddGauge("btx_job_progress_ratio", "h", {"job"});
  auto& latency = r.AddHistogram("btx_claim_latency_seconds", "h", {0.1, 1}, {"kind"});
  std::atomic<bool> stop{false};
  std::thread scraper([&] {
    while (!stop) {
      const std::string body = r.Serialize();
      ASSERT_EQ(body.back(), '\n');
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < 3; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; i < 20000; ++i) {
        const std::string job = std::to_string(t) + "-" + std::to_string(i % 50);
        progress.WithLabels({job}).Set(i);
        latency.WithLabels({"branch"}).Observe(0.5);
        if (i % 7 == 0) progress.Remove({job});
      }
    });
  }
  for (auto& th : writers) th.join();
  stop = true;
  scraper.join();
  const std::string body = r.Serialize();
  EXPECT_NE(body.find("btx_claim_latency_seconds_count{kind=\"branch\"} 60000\n"),
            std::string::npos);
}

}  // namespace
}  // namespace btx::metrics
