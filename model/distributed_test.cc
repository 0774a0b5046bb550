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

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <iostream>

#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/tokenizer.h"
#include "btx/model/zero3.h"
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

// ---- ZeRO-3 (train.zero 3): parameters, gradients and optimizer state sharded ----

// Largest relative difference of two loss curves (printed: the tolerance achieved).
double MaxRelDiff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]) / std::abs(b[i]));
  return m;
}

// The same global batch, with global-norm clipping active (0.1 is below the tiny model's gradient norm): ZeRO-3 on 2
// ranks follows ZeRO-1 on 2 ranks and one rank within 1e-4 (relative) and ends with the same weights within 1e-4.
// The layers' gradients are reduce-scattered per micro-batch (ZeRO-1 sums after accumulating): only the order of
// floating-point sums differs.
TEST_F(Distributed, Zero3FollowsZero1AndOneRankForTheSameGlobalBatch) {
  const json train = {{"grad_clip", 0.1}};
  const std::vector<double> one = Run("z1w1", 1, train), zero1 = Run("z1w2", 2, train),
                            zero3 = Run("z3w2", 2, {{"grad_clip", 0.1}, {"zero", 3}});
  ASSERT_EQ(one.size(), 6u);
  ASSERT_EQ(zero1.size(), one.size());
  ASSERT_EQ(zero3.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_NEAR(zero3[i], zero1[i], 1e-4 * std::abs(zero1[i])) << "step " << i + 1;
    EXPECT_NEAR(zero3[i], one[i], 1e-4 * std::abs(one[i])) << "step " << i + 1;
  }
  std::cout << "zero3 vs zero1 (2 ranks): max relative loss difference " << MaxRelDiff(zero3, zero1)
            << "; vs 1 rank " << MaxRelDiff(zero3, one) << "\n";
  EXPECT_LT(zero3.back(), zero3.front());
  ExpectSameWeights("z1w2", "z3w2", false);
  ExpectSameWeights("z1w1", "z3w2", false);
  EXPECT_TRUE(VerifyManifest(dir / "z3w2").ok());
  for (int r = 0; r < 2; ++r) {
    const std::string log = *ReadFile(dir / ("z3w2." + std::to_string(r) + ".log"));
    EXPECT_NE(log.find("sharded (ZeRO-3)"), std::string::npos) << log;
  }
  // The memory model at job start accounts for the sharded parameters and gradients.
  EXPECT_NE(ReadFile(dir / "z3w2.0.log")->find("gathered, ZeRO-3)"), std::string::npos) << *ReadFile(dir / "z3w2.0.log");
  // Each rank's optimizer shard holds its part of every unit (several ranges of the flat layout).
  auto state = json::parse(*ReadFile(dir / "ck-z3w2/step-00000006/trainer_state.json"));
  EXPECT_EQ(state["optimizer"]["zero"], 3);
  ASSERT_EQ(state["optimizer"]["shards"].size(), 2u);
  EXPECT_GT(state["optimizer"]["shards"][1]["ranges"].size(), 1u);
}

// bf16 autocast with float32 master weights behaves as with ZeRO-1.
TEST_F(Distributed, Zero3Bf16FollowsZero1Bf16) {
  const std::vector<double> zero1 = Run("b1", 2, {{"precision", "bf16"}}),
                            zero3 = Run("b3", 2, {{"precision", "bf16"}, {"zero", 3}});
  ASSERT_EQ(zero1.size(), 6u);
  ASSERT_EQ(zero3.size(), zero1.size());
  for (size_t i = 0; i < zero1.size(); ++i) EXPECT_NEAR(zero3[i], zero1[i], 1e-3 * std::abs(zero1[i])) << "step " << i + 1;
  std::cout << "bf16: zero3 vs zero1 (2 ranks): max relative loss difference " << MaxRelDiff(zero3, zero1) << "\n";
  EXPECT_NE(ReadFile(dir / "b3.1.log")->find("sharded (ZeRO-3)"), std::string::npos) << *ReadFile(dir / "b3.1.log");
  ExpectSameWeights("b1", "b3", false);
}

