// btx-train as a process: every job kind through a temp dir, exit codes, SIGTERM + resume.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/tokenizer.h"
#include "test_util.h"

extern char** environ;

namespace btx::model {
namespace {
using nlohmann::json;
using testing::TempDir;

struct CliResult {
  int code = -1;
  std::vector<json> events;
  std::string log;
};

std::string JobCommand(const std::string& dir, const std::string& name) {
  // fd 3 is open: the protocol's default progress fd.
  return "cd '" + dir + "' && exec '" BTX_TRAIN_PATH "' --job " + name + ".json 3>" + name + ".events >" + name +
         ".log 2>&1";
}

CliResult Collect(const std::string& dir, const std::string& name, int code) {
  CliResult r;
  r.code = code;
  std::ifstream in(dir + "/" + name + ".events");
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) r.events.push_back(json::parse(line));
  r.log = *ReadFile(dir + "/" + name + ".log");
  return r;
}

CliResult RunJob(const std::string& dir, const std::string& name, const json& job) {
  testing::WriteText(dir + "/" + name + ".json", job.dump());
  int st = std::system(JobCommand(dir, name).c_str());
  return Collect(dir, name, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}

json TrainSpec() {
  return {{"batch_tokens", 128}, {"seq_len", 32}, {"lr", 3e-3}, {"warmup", 2}, {"checkpoint_every", 2},
          {"log_every", 1}, {"valid_tokens", 256}};
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* d : {"code", "math"}) {
      testing::WriteText(dir / (std::string(d) + "/train.txt"), testing::SampleText(40, d[0] == 'c' ? 1 : 7));
      testing::WriteText(dir / (std::string(d) + "/valid.txt"), testing::SampleText(10, d[0] == 'c' ? 2 : 8));
    }
  }
  json Job(const std::string& kind, const std::string& out, json spec, bool checkpoints = true) {
    json j = {{"job_id", "t-" + out}, {"attempt", 1}, {"pipeline", "test"}, {"kind", kind}, {"name", out},
              {"output_dir", dir / out}, {"threads", 2}, {"device", "cpu"}, {"spec", spec}};
    if (checkpoints) j["checkpoint_dir"] = dir / ("ck-" + out);
    return j;
  }
  TempDir dir;
};

const json* Find(const CliResult& r, const std::string& event) {
  for (const auto& e : r.events)
    if (e["event"] == event) return &e;
  return nullptr;
}

