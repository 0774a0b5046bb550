// btx-train as several ranks over Gloo (label "distributed"): real processes meeting at a real TCP store.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/tokenizer.h"
#include "test_util.h"

extern char** environ;

namespace btx::model {
namespace {
using nlohmann::json;
using testing::TempDir;

// The rendezvous store: `btx-train --store-server 0` prints the port it bound.
class StoreServer {
 public:
  StoreServer() {
    int out[2];
    EXPECT_EQ(::pipe(out), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    const char* argv[] = {BTX_TRAIN_PATH, "--store-server", "0", nullptr};
    EXPECT_EQ(posix_spawn(&pid_, BTX_TRAIN_PATH, &fa, nullptr, const_cast<char**>(argv), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    FILE* f = ::fdopen(out[0], "r");
    EXPECT_EQ(std::fscanf(f, "port %d", &port_), 1);  // blocks until the store is listening
    std::fclose(f);
  }
  ~StoreServer() {
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }
  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

struct Rank {
  pid_t pid;
  std::string events, log;
};

// Starts one rank of `job` (env BTX_RANK, BTX_WORLD_SIZE, BTX_RENDEZVOUS); rank 0 gets the progress fd.
Rank Launch(const std::string& dir, const std::string& job, int rank, int world, int port) {
  Rank r{-1, dir + "/" + job + "." + std::to_string(rank) + ".events", dir + "/" + job + "." + std::to_string(rank) + ".log"};
  const std::string cmd = "exec env BTX_RANK=" + std::to_string(rank) + " BTX_WORLD_SIZE=" + std::to_string(world) +
                          " BTX_RENDEZVOUS=127.0.0.1:" + std::to_string(port) + " BTX_DIST_TIMEOUT_S=60 '" BTX_TRAIN_PATH
                          "' --job '" + dir + "/" + job + ".json' 3>'" + r.events + "' >'" + r.log + "' 2>&1";
  const char* argv[] = {"/bin/sh", "-c", cmd.c_str(), nullptr};
  EXPECT_EQ(posix_spawn(&r.pid, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  return r;
}

int Wait(const Rank& r) {
  int status = 0;
  ::waitpid(r.pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::vector<double> Losses(const std::string& events) {
  std::vector<double> out;
  std::ifstream in(events);
  std::string line;
  while (std::getline(in, line)) {
    auto e = json::parse(line, nullptr, false);
    if (e.is_object() && e.value("event", "") == "progress") out.push_back(e["loss"].get<double>());
  }
  return out;
}

class Distributed : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::WriteText(dir / "train.txt", testing::SampleText(200, 3));
    auto seed = LlamaModel::Init(testing::TinyConfig(), 5);
    auto staged = StagedDir::Create(dir / "seed");
    ASSERT_TRUE(WriteModelFiles(*seed, staged->path()).ok());
    ASSERT_TRUE(MakeByteTokenizer()->SaveTo(staged->path()).ok());
    ASSERT_TRUE(staged->Publish().ok());
  }
  // A branch job whose global batch is 8 sequences of 32 tokens in 2 micro-batches; one CPU thread per rank.
  void WriteJob(const std::string& name) {
    json job = {{"kind", "branch"},
                {"name", name},
                {"output_dir", dir / name},
                {"checkpoint_dir", dir / ("ck-" + name)},
                {"threads", 1},
                {"spec",
                 {{"seed", dir / "seed"},
                  {"data", {{"train", dir / "train.txt"}}},
                  {"train",
                   {{"batch_tokens", 256}, {"seq_len", 32}, {"grad_accum", 2}, {"lr", 3e-3}, {"warmup", 1},
                    {"log_every", 1}, {"checkpoint_every", 0}, {"valid_tokens", 64}}},
                  {"steps", 6}}}};
    testing::WriteText(dir / (name + ".json"), job.dump());
  }
  // Runs `name` as `world` ranks; returns rank 0's losses.
  std::vector<double> Run(const std::string& name, int world) {
    WriteJob(name);
    StoreServer store;
    std::vector<Rank> ranks;
    for (int r = 0; r < world; ++r) ranks.push_back(Launch(dir.path(), name, r, world, store.port()));
    for (const auto& r : ranks) EXPECT_EQ(Wait(r), 0) << *ReadFile(r.log);
    return Losses(ranks[0].events);
  }
  TempDir dir;
};

TEST_F(Distributed, OneTwoAndFourRanksFollowTheSameLossCurveForTheSameGlobalBatch) {
  const std::vector<double> one = Run("w1", 1), two = Run("w2", 2), four = Run("w4", 4);
  ASSERT_EQ(one.size(), 6u);
  ASSERT_EQ(two.size(), one.size());
  ASSERT_EQ(four.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) {
    // Only the order of floating-point sums differs (per-rank partial sums, then the all-reduce).
    EXPECT_NEAR(two[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
    EXPECT_NEAR(four[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
  }
  EXPECT_LT(one.back(), one.front());  // it learns
  // Rank 0 alone publishes; its weights match the one-rank run's.
  auto a = HfTensorSource::Open(dir / "w1"), b = HfTensorSource::Open(dir / "w2");
  ASSERT_TRUE(a.ok() && b.ok());
  for (const auto& name : a->Names()) {
    EXPECT_TRUE(at::allclose(*a->Load(name), *b->Load(name), 1e-4, 1e-5)) << name;
  }
  EXPECT_TRUE(VerifyManifest(dir / "w2").ok());
}

TEST_F(Distributed, ARankThatDiesEndsTheWholeGroupInsteadOfHangingIt) {
  WriteJob("dies");
  StoreServer store;
  Rank r0 = Launch(dir.path(), "dies", 0, 2, store.port());
  Rank r1 = Launch(dir.path(), "dies", 1, 2, store.port());
  // Kill rank 1 once training is under way (rank 0 reported a step).
  for (int i = 0; i < 3000 && Losses(r0.events).empty(); ++i) ::usleep(10000);
  ASSERT_FALSE(Losses(r0.events).empty()) << *ReadFile(r0.log);
  ::kill(r1.pid, SIGKILL);
  EXPECT_EQ(Wait(r1), 128 + SIGKILL);
  // Rank 0's next collective fails (the peer's connection closed) and it exits as a failure, not published.
  EXPECT_EQ(Wait(r0), 1) << *ReadFile(r0.log);
  EXPECT_NE(ReadFile(r0.log)->find("all-reduce failed"), std::string::npos) << *ReadFile(r0.log);
  EXPECT_FALSE(std::filesystem::exists(dir / "dies"));
}

}  // namespace
}  // namespace btx::model