// 3 steps, a checkpoint, then 3 more in a new group from that checkpoint: the same bits as 6 steps straight.
TEST_F(Distributed, Zero3ResumeAtTheSameWorldSizeIsBitwiseIdentical) {
  const json train = {{"schedule", "constant"}, {"grad_clip", 0.5}, {"zero", 3}};
  const std::vector<double> straight = Run("z3straight", 2, train);
  WriteJob("z3first", train, 3, "ck-z3resumed");
  const std::vector<double> first = RunJob("z3first", 2);
  ASSERT_TRUE(std::filesystem::exists(dir / "ck-z3resumed/step-00000003/optimizer-00001-of-00002.safetensors"));
  ASSERT_TRUE(VerifyManifest(dir / "ck-z3resumed/step-00000003").ok());
  WriteJob("z3second", train, 6, "ck-z3resumed");
  const std::vector<double> second = RunJob("z3second", 2);
  ASSERT_EQ(straight.size(), 6u);
  ASSERT_EQ(first.size(), 3u);
  ASSERT_EQ(second.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(first[i], straight[i]) << "step " << i + 1;
    EXPECT_EQ(second[i], straight[i + 3]) << "step " << i + 4;
  }
  ExpectSameWeights("z3straight", "z3second", true);
}

// ZeRO-3 on 2 ranks -> 1 rank -> ZeRO-3 on 3 ranks -> ZeRO-1 on 2 ranks, from each other's checkpoints: the
// optimizer state is reassembled from whatever ranges the saved shards hold, so the curve continues the
// uninterrupted one-rank run's (within 1e-4), and ZeRO-1 and ZeRO-3 checkpoints are interchangeable.
TEST_F(Distributed, Zero3ResumeReshardsAcrossWorldSizesAndZeroStages) {
  const json z3 = {{"schedule", "constant"}, {"zero", 3}}, z1 = {{"schedule", "constant"}, {"zero", 1}};
  WriteJob("z3uninterrupted", z1, 8);
  const std::vector<double> straight = RunJob("z3uninterrupted", 1);
  WriteJob("z3two", z3, 2, "ck-z3reshard");
  const std::vector<double> two = RunJob("z3two", 2);
  WriteJob("z3one", z3, 4, "ck-z3reshard");
  const std::vector<double> one = RunJob("z3one", 1);
  WriteJob("z3three", z3, 6, "ck-z3reshard");
  const std::vector<double> three = RunJob("z3three", 3);
  ASSERT_TRUE(std::filesystem::exists(dir / "ck-z3reshard/step-00000006/optimizer-00002-of-00003.safetensors"));
  WriteJob("z1after", z1, 8, "ck-z3reshard");
  const std::vector<double> after = RunJob("z1after", 2);
  std::vector<double> resumed = two;
  for (const auto* part : {&one, &three, &after}) resumed.insert(resumed.end(), part->begin(), part->end());
  ASSERT_EQ(straight.size(), 8u);
  ASSERT_EQ(resumed.size(), straight.size());
  for (size_t i = 0; i < straight.size(); ++i)
    EXPECT_NEAR(resumed[i], straight[i], 1e-4 * std::abs(straight[i])) << "step " << i + 1;
  std::cout << "resharded 2 -> 1 -> 3 (ZeRO-3) -> 2 (ZeRO-1): max relative loss difference "
            << MaxRelDiff(resumed, straight) << "\n";
  ExpectSameWeights("z3uninterrupted", "z1after", false);
}

