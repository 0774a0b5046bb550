// The daemons as deployed beyond one machine: btx-scheduler serving mutual TLS with tokens,
// btx-worker presenting a client certificate, the real btx-train on a tiny pipeline; and the
// start-up refusals and warnings of insecure configurations.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/scheduler/auth.h"
#include "cluster.h"
#include "test_certs.h"

namespace btx::e2e {
namespace {
using namespace std::chrono_literals;

std::string Bin(const std::string& name) { return Cat(BTX_BIN_DIR, "/", name); }

// Four small jobs (pretrain, upcycle merge, router finetune, eval): each one a real btx-train run
// leased over mutual TLS.
std::string TinySpec(const std::string& data) {
  return "name: tls-tiny\n"
         "seed:\n"
         "  init: {preset: tiny}\n"
         "  pretrain: {data: {train: [" + data + "/code/train.txt]}, steps: 2}\n"
         "experts:\n"
         "  - {name: code, data: {train: " + data + "/code/train.txt, valid: " + data + "/code/valid.txt}, steps: 1}\n"
         "train: {batch_tokens: 256, seq_len: 32, lr: 3e-3, warmup: 1, checkpoint_every: 10, log_every: 1, valid_tokens: 512}\n"
         "merge: {method: upcycle}\n"
         "finetune: {top_k: 1, steps: 1}\n"
         "evaluate: {baselines: [], max_tokens: 512}\n";
}

// Runs a daemon to its exit (it is expected to refuse to start) and returns {exit code, output}.
std::pair<int, std::string> RunToExit(std::vector<std::string> argv, const std::string& dir) {
  PosixProcessLauncher launcher;
  ProcessSpec ps;
  ps.argv = std::move(argv);
  ps.stdout_path = ps.stderr_path = dir + "/refused.log";
  auto proc = launcher.Launch(ps);
  if (!proc.ok()) return {-1, std::string(proc.status().message())};
  const int code = (*proc)->Wait();
  return {code, ReadFile(dir + "/refused.log").value_or("")};
}

class TlsE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = *MakeTempDir("btx-tls-e2e");
    ca_ = std::make_unique<btx::testing::TestCa>(dir_, "btx");
    server_ = ca_->IssueServer("scheduler");
    worker_ = ca_->IssueClient("node-1");
    tokens_file_ = dir_ + "/tokens";
    unlisted_ = ca_->IssueClient("node-9");
    // Workers are listed: a certificate our CA signed is not one by itself.
    std::ofstream(tokens_file_) << scheduler::TokenDigest("user-token") << " user e2e\ncert:node-1 worker node-1\n";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  ClusterTls Tls() const {
    return {.ca_file = ca_->cert_file(), .server_cert = server_.cert_file, .server_key = server_.key_file,
            .worker_cert = worker_.cert_file, .worker_key = worker_.key_file, .tokens_file = tokens_file_,
            .client_token = "user-token"};
  }

  std::string dir_, tokens_file_;
  std::unique_ptr<btx::testing::TestCa> ca_;
  btx::testing::IssuedCert server_, worker_, unlisted_;
};

TEST_F(TlsE2eTest, TinyPipelineRunsOverMutualTls) {
  Cluster cluster({.workers = 1, .tls = Tls()});
  const std::string data = cluster.dir() + "/data";
  MakeCorpora(data, 20000);
  ASSERT_TRUE(cluster.Start().ok()) << cluster.DaemonLogs();
  auto id = cluster.Submit(TinySpec(data));
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_EQ(cluster.WaitForPipeline(*id, 300s), "SUCCEEDED") << cluster.DaemonLogs();
  const std::string scheduler_log = ReadFile(cluster.dir() + "/scheduler.log").value_or("");
  EXPECT_NE(scheduler_log.find("TLS with authentication"), std::string::npos) << scheduler_log;
  EXPECT_EQ(scheduler_log.find("INSECURE"), std::string::npos) << scheduler_log;

  // A worker with TLS but neither a certificate nor a token is refused, and says so in its exit.
  auto [code, log] = RunToExit({Bin("btx-worker"), "--scheduler", cluster.scheduler_address(), "--tls-ca",
                                ca_->cert_file(), "--name", "intruder", "--work-dir", dir_ + "/intruder",
                                "--metrics-listen", ""},
                               dir_);
  EXPECT_EQ(code, 1) << log;
  EXPECT_NE(log.find("registration refused: no credentials"), std::string::npos) << log;
  // Nor is one whose certificate our CA signed but the identities file does not list.
  std::tie(code, log) = RunToExit({Bin("btx-worker"), "--scheduler", cluster.scheduler_address(), "--tls-ca",
                                   ca_->cert_file(), "--tls-cert", unlisted_.cert_file, "--tls-key",
                                   unlisted_.key_file, "--name", "unlisted", "--work-dir", dir_ + "/unlisted",
                                   "--metrics-listen", ""},
                                  dir_);
  EXPECT_EQ(code, 1) << log;
  EXPECT_NE(log.find("'node-9' is not listed in the identities file"), std::string::npos) << log;
  auto workers = cluster.store().ListWorkers();
  ASSERT_TRUE(workers.ok());
  ASSERT_EQ(workers->size(), 1u);
  EXPECT_EQ(workers->front().name, "w0");
}

TEST_F(TlsE2eTest, InsecureConfigurationsAreRefusedOrWarnedAbout) {
  // Plaintext on an address other machines can reach: refused before touching the database.
  auto [code, out] = RunToExit({Bin("btx-scheduler"), "--listen", "0.0.0.0:0", "--database-url", "host=/nonexistent"}, dir_);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("refusing to serve plaintext gRPC without authentication on 0.0.0.0:0"), std::string::npos) << out;
  EXPECT_NE(out.find("--allow-insecure-remote"), std::string::npos) << out;
  // Tokens would cross the network in plain text.
  std::tie(code, out) = RunToExit(
      {Bin("btx-scheduler"), "--listen", "127.0.0.1:0", "--tokens-file", tokens_file_, "--database-url", "host=/nonexistent"},
      dir_);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("--tokens-file needs --tls-cert and --tls-key"), std::string::npos) << out;
  // A key that is not the certificate's.
  std::tie(code, out) = RunToExit({Bin("btx-scheduler"), "--listen", "127.0.0.1:0", "--tls-cert", server_.cert_file,
                                   "--tls-key", worker_.key_file, "--database-url", "host=/nonexistent"},
                                  dir_);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("does not belong to the certificate"), std::string::npos) << out;
  // A worker whose certificate has no key.
  std::tie(code, out) = RunToExit({Bin("btx-worker"), "--scheduler", "127.0.0.1:1", "--tls-ca", ca_->cert_file(),
                                   "--tls-cert", worker_.cert_file, "--metrics-listen", ""},
                                  dir_);
  EXPECT_EQ(code, 2) << out;
  EXPECT_NE(out.find("needs its key"), std::string::npos) << out;

  // Plaintext on loopback starts, with a warning in its log.
  Cluster cluster({.workers = 0});
  ASSERT_TRUE(cluster.Start().ok());
  const std::string log = ReadFile(cluster.dir() + "/scheduler.log").value_or("");
  EXPECT_NE(log.find("[warning] INSECURE: plaintext gRPC without authentication on 127.0.0.1:0"), std::string::npos)
      << log;
}

}  // namespace
}  // namespace btx::e2e
