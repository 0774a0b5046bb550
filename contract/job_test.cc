#include "btx/contract/job.h"

#include <gtest/gtest.h>

#include <set>

namespace btx::contract {
namespace {
using json = nlohmann::json;

json BranchJob() {
  return {{"job_id", "j1"},
          {"attempt", 2},
          {"pipeline", "p"},
          {"name", "branch/code"},
          {"kind", "branch"},
          {"output_dir", "/art/out"},
          {"checkpoint_dir", "/art/ckpt"},
          {"threads", 2},
          {"device", "cpu"},
          {"spec", {{"seed", "/art/seed"}, {"name", "code"}, {"data", {{"train", "/d/train.txt"}}}, {"steps", 3}}}};
}

TEST(JobKinds, EveryKindHasAUniqueNameAndApiNumberAndARunner) {
  std::set<std::string_view> names;
  std::set<int> numbers;
  for (const auto& k : JobKinds()) {
    EXPECT_TRUE(names.insert(k.name).second) << k.name;
    EXPECT_TRUE(numbers.insert(static_cast<int>(k.kind)).second) << k.name;
    EXPECT_FALSE(k.runner.empty()) << k.name;
    EXPECT_EQ(FindJobKind(k.name), &k);
    EXPECT_EQ(FindJobKind(static_cast<int>(k.kind)), &k);
  }
  EXPECT_EQ(FindJobKind("train"), nullptr);
  EXPECT_EQ(FindJobKind(0), nullptr);
}

TEST(JobFile, RoundTripsThroughJson) {
  auto job = ParseJobFile(BranchJob());
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->kind, JobKind::kBranch);
  EXPECT_EQ(job->attempt, 2);
  EXPECT_EQ(ToJson(*job), BranchJob());
}

TEST(JobFile, UnknownKeysWrongKindsAndBadSpecsNameTheField) {
  json j = BranchJob();
  j["gpu"] = 1;
  EXPECT_NE(ParseJobFile(j).status().message().find("gpu: unknown field"), std::string::npos);
  j = BranchJob();
  j["kind"] = "train";
  EXPECT_NE(ParseJobFile(j).status().message().find("kind: got \"train\"; expected one of pretrain | branch"),
            std::string::npos)
      << ParseJobFile(j).status().message();
  j = BranchJob();
  j["spec"]["train"] = {{"lr", 0}};
  EXPECT_NE(ParseJobFile(j).status().message().find("spec.train.lr: got 0"), std::string::npos);
  j = BranchJob();
  j["output_dir"] = "relative";
  EXPECT_NE(ParseJobFile(j).status().message().find("output_dir"), std::string::npos);
  j = BranchJob();
  j["spec"]["seed"] = {{"$artifact", "pretrain"}};  // the scheduler resolves references before writing JOB.json
  EXPECT_NE(ParseJobFile(j).status().message().find("spec.seed"), std::string::npos);
  EXPECT_EQ(ParseJobFileText("{").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace btx::contract