TEST_F(Cli, EveryKindEndToEnd) {
  auto pre = RunJob(dir.path(), "seed",
                 Job("pretrain", "seed",
                     {{"init", {{"preset", "tiny"}, {"hidden_size", 32}, {"intermediate_size", 48}}},
                      {"tokenizer", "byte"},
                      {"data", {{"train", {dir / "code/train.txt", dir / "math/train.txt"}}, {"valid", dir / "math/valid.txt"}}},
                      {"train", TrainSpec()}, {"steps", 4}}));
  ASSERT_EQ(pre.code, 0) << pre.log;
  ASSERT_NE(Find(pre, "progress"), nullptr);
  ASSERT_NE(Find(pre, "checkpoint"), nullptr);
  const json* done = Find(pre, "done");
  ASSERT_NE(done, nullptr);
  EXPECT_EQ((*done)["artifact"], dir / "seed");
  EXPECT_TRUE((*done)["metrics"].contains("valid_loss"));
  EXPECT_TRUE(VerifyManifest(dir / "seed").ok());

  for (const char* d : {"code", "math"}) {
    const std::string out = std::string("exp-") + d;
    auto br = RunJob(dir.path(), out,
                  Job("branch", out,
                      {{"seed", dir / "seed"}, {"name", d},
                       {"data", {{"train", dir / (std::string(d) + "/train.txt")}, {"valid", dir / (std::string(d) + "/valid.txt")}}},
                       {"train", TrainSpec()}, {"steps", 3}}));
    ASSERT_EQ(br.code, 0) << br.log;
    ASSERT_NE(Find(br, "done"), nullptr);
  }

  auto merge = RunJob(dir.path(), "moe",
                   Job("merge", "moe",
                       {{"method", "btx"}, {"seed", dir / "seed"},
                        {"experts", {{{"name", "code"}, {"model", dir / "exp-code"}}, {{"name", "math"}, {"model", dir / "exp-math"}}}},
                        {"keep_seed_expert", true}, {"router_init", "random"}, {"top_k", 2}},
                       false));
  ASSERT_EQ(merge.code, 0) << merge.log;
  EXPECT_TRUE(VerifyManifest(dir / "moe").ok());
  auto cfg = LoadConfig(dir / "moe");
  ASSERT_TRUE(cfg.ok());
  EXPECT_EQ(cfg->num_local_experts, 3);

  auto ft = RunJob(dir.path(), "ft",
                Job("finetune", "ft",
                    {{"model", dir / "moe"},
                     {"mixture", {{{"name", "code"}, {"weight", 1}, {"train", dir / "code/train.txt"}, {"valid", dir / "code/valid.txt"}},
                                  {{"name", "math"}, {"weight", 2}, {"train", dir / "math/train.txt"}, {"valid", dir / "math/valid.txt"}}}},
                     {"train", TrainSpec()}, {"steps", 3}, {"top_k", 1}, {"freeze", {"all_but_router"}},
                     {"load_balance", 0.01}, {"z_loss", 0.001}, {"router", "softmax_topk"}}));
  ASSERT_EQ(ft.code, 0) << ft.log;
  auto ft_cfg = LoadConfig(dir / "ft");
  EXPECT_EQ(ft_cfg->num_experts_per_tok, 1);
  EXPECT_TRUE(at::equal(*HfTensorSource::Open(dir / "ft")->Load("model.layers.0.self_attn.q_proj.weight"),
                        *HfTensorSource::Open(dir / "moe")->Load("model.layers.0.self_attn.q_proj.weight")));

  const json ev_spec = {
      {"models", {{{"name", "seed"}, {"model", dir / "seed"}}, {{"name", "moe"}, {"model", dir / "ft"}},
                  {{"name", "ens"}, {"ensemble", {dir / "exp-code", dir / "exp-math"}}}}},
      {"domains", {{{"name", "code"}, {"valid", dir / "code/valid.txt"}}, {{"name", "math"}, {"valid", dir / "math/valid.txt"}}}},
      {"max_tokens", 300},
      {"seq_len", 64}};
  auto ev = RunJob(dir.path(), "eval", Job("eval", "eval", ev_spec, false));
  ASSERT_EQ(ev.code, 0) << ev.log;
  const json* ev_done = Find(ev, "done");
  ASSERT_NE(ev_done, nullptr);
  json file = json::parse(*ReadFile(dir / "eval/eval.json"));
  EXPECT_EQ((*ev_done)["metrics"], file);
  for (const char* m : {"seed", "moe", "ens"})
    for (const char* d : {"code", "math"}) EXPECT_GT(file["models"][m]["domains"][d]["loss"].get<double>(), 0.0);
  // The MoE reports per-layer expert shares; they sum to one.
  const json& routing = file["models"]["moe"]["domains"]["code"]["routing"];
  ASSERT_EQ(routing.size(), 2u);
  ASSERT_EQ(routing[0].size(), 3u);
  double share = 0;
  for (const auto& x : routing[1]) share += x.get<double>();
  EXPECT_NEAR(share, 1.0, 1e-9);
  EXPECT_FALSE(file["models"]["seed"]["domains"]["code"].contains("routing"));

  // Re-running a published job (a retry after a worker died before reporting) is a no-op success that
  // reports the same artifact.
  auto again = RunJob(dir.path(), "eval-again", Job("eval", "eval", ev_spec, false));
  EXPECT_EQ(again.code, 0) << again.log;
  EXPECT_NE(again.log.find("already published"), std::string::npos) << again.log;
}

// In the scheduler's layout (<root>/<pipeline>/<job>/model) a parent's output without its manifest is refused,
// never loaded unchecked as if it were a user's seed.
TEST_F(Cli, AParentOutputWithItsManifestDeletedIsRefused) {
  auto pre = RunJob(dir.path(), "seed",
                    Job("pretrain", "p/seed/model",
                        {{"init", {{"preset", "tiny"}, {"hidden_size", 32}, {"intermediate_size", 48}}},
                         {"data", {{"train", dir / "code/train.txt"}}}, {"train", TrainSpec()}, {"steps", 2}},
                        false));
  ASSERT_EQ(pre.code, 0) << pre.log;
  const json branch = {{"seed", dir / "p/seed/model"}, {"data", {{"train", dir / "code/train.txt"}}},
                       {"train", TrainSpec()}, {"steps", 1}};
  std::filesystem::remove(dir / (std::string("p/seed/model/") + kManifestName));
  auto refused = RunJob(dir.path(), "branch", Job("branch", "p/branch/model", branch, false));
  EXPECT_EQ(refused.code, 1) << refused.log;
  EXPECT_NE(refused.log.find("seed: " + (dir / "p/seed/model") + " is a parent job's output without its manifest.sha256"),
            std::string::npos)
      << refused.log;
  ASSERT_TRUE(WriteManifest(dir / "p/seed/model").ok());
  auto ok = RunJob(dir.path(), "branch", Job("branch", "p/branch/model", branch, false));
  EXPECT_EQ(ok.code, 0) << ok.log;
}

