// Integration: a real HTTP scrape of a real Exposer, checked by Prometheus' own linter.
#include "btx/metrics/exposer.h"

#include <httplib.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace btx::metrics {
namespace {

// $PROMTOOL if set, else the first promtool on $PATH; empty when there is none.
std::string FindPromtool() {
  if (const char* env = std::getenv("PROMTOOL"); env && *env) return env;
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  for (std::string dir; std::getline(dirs, dir, ':');) {
    const auto candidate = std::filesystem::path(dir.empty() ? "." : dir) / "promtool";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return {};
}

struct CommandResult {
  int exit_code;
  std::string output;
};

CommandResult RunWithStdin(const std::string& command, const std::string& input) {
  const auto dir = std::filesystem::temp_directory_path();
  const auto in = dir / ("btx_metrics_in_" + std::to_string(::getpid()));
  const auto out = dir / ("btx_metrics_out_" + std::to_string(::getpid()));
  std::ofstream(in) << input;
  const int status =
      std::system((command + " < '" + in.string() + "' > '" + out.string() + "' 2>&1").c_str());
  std::stringstream text;
  text << std::ifstream(out).rdbuf();
  std::filesystem::remove(in);
  std::filesystem::remove(out);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text.str()};
}

// A registry resembling the scheduler's, with every metric type and awkward values.
void Populate(Registry& r) {
  auto& jobs = r.AddGauge("btx_jobs", "Jobs by lifecycle state and kind.", {"state", "kind"});
  jobs.WithLabels({"READY", "branch"}).Set(3);
  jobs.WithLabels({"LEASED", "finetune"}).Set(1);
  r.AddCounter("btx_grpc_requests_total", "gRPC requests by method and status code.",
               {"method", "code"})
      .WithLabels({"/btx.v1.WorkerService/AcquireJob", "OK"})
      .Inc(7);
  auto& latency = r.AddHistogram("btx_dispatch_latency_seconds",
                                 "Time from READY to LEASED.", ExponentialBuckets(0.005, 2, 12));
  for (double v : {0.001, 0.02, 0.3, 4.0, 1e6}) latency.WithLabels({}).Observe(v);
  r.AddGauge("btx_job_loss", "Latest training loss \"nats/token\"\\per job.\nSecond line.",
             {"pipeline", "job", "kind", "name"})
      .WithLabels({"p-1", "j-1", "branch", "ma\"th\\\n"})
      .Set(2.5);
  r.AddGauge("btx_job_eta_seconds", "Estimated seconds to completion.", {"job"})
      .WithLabels({"j-1"})
      .Set(std::numeric_limits<double>::infinity());
  r.AddGauge("btx_build_info", "Build information; always 1.", {"version"})
      .WithLabels({"0.1.0"})
      .Set(1);
}

TEST(Exposer, ServesMetricsThatPromtoolAccepts) {
  Registry registry;
  Populate(registry);
  Exposer exposer(registry, "127.0.0.1", 0);
  ASSERT_GT(exposer.port(), 0);

  httplib::Client client("127.0.0.1", exposer.port());
  auto res = client.Get("/metrics");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(res->body, registry.Serialize());

  // Values set after the exposer started are visible on the next scrape.
  registry.AddGauge("btx_workers_connected", "Workers with a live session.")
      .WithLabels({})
      .Set(4);
  res = client.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_NE(res->body.find("btx_workers_connected 4\n"), std::string::npos);

  const std::string promtool = FindPromtool();
  if (promtool.empty()) GTEST_SKIP() << "promtool is not installed; skipping the lint step";
  const auto check = RunWithStdin("'" + promtool + "' check metrics", res->body);
  EXPECT_EQ(check.exit_code, 0) << check.output << "\n--- body ---\n" << res->body;
}

TEST(Exposer, HealthzAndUnknownPaths) {
  Registry registry;
  Exposer exposer(registry, "127.0.0.1", 0);
  httplib::Client client("127.0.0.1", exposer.port());
  auto res = client.Get("/healthz");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(res->body, "ok\n");
  res = client.Get("/nope");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
}

TEST(Exposer, BindFailureNamesTheAddress) {
  Registry registry;
  Exposer first(registry, "127.0.0.1", 0);
  const std::string address = "127.0.0.1:" + std::to_string(first.port());
  try {
    Exposer second(registry, "127.0.0.1", first.port());
    FAIL() << "second bind to " << address << " succeeded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(address), std::string::npos) << e.what();
  }
}

TEST(Exposer, ImmediateDestructionDoesNotHang) {
  Registry registry;
  for (int i = 0; i < 20; ++i) Exposer exposer(registry, "127.0.0.1", 0);
}

}  // namespace
}  // namespace btx::metrics