// The merged MoE's finetune (router training: everything but the routers frozen) with ZeRO-3: frozen parameters
// stay whole and take no gradients; the routers are sharded. Same curve as ZeRO-1.
TEST_F(Distributed, Zero3FinetunesTheRoutersOfAnMoe) {
  auto moe = LlamaModel::Init(testing::TinyConfig(4), 7);
  auto staged = StagedDir::Create(dir / "moe");
  ASSERT_TRUE(WriteModelFiles(*moe, staged->path()).ok());
  ASSERT_TRUE(MakeByteTokenizer()->SaveTo(staged->path()).ok());
  ASSERT_TRUE(staged->Publish().ok());
  auto run = [&](const std::string& name, int zero) {
    json job = {{"kind", "finetune"},
                {"name", name},
                {"output_dir", dir / name},
                {"checkpoint_dir", dir / ("ck-" + name)},
                {"threads", 1},
                {"spec",
                 {{"model", dir / "moe"},
                  {"mixture", {{{"name", "a"}, {"train", dir / "train.txt"}}}},
                  {"freeze", {"all_but_router"}},
                  {"train",
                   {{"batch_tokens", 256}, {"seq_len", 32}, {"grad_accum", 2}, {"lr", 1e-2}, {"warmup", 1},
                    {"log_every", 1}, {"checkpoint_every", 0}, {"valid_tokens", 64}, {"zero", zero}}},
                  {"steps", 4}}}};
    testing::WriteText(dir / (name + ".json"), job.dump());
    return RunJob(name, 2);
  };
  const std::vector<double> zero1 = run("moe1", 1), zero3 = run("moe3", 3);
  ASSERT_EQ(zero1.size(), 4u);
  ASSERT_EQ(zero3.size(), zero1.size());
  for (size_t i = 0; i < zero1.size(); ++i) EXPECT_NEAR(zero3[i], zero1[i], 1e-4 * std::abs(zero1[i])) << "step " << i + 1;
  std::cout << "MoE router finetune: zero3 vs zero1 (2 ranks): max relative loss difference " << MaxRelDiff(zero3, zero1)
            << "\n";
  ExpectSameWeights("moe1", "moe3", false);
  // Only the routers are sharded: the outer unit is empty, each layer's unit is its gate.
  const std::string log = *ReadFile(dir / "moe3.1.log");
  EXPECT_NE(log.find("sharded (ZeRO-3)"), std::string::npos) << log;
  EXPECT_NE(log.find("(outer 0, largest layer 128)"), std::string::npos) << log;
  // Frozen experts come out as they went in.
  auto before = HfTensorSource::Open(dir / "moe"), after = HfTensorSource::Open(dir / "moe3");
  ASSERT_TRUE(before.ok() && after.ok());
  for (const auto& name : before->Names())
    if (name.find("block_sparse_moe.gate.") == std::string::npos) EXPECT_TRUE(at::equal(*before->Load(name), *after->Load(name))) << name;
}

// A rank killed mid-training: the other's next gather or reduce-scatter (inside forward or backward) fails, and
// it exits 1 naming the step instead of hanging.
TEST_F(Distributed, Zero3ARankThatDiesEndsTheWholeGroup) {
  WriteJob("z3dies", {{"zero", 3}}, 200);
  StoreServer store;
  Rank r0 = Launch(dir.path(), "z3dies", 0, 2, store.port());
  Rank r1 = Launch(dir.path(), "z3dies", 1, 2, store.port());
  for (int i = 0; i < 3000 && Losses(r0.events).empty(); ++i) ::usleep(10000);
  ASSERT_FALSE(Losses(r0.events).empty()) << *ReadFile(r0.log);
  ::kill(r1.pid, SIGKILL);
  EXPECT_EQ(Wait(r1), 128 + SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  EXPECT_EQ(Wait(r0), 1) << *ReadFile(r0.log);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, std::chrono::seconds(30));
  EXPECT_NE(ReadFile(r0.log)->find("failed (another rank died or timed out?)"), std::string::npos) << *ReadFile(r0.log);
  EXPECT_FALSE(std::filesystem::exists(dir / "z3dies"));
}

// The ZeRO-3 unit function in one process: a fake group whose other rank's shard is known, and whose
// reduce-scatter adds a given contribution of the other ranks.
class FakeComm : public ShardComm {
 public:
  FakeComm(int rank, std::vector<at::Tensor> shards, at::Tensor others = {})
      : rank_(rank), shards_(std::move(shards)), others_(std::move(others)) {}
  int rank() const override { return rank_; }
  int world_size() const override { return static_cast<int>(shards_.size()); }
  Status AllGather(const at::Tensor& mine, at::Tensor& full) override {
    ++gathers;
    const int64_t s = mine.numel();
    EXPECT_EQ(full.numel(), s * world_size());
    for (int r = 0; r < world_size(); ++r) full.narrow(0, r * s, s).copy_(r == rank_ ? mine : shards_[r]);
    return Status::Ok();
  }
  StatusOr<at::Tensor> ReduceScatter(at::Tensor& full) override {
    ++scatters;
    const int64_t s = full.numel() / world_size();
    at::Tensor sum = others_.defined() ? full + others_ : full;
    return sum.narrow(0, rank_ * s, s).clone();
  }
  int gathers = 0, scatters = 0;

 private:
  int rank_;
  std::vector<at::Tensor> shards_;
  at::Tensor others_;
};