TEST_F(Cli, InvalidJobsExit65NamingTheField) {
  struct Case {
    json job;
    const char* field;
  };
  std::vector<Case> cases = {
      {Job("pretrain", "x", {{"data", {{"train", dir / "code/train.txt"}}}, {"train", {{"lr", -1}}}, {"steps", 2}}), "train.lr"},
      {Job("pretrain", "x", {{"data", {{"train", dir / "code/train.txt"}}}}), "spec.steps"},
      {Job("branch", "x", {{"seed", dir / "nope"}, {"data", {{"train", dir / "code/train.txt"}}}, {"steps", 2}}), "spec.seed"},
      {Job("merge", "x", {{"method", "frankenmerge"}, {"experts", {{{"name", "a"}, {"model", dir.path()}}}}}), "spec.method"},
      {Job("train", "x", json::object()), "kind"},
      {Job("branch", "x", {{"seed", dir / "bare"}, {"data", {{"train", dir / "code/train.txt"}}}, {"steps", 2}}),
       "spec.tokenizer"},
      {Job("eval", "x", {{"models", {{{"name", "m"}}}}, {"domains", json::array()}}), "spec.models[0]: got"},
      {Job("finetune", "x", {{"model", dir.path()}, {"steps", 1}, {"freeze", {"lots"}}}), "spec.freeze[0]"},
      {Job("finetune", "x",
           {{"model", dir.path()}, {"steps", 1}, {"mixture", {{{"name", "code"}, {"train", dir / "code/train.txt"}}}}}),
       "spec.model"},
      // Names the model would not read are refused, never ignored (they once produced a silently different model).
      {Job("pretrain", "x", {{"init", {{"num_layers", 4}}}, {"data", {{"train", dir / "code/train.txt"}}}, {"steps", 2}}),
       "spec.init.num_layers: unknown field; did you mean num_hidden_layers?"},
      {Job("pretrain", "x", {{"data", {{"train", dir / "code/train.txt"}}}, {"steps", 2}, {"train", {{"lr", 0}}}}),
       "spec.train.lr: got 0"},
      {Job("branch", "x", {{"seed", dir / "bare"}, {"data", {{"train", dir / "code/train.txt"}}}, {"steps", 2}, {"stepz", 3}}),
       "spec.stepz: unknown field"},
  };
  // A model dir without a tokenizer: branching from it needs an explicit spec.tokenizer.
  auto bare = LlamaModel::Init(testing::TinyConfig(), 1);
  auto staged = StagedDir::Create(dir / "bare");
  ASSERT_TRUE(WriteModelFiles(*bare, staged->path()).ok());
  ASSERT_TRUE(staged->Publish().ok());
  for (size_t i = 0; i < cases.size(); ++i) {
    auto r = RunJob(dir.path(), "bad" + std::to_string(i), cases[i].job);
    EXPECT_EQ(r.code, 65) << cases[i].job.dump() << "\n" << r.log;
    EXPECT_NE(r.log.find(cases[i].field), std::string::npos) << r.log;
    EXPECT_EQ(std::count(r.log.begin(), r.log.end(), '\n'), 1) << "one-line error expected: " << r.log;
  }
  testing::WriteText(dir / "broken.json", "{not json");
  int st = std::system(("'" BTX_TRAIN_PATH "' --job '" + (dir / "broken.json") + "' 2>/dev/null").c_str());
  EXPECT_EQ(WEXITSTATUS(st), 65);
}

TEST_F(Cli, InitSizesAndThreadsReachTheModelAndTheTrainer) {
  json job = Job("pretrain", "deep",
                 {{"init", {{"preset", "tiny"}, {"num_hidden_layers", 4}, {"hidden_size", 96}, {"num_attention_heads", 4}}},
                  {"data", {{"train", dir / "code/train.txt"}}},
                  {"train", TrainSpec()},
                  {"steps", 1}});
  job["spec"]["train"]["threads"] = 1;
  auto r = RunJob(dir.path(), "deep", job);
  ASSERT_EQ(r.code, 0) << r.log;
  auto cfg = json::parse(*ReadFile(dir / "deep/config.json"));
  EXPECT_EQ(cfg["num_hidden_layers"], 4);
  EXPECT_EQ(cfg["hidden_size"], 96);
  auto weights = HfTensorSource::Open(dir / "deep");
  ASSERT_TRUE(weights.ok());
  auto q = weights->Load("model.layers.3.self_attn.q_proj.weight");
  ASSERT_TRUE(q.ok()) << q.status().message();
  EXPECT_EQ(q->size(1), 96);
  EXPECT_FALSE(weights->Has("model.layers.4.self_attn.q_proj.weight"));
  // JOB.json says 2 threads; the spec's train.threads wins.
  EXPECT_NE(r.log.find("1 CPU threads"), std::string::npos) << r.log;
}

