// `btxctl run` on the embedded default (private PostgreSQL, in-process scheduler, local worker,
// real btx-train) inside a real terminal (tmux): the progress display is redrawn in place while
// jobs run, the run ends with the evaluation table, and the state is still there afterwards.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "cli_test_util.h"

namespace btx::cli {
namespace {
using json = nlohmann::json;

std::string Shell(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

size_t Count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t pos = haystack.find(needle); pos != std::string::npos; pos = haystack.find(needle, pos + 1)) ++n;
  return n;
}

// Small corpora in three made-up "domains", written at test time.
void WriteCorpus(const std::string& path, const std::vector<std::string>& words, int lines, unsigned seed) {
  std::string text;
  for (int i = 0; i < lines; ++i) {
    for (int w = 0; w < 12; ++w) {
      seed = seed * 1103515245u + 12345u;
      text += words[(seed >> 16) % words.size()] + (w == 11 ? "\n" : " ");
    }
  }
  testing::WriteFile(path, text);
}

class TmuxRunTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Shell("command -v tmux").empty()) GTEST_SKIP() << "tmux is not installed";
    dir_ = testing::MakeTestDir();
    socket_ = Cat("btxctl-e2e-", ::getpid());
  }
  void TearDown() override {
    if (!socket_.empty()) Shell("tmux -L " + socket_ + " kill-server 2>/dev/null");
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::string Pane() { return Shell("tmux -L " + socket_ + " capture-pane -p -t run 2>/dev/null"); }

  std::string dir_, socket_;
};

