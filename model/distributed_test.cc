// btx-train as several ranks over Gloo (label "distributed"): real processes meeting at a real TCP store.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
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

// Starts one rank of `job` (env BTX_RANK, BTX_WORLD_SIZE, BTX_RENDEZVOUS); rank 0 gets the progress fd. Buckets
// of 16 KiB give the tiny model several, so that the overlapped all-reduces interleave with the backward pass.
Rank Launch(const std::string& dir, const std::string& job, int rank, int world, int port, const std::string& env = "") {
  Rank r{-1, dir + "/" + job + "." + std::to_string(rank) + ".events", dir + "/" + job + "." + std::to_string(rank) + ".log"};
  const std::string cmd = "exec env BTX_RANK=" + std::to_string(rank) + " BTX_WORLD_SIZE=" + std::to_string(world) +
                          " BTX_RENDEZVOUS=127.0.0.1:" + std::to_string(port) +
                          " BTX_DIST_TIMEOUT_S=60 BTX_DIST_BUCKET_BYTES=16384 " + env + " '" BTX_TRAIN_PATH
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
  // `train` overrides its train fields; `ck` names its checkpoint dir (default its own).
  void WriteJob(const std::string& name, const json& train = json::object(), int steps = 6, std::string ck = "") {
    if (ck.empty()) ck = "ck-" + name;
    json job = {{"kind", "branch"},
                {"name", name},
                {"output_dir", dir / name},
                {"checkpoint_dir", dir / ck},
                {"threads", 1},
                {"spec",
                 {{"seed", dir / "seed"},
                  {"data", {{"train", dir / "train.txt"}}},
                  {"train",
                   {{"batch_tokens", 256}, {"seq_len", 32}, {"grad_accum", 2}, {"lr", 3e-3}, {"warmup", 1},
                    {"log_every", 1}, {"checkpoint_every", 0}, {"valid_tokens", 64}}},
                  {"steps", steps}}}};
    job["spec"]["train"].update(train);
    testing::WriteText(dir / (name + ".json"), job.dump());
  }
  // Runs `name` (written with WriteJob) as `world` ranks; returns rank 0's losses.
  std::vector<double> RunJob(const std::string& name, int world, const std::string& env = "") {
    StoreServer store;
    std::vector<Rank> ranks;
    for (int r = 0; r < world; ++r) ranks.push_back(Launch(dir.path(), name, r, world, store.port(), env));
    for (const auto& r : ranks) EXPECT_EQ(Wait(r), 0) << *ReadFile(r.log);
    return Losses(ranks[0].events);
  }
  std::vector<double> Run(const std::string& name, int world, const json& train = json::object(), const std::string& env = "") {
    WriteJob(name, train);
    return RunJob(name, world, env);
  }
  // Every weight of two published model dirs: bitwise equal, or within a tolerance.
  void ExpectSameWeights(const std::string& a_dir, const std::string& b_dir, bool exact) {
    auto a = HfTensorSource::Open(dir / a_dir), b = HfTensorSource::Open(dir / b_dir);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_FALSE(a->Names().empty());
    for (const auto& name : a->Names()) {
      if (exact)
        EXPECT_TRUE(at::equal(*a->Load(name), *b->Load(name))) << name;
      else
        EXPECT_TRUE(at::allclose(*a->Load(name), *b->Load(name), 1e-4, 1e-5)) << name;
    }
  }
  TempDir dir;
};