TEST_F(Cli, PretrainTrainsASentencePieceTokenizer) {
  if (!SentencePieceAvailable()) GTEST_SKIP() << "built without sentencepiece";
  auto r = RunJob(dir.path(), "sp",
                  Job("pretrain", "sp",
                      {{"init", {{"hidden_size", 32}, {"intermediate_size", 48}}},
                       {"tokenizer", {{"type", "sentencepiece"}, {"vocab_size", 300}}},
                       {"data", {{"train", {dir / "code/train.txt", dir / "math/train.txt"}}, {"valid", dir / "code/valid.txt"}}},
                       {"train", TrainSpec()}, {"steps", 2}}));
  ASSERT_EQ(r.code, 0) << r.log;
  auto cfg = LoadConfig(dir / "sp");
  ASSERT_TRUE(cfg.ok());
  auto tok = LoadTokenizer(dir / "sp");
  ASSERT_TRUE(tok.ok()) << tok.status().message();
  EXPECT_EQ((*tok)->kind(), "sentencepiece");
  EXPECT_EQ(cfg->vocab_size, (*tok)->vocab_size());
  EXPECT_EQ(cfg->bos_token_id, (*tok)->bos_id());
}

TEST_F(Cli, SigtermCheckpointsExits75AndResumesBitExactly) {
  const int64_t steps = 300;
  auto make = [&](const std::string& name) {
    json job = Job("pretrain", name,
                   {{"init", {{"hidden_size", 32}, {"intermediate_size", 48}}},
                    {"data", {{"train", dir / "code/train.txt"}, {"valid", dir / "code/valid.txt"}}},
                    {"train", TrainSpec()}, {"steps", steps}});
    job["spec"]["train"]["checkpoint_every"] = 100000;  // only the SIGTERM and the final checkpoint
    job["spec"]["train"]["log_every"] = 50;
    return job;
  };
  json job = make("long");
  testing::WriteText(dir / "long.json", job.dump());
  std::string cmd = JobCommand(dir.path(), "long");
  const char* argv[] = {"/bin/sh", "-c", cmd.c_str(), nullptr};
  pid_t pid;
  ASSERT_EQ(posix_spawn(&pid, "/bin/sh", nullptr, nullptr, const_cast<char**>(argv), environ), 0);
  // Wait until training is under way (a progress line), then interrupt.
  for (int i = 0; i < 600; ++i) {
    auto text = ReadFile(dir / "long.events");
    if (text.ok() && text->find("\"progress\"") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  auto first = Collect(dir.path(), "long", WEXITSTATUS(status));
  ASSERT_EQ(first.code, 75) << "SIGTERM should interrupt a " << steps << "-step run\n" << first.log;
  const json* ck = Find(first, "checkpoint");
  ASSERT_NE(ck, nullptr) << first.log;
  const int64_t stopped = (*ck)["step"].get<int64_t>();
  EXPECT_LT(stopped, steps);
  EXPECT_TRUE(VerifyManifest((*ck)["path"].get<std::string>()).ok());
  EXPECT_FALSE(std::filesystem::exists(dir / "long"));

  // Next attempt (a new process) resumes from the checkpoint and finishes.
  job["attempt"] = 2;
  auto second = RunJob(dir.path(), "long", job);
  ASSERT_EQ(second.code, 0) << second.log;
  EXPECT_NE(second.log.find("resumed from"), std::string::npos) << second.log;
  const json* p = Find(second, "progress");
  ASSERT_NE(p, nullptr);
  EXPECT_GT((*p)["step"].get<int64_t>(), stopped);
  EXPECT_TRUE(VerifyManifest(dir / "long").ok());

  // An uninterrupted run of the same job ends with the same bytes.
  auto straight = RunJob(dir.path(), "straight", make("straight"));
  ASSERT_EQ(straight.code, 0) << straight.log;
  EXPECT_EQ(*Sha256File(dir / "long/model.safetensors"), *Sha256File(dir / "straight/model.safetensors"))
      << "interrupted at step " << stopped;
}

}  // namespace
}  // namespace btx::model