TEST_F(TmuxRunTest, LiveDisplayUpdatesAndTheRunEndsWithTheEvaluationTable) {
  WriteCorpus(dir_ + "/data/code.txt", {"def", "return", "if", "else", "for", "int", "x", "y", "print", "class"}, 400, 1);
  WriteCorpus(dir_ + "/data/math.txt", {"sum", "prime", "theorem", "proof", "lemma", "equals", "plus", "times"}, 400, 2);
  WriteCorpus(dir_ + "/data/code-valid.txt", {"def", "return", "if", "else", "for", "int", "x", "y"}, 40, 3);
  WriteCorpus(dir_ + "/data/math-valid.txt", {"sum", "prime", "theorem", "proof", "lemma", "equals"}, 40, 4);
  // Relative paths on purpose: btxctl makes them absolute against its working directory.
  testing::WriteFile(dir_ + "/tiny.yaml", R"(
name: e2e-tiny
seed:
  init: {preset: tiny}
  pretrain: {data: {train: [data/code.txt, data/math.txt], valid: [data/code-valid.txt]}, steps: 200}
experts:
  - {name: code, data: {train: data/code.txt, valid: data/code-valid.txt}, steps: 5}
  - {name: math, data: {train: data/math.txt, valid: data/math-valid.txt}, steps: 5}
train: {batch_tokens: 128, seq_len: 16, warmup: 1, checkpoint_every: 100, log_every: 1, valid_tokens: 256}
finetune: {steps: 3}
evaluate: {baselines: [seed], max_tokens: 256}
)");
  const std::string cmd =
      Cat("cd ", dir_, " && env HOME=", dir_, " XDG_CONFIG_HOME=", dir_, " BTX_SERVER= BTX_CONFIG= BTX_STATE_DIR= ",
          BTXCTL_PATH, " run --state-dir ", dir_, "/state --train-binary ", BTX_TRAIN_PATH,
          " --threads 1 tiny.yaml; echo BTXCTL-EXIT=$?; sleep 600");
  ASSERT_EQ(std::system(Cat("tmux -L ", socket_, " new-session -d -s run -x 160 -y 50 '", cmd, "'").c_str()), 0);

  // Watch the screen: frames with a job running (step k/N) must appear, change, and the final
  // frame must replace them in place (one header on screen, not one per update).
  static const std::regex kRunning("pretrain +LEASED +1/3 +([0-9]+)/200");
  std::set<std::string> running_steps;
  std::set<std::string> frames;
  std::string pane;
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        pane = Pane();
        std::smatch m;
        if (std::regex_search(pane, m, kRunning)) running_steps.insert(m[1]);
        if (pane.find("jobs done") != std::string::npos) frames.insert(pane);
        return pane.find("BTXCTL-EXIT=") != std::string::npos;
      },
      300))
      << pane;
  EXPECT_NE(pane.find("BTXCTL-EXIT=0"), std::string::npos) << pane;
  EXPECT_FALSE(running_steps.empty()) << "never saw pretrain running; last screen:\n" << pane;
  EXPECT_GE(frames.size(), 3u) << "the display did not update";
  EXPECT_EQ(Count(pane, "jobs done"), 1u) << "the display was appended, not redrawn:\n" << pane;
  EXPECT_NE(pane.find("e2e-tiny"), std::string::npos) << pane;
  EXPECT_NE(pane.find("SUCCEEDED  6/6 jobs done"), std::string::npos) << pane;
  EXPECT_NE(pane.find("pipeline e2e-tiny SUCCEEDED in "), std::string::npos) << pane;
  EXPECT_NE(pane.find("Evaluation: validation loss"), std::string::npos) << pane;
  EXPECT_TRUE(std::regex_search(pane, std::regex("\\nbtx +[0-9]+\\.[0-9]{3}"))) << pane;
  EXPECT_TRUE(std::regex_search(pane, std::regex("\\nseed +[0-9]+\\.[0-9]{3}"))) << pane;

  // The state survives: a later btxctl (no --server) starts the same embedded database and finds it.
  testing::CliResult r = testing::RunBtxctl({"get", "pipelines", "-o", "json", "--state-dir", dir_ + "/state"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json list = json::parse(r.out);
  ASSERT_EQ(list.size(), 1u) << r.out;
  EXPECT_EQ(list[0]["name"], "e2e-tiny");
  EXPECT_EQ(list[0]["state"], "PIPELINE_STATE_SUCCEEDED");
  EXPECT_EQ(list[0]["spec"]["experts"][0]["data"]["train"], json({dir_ + "/data/code.txt"}));
}

// Embedded `run` checks the files the local worker will read before it submits anything.
TEST(EmbeddedRunTest, MissingLocalFileIsABadSpecNamingTheField) {
  const std::string dir = testing::MakeTestDir();
  testing::WriteFile(dir + "/spec.yaml",
                     "name: missing\nseed: {init: {preset: tiny}, pretrain: {data: {train: [nope.txt]}, steps: 2}}\n"
                     "experts: [{name: a, data: {train: nope.txt}, steps: 2}]\n");
  testing::CliResult r = testing::RunBtxctl(
      {"run", "spec.yaml", "--state-dir", dir + "/state", "--train-binary", BTX_TRAIN_PATH}, {}, dir);
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_NE(r.err.find("spec: seed.pretrain.data.train[0]: " + dir + "/nope.txt does not exist"), std::string::npos)
      << r.err;
  // Nothing was submitted.
  r = testing::RunBtxctl({"get", "pipelines", "-o", "json", "--state-dir", dir + "/state"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out), json::array());
  std::filesystem::remove_all(dir);
}

// A `btxctl run` killed outright (a closed laptop, a lost terminal), then the same command again: the second
// follows the first's pipeline from its checkpoints instead of training a second one from zero beside it, and
// when it ends no PostgreSQL is left running in the state dir.
TEST(EmbeddedRunTest, AKilledRunRunAgainReattachesAndLeavesNoServerBehind) {
  const std::string dir = testing::MakeTestDir(), state = dir + "/state";
  WriteCorpus(dir + "/code.txt", {"def", "return", "if", "else", "for", "int", "x", "y", "print", "class"}, 300, 5);
  WriteCorpus(dir + "/math.txt", {"sum", "prime", "theorem", "proof", "lemma", "equals", "plus", "times"}, 300, 6);
  testing::WriteFile(dir + "/tiny.yaml", R"(
name: reattach
seed:
  init: {preset: tiny}
  pretrain: {data: {train: [code.txt, math.txt]}, steps: 300}
experts:
  - {name: code, data: {train: code.txt}, steps: 3}
  - {name: math, data: {train: math.txt}, steps: 3}
train: {batch_tokens: 128, seq_len: 16, warmup: 1, checkpoint_every: 10, log_every: 1, valid_tokens: 128}
finetune: {steps: 2}
evaluate: {max_tokens: 128}
)");
  const std::vector<std::string> run = {"run", "tiny.yaml", "--state-dir", state, "--train-binary", BTX_TRAIN_PATH,
                                        "--threads", "1", "-o", "json"};
  auto checkpointed = [&] {
    testing::CliResult r = testing::RunBtxctl({"get", "jobs", "-o", "json", "--state-dir", state});
    if (r.exit_code != 0) return false;
    const json jobs = json::parse(r.out, nullptr, false);
    if (!jobs.is_array()) return false;
    for (const auto& j : jobs) {
      if (j.value("name", "") == "pretrain" && !j.value("checkpoint_uri", "").empty()) return true;
    }
    return false;
  };
  {
    testing::Btxctl first(run, {}, dir);
    ASSERT_TRUE(testing::WaitFor(checkpointed, 300)) << first.err();
    first.Signal(SIGKILL);
    first.Wait();
  }
  // The killed btxctl could not stop its server.
  ASSERT_TRUE(std::filesystem::exists(state + "/pgdata/postmaster.pid"));

  testing::CliResult second = testing::RunBtxctl(run, {}, dir, 600);
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_NE(second.err.find("re-attaching to unfinished pipeline reattach"), std::string::npos) << second.err;
  EXPECT_FALSE(std::filesystem::exists(state + "/pgdata/postmaster.pid")) << "PostgreSQL left running";

  testing::CliResult r = testing::RunBtxctl({"get", "pipelines", "-o", "json", "--state-dir", state});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json pipelines = json::parse(r.out);
  ASSERT_EQ(pipelines.size(), 1u) << r.out;
  EXPECT_EQ(pipelines[0]["state"], "PIPELINE_STATE_SUCCEEDED");
  r = testing::RunBtxctl({"get", "jobs", "-o", "json", "--state-dir", state});
  for (const auto& j : json::parse(r.out)) {
    // Interrupted and resumed: a second attempt, with the attempt budget of the first kept.
    if (j["name"] == "pretrain") {
      EXPECT_EQ(j.value("attempt", 0), 2) << j.dump();
    }
  }
  // Run once more: a finished pipeline is never re-attached to.
  second = testing::RunBtxctl(run, {}, dir, 600);
  EXPECT_EQ(second.exit_code, 0) << second.err;
  EXPECT_EQ(second.err.find("re-attaching"), std::string::npos) << second.err;
  std::filesystem::remove_all(dir);
}

// A gang on one machine: `btxctl run` of a spec with nodes_per_job: 2 starts two local workers, and every
// training job runs on both (one rank each) over loopback.
TEST(EmbeddedRunTest, AGangSpecRunsOnLocalWorkers) {
  const std::string dir = testing::MakeTestDir(), state = dir + "/state";
  WriteCorpus(dir + "/code.txt", {"def", "return", "if", "else", "for", "int", "x", "y", "print", "class"}, 300, 5);
  WriteCorpus(dir + "/math.txt", {"sum", "prime", "theorem", "proof", "lemma", "equals", "plus", "times"}, 300, 6);
  testing::WriteFile(dir + "/gang.yaml", R"(
name: local-gang
seed:
  init: {preset: tiny}
  pretrain: {data: {train: [code.txt, math.txt]}, steps: 4}
experts:
  - {name: code, data: {train: code.txt}, steps: 3}
  - {name: math, data: {train: math.txt}, steps: 3}
train: {batch_tokens: 128, seq_len: 16, warmup: 1, log_every: 1, valid_tokens: 128}
finetune: {steps: 2}
evaluate: {max_tokens: 128}
resources: {nodes_per_job: 2}
)");
  testing::CliResult r = testing::RunBtxctl(
      {"run", "gang.yaml", "--state-dir", state, "--train-binary", BTX_TRAIN_PATH, "--threads", "2", "-o", "json"}, {},
      dir, 600);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = testing::RunBtxctl({"get", "workers", "-o", "json", "--state-dir", state});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out).size(), 2u) << r.out;
  r = testing::RunBtxctl({"get", "jobs", "-o", "json", "--state-dir", state});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  int gangs = 0;
  for (const auto& j : json::parse(r.out)) {
    EXPECT_EQ(j.value("state", ""), "JOB_STATE_SUCCEEDED") << j.dump();
    if (j.contains("resources") && j["resources"].value("nodes", 0) == 2) ++gangs;
  }
  EXPECT_EQ(gangs, 4) << r.out;  // pretrain, two branches, finetune
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace btx::cli