// A small two-output "layer" in float64: y = x + W2 tanh(W1 x + b1), aux = mean(tanh(...)^2).
std::vector<at::Tensor> TinyLayer(const at::Tensor& x, const std::unordered_map<std::string, at::Tensor>& w) {
  at::Tensor h = at::tanh(at::linear(x, w.at("u.w1"), w.at("u.b1")));
  return {x + at::linear(h, w.at("u.w2")), h.pow(2).mean()};
}

TEST(Zero3Unit, GatherRecomputeReduceScatterMatchesThePlainComputationInFloat64) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto unit = std::make_shared<ShardedUnit>();
  unit->Add("u.w1", {5, 4});
  unit->Add("u.b1", {5});
  unit->Add("u.w2", {4, 5});
  unit->Finish(2);
  ASSERT_EQ(unit->numel, 45);
  ASSERT_EQ(unit->shard, 23);  // one element of padding
  // The plain computation: every parameter whole.
  at::Tensor flat = at::normal(0.0, 0.5, {46}, gen, f64);
  flat[45] = 0;
  at::Tensor x0 = at::normal(0.0, 1.0, {3, 4}, gen, f64), probe = at::normal(0.0, 1.0, {3, 4}, gen, f64);
  at::Tensor p = flat.clone().requires_grad_(true), xp = x0.clone().requires_grad_(true);
  auto plain = TinyLayer(xp, unit->Views(p));
  ((plain[0] * probe).sum() + 0.7 * plain[1]).backward();
  // Another rank's gradient of the whole unit, which the reduce-scatter adds.
  at::Tensor others = at::normal(0.0, 1.0, {46}, gen, f64);
  others[45] = 0;
  const std::vector<at::Tensor> shards = {flat.narrow(0, 0, 23).clone(), flat.narrow(0, 23, 23).clone()};
  for (int rank = 0; rank < 2; ++rank) {
    for (bool with_others : {false, true}) {
      FakeComm comm(rank, shards, with_others ? others : at::Tensor());
      at::Tensor shard = shards[rank].clone().requires_grad_(true), x = x0.clone().requires_grad_(true);
      auto out = RunShardedUnit(unit, &comm, TinyLayer, x, shard);
      EXPECT_EQ(comm.gathers, 1);  // the forward gathered once and kept nothing
      ASSERT_EQ(out.size(), 2u);
      EXPECT_LT((out[0] - plain[0]).abs().max().item<double>(), 1e-14);
      EXPECT_LT((out[1] - plain[1]).abs().item<double>(), 1e-14);
      ((out[0] * probe).sum() + 0.7 * out[1]).backward();
      EXPECT_EQ(comm.gathers, 2);  // the backward gathered again
      EXPECT_EQ(comm.scatters, 1);
      EXPECT_LT((x.grad() - xp.grad()).abs().max().item<double>(), 1e-13) << rank;
      at::Tensor want = p.grad().narrow(0, rank * 23, 23) + (with_others ? others.narrow(0, rank * 23, 23) : at::zeros({23}, f64));
      EXPECT_LT((shard.grad() - want).abs().max().item<double>(), 1e-13) << rank << " " << with_others;
      if (rank == 1) EXPECT_EQ(shard.grad()[22].item<double>(), 0.0);  // the padding takes no gradient
    }
  }
  // Gradient check: central differences of the loss in the shard's and x's elements (float64, step 1e-6).
  FakeComm comm(0, shards);
  auto loss_of = [&](const at::Tensor& shard, const at::Tensor& x) {
    at::NoGradGuard ng;
    auto out = RunShardedUnit(unit, &comm, TinyLayer, x, shard);
    return ((out[0] * probe).sum() + 0.7 * out[1]).item<double>();
  };
  at::Tensor shard = shards[0].clone().requires_grad_(true), x = x0.clone().requires_grad_(true);
  auto out = RunShardedUnit(unit, &comm, TinyLayer, x, shard);
  ((out[0] * probe).sum() + 0.7 * out[1]).backward();
  const double h = 1e-6;
  for (int64_t i : {0, 5, 19, 20, 22}) {
    at::Tensor up = shards[0].clone(), down = shards[0].clone();
    up[i] += h;
    down[i] -= h;
    const double fd = (loss_of(up, x0) - loss_of(down, x0)) / (2 * h);
    EXPECT_NEAR(shard.grad()[i].item<double>(), fd, 1e-8 + 1e-6 * std::abs(fd)) << "shard element " << i;
  }
  for (int64_t i : {0, 6, 11}) {
    at::Tensor up = x0.clone(), down = x0.clone();
    up.view({-1})[i] += h;
    down.view({-1})[i] -= h;
    const double fd = (loss_of(shards[0], up) - loss_of(shards[0], down)) / (2 * h);
    EXPECT_NEAR(x.grad().view({-1})[i].item<double>(), fd, 1e-8 + 1e-6 * std::abs(fd)) << "x element " << i;
  }
}

