#include <gtest/gtest.h>

#include <limits>

#include "btx/metrics/metrics.h"

namespace btx::metrics {
namespace {

TEST(Serialize, Golden) {
  Registry r;
  auto& requests = r.AddCounter("btx_grpc_requests_total", "gRPC requests handled.",
                                {"method", "code"});
  requests.WithLabels({"AcquireJob", "OK"}).Inc(3);
  requests.WithLabels({"AcquireJob", "UNAVAILABLE"}).Inc();
  r.AddGauge("btx_workers_connected", "Workers with a live session.").WithLabels({}).Set(2);
  auto& latency = r.AddHistogram("btx_dispatch_latency_seconds", "READY to LEASED.",
                                 {0.1, 1, 10});
  auto& h = latency.WithLabels({});
  h.Observe(0.05);
  h.Observe(0.1);
  h.Observe(2.5);
  auto& by_method = r.AddHistogram("btx_grpc_request_duration_seconds", "RPC latency.", {0.5},
                                   {"method"});
  by_method.WithLabels({"Heartbeat"}).Observe(0.25);
  r.AddGauge("btx_job_loss", "Latest loss.", {"pipeline", "job"})
      .WithLabels({"p1", "j1"})
      .Set(std::numeric_limits<double>::quiet_NaN());

  EXPECT_EQ(r.Serialize(),
            "# HELP btx_dispatch_latency_seconds READY to LEASED.\n"
            "# TYPE btx_dispatch_latency_seconds histogram\n"
            "btx_dispatch_latency_seconds_bucket{le=\"0.1\"} 2\n"
            "btx_dispatch_latency_seconds_bucket{le=\"1\"} 2\n"
            "btx_dispatch_latency_seconds_bucket{le=\"10\"} 3\n"
            "btx_dispatch_latency_seconds_bucket{le=\"+Inf\"} 3\n"
            "btx_dispatch_latency_seconds_sum 2.65\n"
            "btx_dispatch_latency_seconds_count 3\n"
            "# HELP btx_grpc_request_duration_seconds RPC latency.\n"
            "# TYPE btx_grpc_request_duration_seconds histogram\n"
            "btx_grpc_request_duration_seconds_bucket{method=\"Heartbeat\",le=\"0.5\"} 1\n"
            "btx_grpc_request_duration_seconds_bucket{method=\"Heartbeat\",le=\"+Inf\"} 1\n"
            "btx_grpc_request_duration_seconds_sum{method=\"Heartbeat\"} 0.25\n"
            "btx_grpc_request_duration_seconds_count{method=\"Heartbeat\"} 1\n"
            "# HELP btx_grpc_requests_total gRPC requests handled.\n"
            "# TYPE btx_grpc_requests_total counter\n"
            "btx_grpc_requests_total{method=\"AcquireJob\",code=\"OK\"} 3\n"
            "btx_grpc_requests_total{method=\"AcquireJob\",code=\"UNAVAILABLE\"} 1\n"
            "# HELP btx_job_loss Latest loss.\n"
            "# TYPE btx_job_loss gauge\n"
            "btx_job_loss{pipeline=\"p1\",job=\"j1\"} NaN\n"
            "# HELP btx_workers_connected Workers with a live session.\n"
            "# TYPE btx_workers_connected gauge\n"
            "btx_workers_connected 2\n");
}

TEST(Serialize, UnlabelledSeriesExistAtZeroBeforeFirstUse) {
  Registry r;
  r.AddCounter("btx_lease_expirations_total", "Expired leases.");
  r.AddHistogram("btx_claim_latency_seconds", "Claim latency.", {1});
  EXPECT_EQ(r.Serialize(),
            "# HELP btx_claim_latency_seconds Claim latency.\n"
            "# TYPE btx_claim_latency_seconds histogram\n"
            "btx_claim_latency_seconds_bucket{le=\"1\"} 0\n"
            "btx_claim_latency_seconds_bucket{le=\"+Inf\"} 0\n"
            "btx_claim_latency_seconds_sum 0\n"
            "btx_claim_latency_seconds_count 0\n"
            "# HELP btx_lease_expirations_total Expired leases.\n"
            "# TYPE btx_lease_expirations_total counter\n"
            "btx_lease_expirations_total 0\n");
}

TEST(Serialize, LabelledFamilyWithoutSeriesStillDescribesItself) {
  Registry r;
  r.AddGauge("btx_jobs", "Jobs by state.", {"state", "kind"});
  EXPECT_EQ(r.Serialize(), "# HELP btx_jobs Jobs by state.\n# TYPE btx_jobs gauge\n");
}

TEST(Serialize, EscapesLabelValuesAndHelp) {
  Registry r;
  r.AddGauge("btx_job_eta_seconds", "Line one\\two\nthree \"quoted\"", {"name"})
      .WithLabels({"we\"ird\\na\nme"})
      .Set(1);
  EXPECT_EQ(r.Serialize(),
            "# HELP btx_job_eta_seconds Line one\\\\two\\nthree \"quoted\"\n"
            "# TYPE btx_job_eta_seconds gauge\n"
            "btx_job_eta_seconds{name=\"we\\\"ird\\\\na\\nme\"} 1\n");
}

TEST(Serialize, InvalidUtf8LabelValueIsReplacedConsistently) {
  Registry r;
  auto& f = r.AddGauge("btx_x", "x.", {"name"});
  f.WithLabels({"a\xFF"}).Set(1);
  f.WithLabels({"a\xFF"}).Inc();  // same series: the key is the sanitised value
  EXPECT_NE(r.Serialize().find("btx_x{name=\"a\xEF\xBF\xBD\"} 2\n"), std::string::npos);
  f.Remove({"a\xFF"});
  EXPECT_EQ(r.Serialize(), "# HELP btx_x x.\n# TYPE btx_x gauge\n");
}

TEST(Serialize, RemoveAndClearDropSeries) {
  Registry r;
  auto& progress = r.AddGauge("btx_job_progress_ratio", "Progress.", {"job"});
  progress.WithLabels({"a"}).Set(0.5);
  progress.WithLabels({"b"}).Set(0.25);
  progress.Remove({"a"});
  progress.Remove({"missing"});  // harmless: a finished job may be removed twice
  EXPECT_EQ(r.Serialize(),
            "# HELP btx_job_progress_ratio Progress.\n# TYPE btx_job_progress_ratio gauge\n"
            "btx_job_progress_ratio{job=\"b\"} 0.25\n");
  progress.Clear();
  EXPECT_EQ(r.Serialize(),
            "# HELP btx_job_progress_ratio Progress.\n# TYPE btx_job_progress_ratio gauge\n");
}

TEST(Values, CounterIgnoresNegativeAndNaN) {
  Counter c;
  c.Inc(2);
  c.Inc(-1);
  c.Inc(std::numeric_limits<double>::quiet_NaN());
  c.Inc();
  EXPECT_EQ(c.Value(), 3);
}

TEST(Values, GaugeArithmeticAndTime) {
  Gauge g;
  g.Set(5);
  g.Inc(2);
  g.Dec();
  g.Dec(10);
  EXPECT_EQ(g.Value(), -4);
  g.SetToCurrentTime();
  EXPECT_GT(g.Value(), 1.6e9);  // seconds, not milliseconds
  EXPECT_LT(g.Value(), 1e11);
}

}  // namespace
}  // namespace btx::metrics
