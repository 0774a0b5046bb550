// Observability end to end: a real Prometheus scrapes a real scheduler and two workers while a tiny
// BTX pipeline runs; then every PromQL expression of every Grafana panel is executed against it and
// must return data. Dashboards and exporters cannot drift apart without this failing. The daemons run
// as deployed (mutual TLS, tokens), so the authentication panels have refusals to show.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <httplib.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/scheduler/auth.h"
#include "btx/v1/pipeline_service.grpc.pb.h"
#include "cluster.h"
#include "test_certs.h"

namespace btx::e2e {
namespace {
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace fs = std::filesystem;

// Prometheus cannot report the port it bound, so take a free one from the kernel first.
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::vector<std::string> DashboardQueries() {
  PosixProcessLauncher launcher;
  ProcessSpec ps;
  ps.argv = {"/usr/bin/python3", Cat(BTX_SOURCE_DIR, "/deploy/grafana/extract_queries.py"), "--interval", "10s",
             "--range", "10m"};
  auto out = RunAndCapture(launcher, ps);
  EXPECT_TRUE(out.ok() && out->exit_code == 0) << (out.ok() ? out->output : out.status().ToString());
  std::vector<std::string> queries;
  for (auto& line : Split(out.ok() ? out->output : "", '\n', true)) queries.push_back(line);
  return queries;
}

// The experts run long enough (several seconds even on an idle machine) for the per-job gauges,
// which exist only while a job runs, to be scraped more than once: with a 1 s interval a scrape
// also times out after 1 s, and on a loaded machine a few in a row did, so 150 steps were missed.
std::string Spec(const std::string& data) {
  return "name: prom-e2e\n"
         "seed: {init: {preset: tiny}, pretrain: {data: {train: [" + data + "/prose/train.txt]}, steps: 20}}\n"
         "experts:\n"
         "  - {name: code, data: {train: " + data + "/code/train.txt, valid: " + data + "/code/valid.txt}, steps: 600}\n"
         "  - {name: math, data: {train: " + data + "/math/train.txt, valid: " + data + "/math/valid.txt}, steps: 600}\n"
         "train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, checkpoint_every: 50, log_every: 5, valid_tokens: 2048}\n"
         "merge: {method: btx}\n"
         "finetune: {top_k: 2, steps: 30}\n"
         "evaluate: {baselines: [seed, experts], max_tokens: 2048}\n";
}

// A second pipeline whose training jobs are gangs of both workers: queued behind the first, they wait
// (btx_gang_pending_nodes, btx_workers_offering), then run (btx_gang_member, btx_gangs_formed_total).
std::string GangSpec(const std::string& data) {
  return "name: prom-gang\n"
         "seed: {init: {preset: tiny}, pretrain: {data: {train: [" + data + "/prose/train.txt]}, steps: 60}}\n"
         "experts:\n"
         "  - {name: code, data: {train: " + data + "/code/train.txt}, steps: 60}\n"
         "train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, log_every: 5, valid_tokens: 1024}\n"
         "finetune: {steps: 10}\n"
         "evaluate: {max_tokens: 1024}\n"
         "resources: {nodes_per_job: 2}\n";
}

TEST(PrometheusE2e, EveryDashboardQueryReturnsDataFromALiveScrape) {
  if (!fs::exists("/usr/bin/prometheus")) GTEST_SKIP() << "prometheus is not installed (scripts/install-deps installs it)";
  const std::string pki = *MakeTempDir("btx-prom-pki");
  struct RemoveOnExit {
    std::string dir;
    ~RemoveOnExit() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } pki_cleanup{pki};
  btx::testing::TestCa ca(pki, "btx");
  const btx::testing::IssuedCert server = ca.IssueServer("scheduler"), worker = ca.IssueClient("node");
  std::ofstream(pki + "/tokens") << scheduler::TokenDigest("user-token") << " user e2e\ncert:node worker node\n";
  Cluster cluster({.tls = ClusterTls{.ca_file = ca.cert_file(), .server_cert = server.cert_file,
                                     .server_key = server.key_file, .worker_cert = worker.cert_file,
                                     .worker_key = worker.key_file, .tokens_file = pki + "/tokens",
                                     .client_token = "user-token"},
                   .worker_args = {"--advertise-host", "127.0.0.1"}});
  const std::string data = cluster.dir() + "/data";
  MakeCorpora(data, 60000);
  ASSERT_TRUE(cluster.Start().ok()) << cluster.DaemonLogs();

  const int port = FreePort();
  const std::string config = cluster.dir() + "/prometheus.yml";
  std::ofstream(config) << "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                        << "scrape_configs:\n"
                        << "  - job_name: btx-scheduler\n    static_configs: [{targets: ['127.0.0.1:"
                        << cluster.scheduler_metrics_port() << "']}]\n"
                        << "  - job_name: btx-worker\n    static_configs: [{targets: ['127.0.0.1:"
                        << cluster.worker_metrics_port(0) << "', '127.0.0.1:" << cluster.worker_metrics_port(1) << "']}]\n";
  PosixProcessLauncher launcher;
  ProcessSpec ps;
  ps.argv = {"/usr/bin/prometheus", "--config.file=" + config, "--storage.tsdb.path=" + cluster.dir() + "/prom",
             Cat("--web.listen-address=127.0.0.1:", port), "--log.level=warn"};
  ps.stdout_path = ps.stderr_path = cluster.dir() + "/prometheus.log";
  auto prom = launcher.Launch(ps);
  ASSERT_TRUE(prom.ok()) << prom.status();
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(30, 0);
  auto ready = [&] {
    auto r = http.Get("/-/ready");
    return r && r->status == 200;
  };
  const auto ready_deadline = std::chrono::steady_clock::now() + 60s;
  while (!ready() && std::chrono::steady_clock::now() < ready_deadline) std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(ready()) << ReadFile(cluster.dir() + "/prometheus.log").value_or("");

  const double start = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  // A rejected spec gives the error-rate panels a non-OK gRPC code to show, a wrong token the
  // authentication panel a refusal.
  EXPECT_FALSE(cluster.Submit("name: bad\nexperts: []\n").ok());
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer not-a-token");
    v1::ListPipelinesRequest req;
    v1::ListPipelinesResponse resp;
    EXPECT_EQ(cluster.pipelines().List(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  auto id = cluster.Submit(Spec(data));
  ASSERT_TRUE(id.ok()) << id.status();
  auto gang = cluster.Submit(GangSpec(data));
  ASSERT_TRUE(gang.ok()) << gang.status();
  ASSERT_EQ(cluster.WaitForPipeline(*id, 600s), "SUCCEEDED") << cluster.DaemonLogs();
  ASSERT_EQ(cluster.WaitForPipeline(*gang, 600s), "SUCCEEDED") << cluster.DaemonLogs();

  // Each expression over the whole run; wait for the scrapes after completion to land.
  const auto queries = DashboardQueries();
  ASSERT_GT(queries.size(), 20u);
  std::vector<std::string> empty;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  do {
    empty.clear();
    const double end = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    for (const auto& q : queries) {
      // GPU memory exists only where there is a GPU (docs/metrics.md); everything else must be there.
      if (q.find("btx_worker_gpu_memory_") != std::string::npos && !fs::exists("/dev/nvidia0")) continue;
      httplib::Params params = {{"query", q}, {"start", std::to_string(start)}, {"end", std::to_string(end)}, {"step", "1"}};
      auto r = http.Post("/api/v1/query_range", params);
      ASSERT_TRUE(r) << "query failed: " << q;
      ASSERT_EQ(r->status, 200) << q << "\n" << r->body;
      const json body = json::parse(r->body);
      ASSERT_EQ(body["status"], "success") << q;
      if (body["data"]["result"].empty()) empty.push_back(q);
    }
    if (empty.empty()) break;
    std::this_thread::sleep_for(1s);
  } while (std::chrono::steady_clock::now() < deadline);
  for (const auto& q : empty) ADD_FAILURE() << "no data for panel query: " << q;

  // The live daemons' expositions, after a whole pipeline (per-job series, histograms, every
  // label value seen), pass promtool's lint as well as Prometheus' parser.
  const std::string promtool = FindOnPath("promtool");
  EXPECT_FALSE(promtool.empty()) << "promtool ships with prometheus; it should be on PATH";
  for (const int metrics_port : {cluster.scheduler_metrics_port(), cluster.worker_metrics_port(0),
                                 cluster.worker_metrics_port(1)}) {
    if (promtool.empty()) break;
    httplib::Client daemon("127.0.0.1", metrics_port);
    auto r = daemon.Get("/metrics");
    ASSERT_TRUE(r && r->status == 200) << "scrape of port " << metrics_port;
    const std::string file = Cat(cluster.dir(), "/metrics-", metrics_port, ".txt");
    ASSERT_TRUE(WriteFileAtomic(file, r->body).ok());
    ProcessSpec lint;
    lint.argv = {"/bin/sh", "-c", Cat("'", promtool, "' check metrics < '", file, "'")};
    auto out = RunAndCapture(launcher, lint);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->exit_code, 0) << "port " << metrics_port << ": " << out->output;
  }
  (*prom)->Signal(SIGTERM);
  (*prom)->Wait();
}

}  // namespace
}  // namespace btx::e2e