// The model's decoder layers through the runner (ForwardOptions::layer_runner) give the plain model's logits and
// gradients (float32, dense and MoE): each layer's shard gradient is its slice of the plain parameter gradients.
TEST(Zero3Unit, LlamaLayersThroughTheRunnerMatchThePlainModel) {
  for (int64_t experts : {0, 4}) {
    auto m = LlamaModel::Init(testing::TinyConfig(experts), 3);
    ASSERT_TRUE(m.ok());
    for (auto& [n, t] : m->params()) t.requires_grad_(true);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
    at::Tensor tokens = at::randint(0, m->config().vocab_size, {2, 8}, gen, at::TensorOptions().dtype(at::kLong));
    ForwardOptions fo;
    fo.training = true;
    fo.backend = MoeBackend::kReference;
    auto plain = m->Forward(tokens, fo);
    (plain.logits.pow(2).mean() + plain.aux_loss).backward();
    // The same weights, copied; each layer a unit sharded over 2 ranks, computed as rank 0.
    LlamaModel m2 = *m;
    for (auto& [n, t] : m2.params()) t = t.detach().clone().requires_grad_(true);
    const int64_t L = m->config().num_hidden_layers;
    std::vector<std::shared_ptr<ShardedUnit>> units;
    std::vector<std::unique_ptr<FakeComm>> comms;
    std::vector<at::Tensor> shard0, plain_grad;
    for (int64_t l = 0; l < L; ++l) {
      auto u = std::make_shared<ShardedUnit>();
      std::vector<at::Tensor> values, grads;
      for (const auto& [n, t] : m->params()) {
        if (!n.starts_with("model.layers." + std::to_string(l) + ".")) continue;
        u->Add(n, t.sizes().vec());
        values.push_back(t.detach().reshape({-1}));
        grads.push_back(t.grad().reshape({-1}));
      }
      u->Finish(2);
      at::Tensor full = at::zeros({2 * u->shard}), g = at::zeros({2 * u->shard});
      full.narrow(0, 0, u->numel).copy_(at::cat(values));
      g.narrow(0, 0, u->numel).copy_(at::cat(grads));
      comms.push_back(std::make_unique<FakeComm>(
          0, std::vector<at::Tensor>{full.narrow(0, 0, u->shard).clone(), full.narrow(0, u->shard, u->shard).clone()}));
      shard0.push_back(full.narrow(0, 0, u->shard).clone().requires_grad_(true));
      plain_grad.push_back(g.narrow(0, 0, u->shard));
      units.push_back(u);
    }
    fo.layer_runner = [&](int64_t l, const at::Tensor& x, const LayerFn& fn) {
      return RunShardedUnit(units[l], comms[l].get(), fn, x, shard0[l]);
    };
    auto sharded = m2.Forward(tokens, fo);
    EXPECT_LT((sharded.logits - plain.logits).abs().max().item<double>(), 1e-6) << experts;
    (sharded.logits.pow(2).mean() + sharded.aux_loss).backward();
    for (int64_t l = 0; l < L; ++l) {
      EXPECT_EQ(comms[l]->gathers, 2);
      EXPECT_EQ(comms[l]->scatters, 1);
      EXPECT_LT((shard0[l].grad() - plain_grad[l]).abs().max().item<double>(), 1e-6) << "layer " << l << " experts " << experts;
    }
    EXPECT_TRUE(at::allclose(m2.params()[0].second.grad(), m->params()[0].second.grad(), 1e-5, 1e-7));
    if (experts) EXPECT_EQ(sharded.expert_counts.size(), static_cast<size_t>(L));
  }
}

}  // namespace
}  // namespace btx::model