TEST_F(Distributed, OneTwoAndFourRanksFollowTheSameLossCurveForTheSameGlobalBatch) {
  // ZeRO-1 is the default with several ranks; w2r replicates the optimizer (train.zero 0).
  const std::vector<double> one = Run("w1", 1), two = Run("w2", 2), four = Run("w4", 4),
                            replicated = Run("w2r", 2, {{"zero", 0}});
  ASSERT_EQ(one.size(), 6u);
  ASSERT_EQ(two.size(), one.size());
  ASSERT_EQ(four.size(), one.size());
  ASSERT_EQ(replicated.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) {
    // Only the order of floating-point sums differs (per-rank partial sums, then the all-reduce; the gradient
    // norm as a sum of per-shard sums).
    EXPECT_NEAR(two[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
    EXPECT_NEAR(four[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
    EXPECT_NEAR(replicated[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
  }
  EXPECT_LT(one.back(), one.front());  // it learns
  // Rank 0 alone publishes; its weights match the one-rank run's, so the all-gather of the shards is complete.
  ExpectSameWeights("w1", "w2", false);
  ExpectSameWeights("w1", "w4", false);
  ExpectSameWeights("w1", "w2r", false);
  EXPECT_TRUE(VerifyManifest(dir / "w2").ok());
  // Each rank wrote its optimizer shard into the final checkpoint.
  for (const char* f : {"optimizer-00000-of-00004.safetensors", "optimizer-00003-of-00004.safetensors"})
    EXPECT_TRUE(std::filesystem::exists(dir / (std::string("ck-w4/step-00000006/") + f))) << f;
  EXPECT_TRUE(std::filesystem::exists(dir / "ck-w2r/step-00000006/optimizer-00000-of-00001.safetensors"));
}

// Chat data: rows hold different numbers of counted (assistant) targets. Each rank weights its rows' mean loss by
// their share of the micro-batch's counted targets, so two ranks follow one rank's curve (weighting by rows would
// not: the mean of per-rank means is not the mean over the batch).
TEST_F(Distributed, ChatDataAveragesOverTheCountedTokensOfTheWholeBatch) {
  std::string chat;
  for (int i = 0; i < 80; ++i) {
    const json m = {{{"role", "user"}, {"content", std::string("q").append(std::to_string(i))}},
                    {{"role", "assistant"}, {"content", std::string(1 + (i * 7) % 23, static_cast<char>('a' + i % 26))}}};
    chat += json{{"messages", m}}.dump() + "\n";
  }
  testing::WriteText(dir / "chat.jsonl", chat);
  auto run = [&](const std::string& name, int world) {
    WriteJob(name);
    json job = json::parse(*ReadFile(dir / (name + ".json")));
    job["spec"]["data"] = {{"train", dir / "chat.jsonl"}, {"format", "chat"}};
    testing::WriteText(dir / (name + ".json"), job.dump());
    return RunJob(name, world);
  };
  const std::vector<double> one = run("chat1", 1), two = run("chat2", 2);
  ASSERT_EQ(one.size(), 6u);
  ASSERT_EQ(two.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) EXPECT_NEAR(two[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
  ExpectSameWeights("chat1", "chat2", false);
}

// The all-reduce of each bucket launched from the backward pass's hooks sums the same buffers in the same
// collectives as the all-reduce after the backward pass: the runs are bitwise equal.
TEST_F(Distributed, OverlappedGradientSyncIsBitwiseEqualToSyncAfterBackward) {
  const std::vector<double> on = Run("on", 2, json::object(), "BTX_DIST_OVERLAP=1"),
                            off = Run("off", 2, json::object(), "BTX_DIST_OVERLAP=0");
  ASSERT_EQ(on.size(), 6u);
  ASSERT_EQ(off.size(), on.size());
  for (size_t i = 0; i < on.size(); ++i) EXPECT_EQ(on[i], off[i]) << "step " << i + 1;
  ExpectSameWeights("on", "off", true);
  // The overlapped run did start all-reduces from the hooks (the last bucket may wait for Finish), the other none.
  for (int r = 0; r < 2; ++r) {
    const std::string on_log = *ReadFile(dir / ("on." + std::to_string(r) + ".log")),
                      off_log = *ReadFile(dir / ("off." + std::to_string(r) + ".log"));
    EXPECT_NE(off_log.find(" 0 all-reduced during"), std::string::npos) << off_log;
    EXPECT_EQ(on_log.find(" 0 all-reduced during"), std::string::npos) << on_log;
    EXPECT_NE(on_log.find("all-reduced during the backward pass"), std::string::npos) << on_log;
  }
}

// 3 steps, a checkpoint, then 3 more in a new group from that checkpoint: the same bits as 6 steps straight.
// (The constant schedule makes the two jobs' learning rates independent of their step counts.)
TEST_F(Distributed, ResumeAtTheSameWorldSizeIsBitwiseIdentical) {
  const json train = {{"schedule", "constant"}, {"grad_clip", 0.5}};
  const std::vector<double> straight = Run("straight", 2, train);
  WriteJob("first", train, 3, "ck-resumed");
  const std::vector<double> first = RunJob("first", 2);
  ASSERT_TRUE(std::filesystem::exists(dir / "ck-resumed/step-00000003/optimizer-00001-of-00002.safetensors"));
  ASSERT_TRUE(VerifyManifest(dir / "ck-resumed/step-00000003").ok());
  WriteJob("second", train, 6, "ck-resumed");
  const std::vector<double> second = RunJob("second", 2);
  ASSERT_EQ(straight.size(), 6u);
  ASSERT_EQ(first.size(), 3u);
  ASSERT_EQ(second.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(first[i], straight[i]) << "step " << i + 1;
    EXPECT_EQ(second[i], straight[i + 3]) << "step " << i + 4;
  }
  ExpectSameWeights("straight", "second", true);
}

// Checkpoints written by 2 ranks resume on 1, whose checkpoint resumes on 3: the loader reassembles the flat
// optimizer state from the shards and slices it anew. The curve continues the uninterrupted one's.
TEST_F(Distributed, ResumeReshardsTheOptimizerStateAcrossWorldSizes) {
  const json train = {{"schedule", "constant"}};
  const std::vector<double> straight = Run("uninterrupted", 1, train);
  WriteJob("two", train, 2, "ck-reshard");
  const std::vector<double> two = RunJob("two", 2);
  WriteJob("one", train, 4, "ck-reshard");
  const std::vector<double> one = RunJob("one", 1);
  ASSERT_TRUE(std::filesystem::exists(dir / "ck-reshard/step-00000004/optimizer-00000-of-00001.safetensors"));
  WriteJob("three", train, 6, "ck-reshard");
  const std::vector<double> three = RunJob("three", 3);
  ASSERT_TRUE(std::filesystem::exists(dir / "ck-reshard/step-00000006/optimizer-00002-of-00003.safetensors"));
  std::vector<double> resumed = two;
  resumed.insert(resumed.end(), one.begin(), one.end());
  resumed.insert(resumed.end(), three.begin(), three.end());
  ASSERT_EQ(straight.size(), 6u);
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_NEAR(resumed[i], straight[i], 1e-4 * std::abs(straight[i])) << "step " << i + 1;
  ExpectSameWeights("uninterrupted", "three", false);
}

// train.precision bf16 (CPU autocast; float32 weights and optimizer state): learns, repeats itself bit for bit,
// and is not the float32 run.
TEST_F(Distributed, Bf16AutocastTrainsDeterministically) {
  const json bf16 = {{"precision", "bf16"}};
  const std::vector<double> a = Run("bf16a", 1, bf16), b = Run("bf16b", 1, bf16), f = Run("fp32", 1);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), a.size());
  ASSERT_EQ(f.size(), a.size());
  EXPECT_LT(a.back(), a.front() - 0.1);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i], b[i]) << "step " << i + 1;
    EXPECT_NEAR(a[i], f[i], 0.05 * f[i]) << "step " << i + 1;  // bf16 rounding, not another model
  }
  EXPECT_NE(a, f);
  ExpectSameWeights("bf16a", "bf16b", true);
  // The published weights are float32 (master weights), not bf16-rounded.
  auto w = HfTensorSource::Open(dir / "bf16a");
  ASSERT_TRUE(w.ok());
  at::Tensor t = *w->Load("model.norm.weight");
  EXPECT_FALSE(at::equal(t, t.to(at::kBFloat16).to(at::kFloat)));
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
  // Rank 0's next collective fails (the peer's connection closed) and it exits as a failure, not published, well
  // before the collectives' timeout (60 s).
  const auto killed = std::chrono::steady_clock::now();
  EXPECT_EQ(Wait(r0), 1) << *ReadFile(r0.log);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, std::chrono::seconds(30));
  EXPECT_NE(ReadFile(r0.log)->find("failed (another rank died or timed out?)"), std::string::npos) << *ReadFile(r0.log);
  EXPECT_FALSE(std::filesystem::exists(dir / "dies"));
}

}  // namespace
}  // namespace btx::model
