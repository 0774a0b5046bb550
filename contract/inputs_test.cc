#include "btx/contract/inputs.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

namespace btx::contract {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

JobSpec Parse(JobKind kind, const json& spec) {
  FieldErrors errors;
  Reader r(errors, /*allow_artifact_refs=*/true);
  JobSpec s = ParseJobSpec(r, kind, spec, "");
  EXPECT_TRUE(errors.empty()) << spec.dump();
  return s;
}

class InputsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("btx-inputs-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "seed");
    std::ofstream(dir_ / "seed" / "config.json") << R"({"model_type": "llama"})";
    std::ofstream(dir_ / "seed" / "model.safetensors") << "x";
    std::ofstream(dir_ / "train.txt") << "some text\n";
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string P(const std::string& rel) const { return (dir_ / rel).string(); }
  std::optional<std::string> Seed() const { return CheckInput({"seed", P("seed"), InputKind::kModelDir}); }
  fs::path dir_;
};

TEST_F(InputsTest, ListsTheUserNamedFilesOfEachKindButNotParentsArtifacts) {
  auto branch = Parse(JobKind::kBranch, {{"seed", P("seed")}, {"data", {{"train", {P("a"), P("b")}}, {"valid", P("v")}}}, {"steps", 1}});
  auto in = InputsOf(branch);
  ASSERT_EQ(in.size(), 4u);
  EXPECT_EQ(in[0].field, "seed");
  EXPECT_EQ(in[0].kind, InputKind::kModelDir);
  EXPECT_EQ(in[2].field, "data.train[1]");
  EXPECT_EQ(in[2].path, P("b"));
  EXPECT_EQ(in[3].field, "data.valid[0]");

  auto merged = Parse(JobKind::kFinetune, {{"model", {{"$artifact", "merge"}}},
                                           {"mixture", {{{"name", "code"}, {"train", P("c")}}}},
                                           {"steps", 1}});
  in = InputsOf(merged);
  ASSERT_EQ(in.size(), 1u);
  EXPECT_EQ(in[0].field, "mixture[0].train[0]");
}

TEST_F(InputsTest, AUsableSeedPassesAndEachDefectIsNamed) {
  EXPECT_EQ(Seed(), std::nullopt);
  fs::remove(dir_ / "seed" / "model.safetensors");
  ASSERT_TRUE(Seed().has_value());
  EXPECT_NE(Seed()->find("has no weights"), std::string::npos) << *Seed();

  std::ofstream(dir_ / "seed" / "model.safetensors.index.json")
      << R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})";
  std::ofstream(dir_ / "seed" / "model-00001-of-00002.safetensors") << "x";
  ASSERT_TRUE(Seed().has_value());
  EXPECT_NE(Seed()->find("names shard model-00002-of-00002.safetensors, which is missing"), std::string::npos) << *Seed();
  std::ofstream(dir_ / "seed" / "model-00002-of-00002.safetensors") << "x";
  EXPECT_EQ(Seed(), std::nullopt);

  std::ofstream(dir_ / "seed" / "config.json") << "{not json";
  ASSERT_TRUE(Seed().has_value());
  EXPECT_NE(Seed()->find("config.json"), std::string::npos);
  std::ofstream(dir_ / "seed" / "config.json") << R"({"hidden_size": 8})";
  EXPECT_NE(Seed().value_or("").find("no model_type"), std::string::npos);

  EXPECT_NE(CheckInput({"seed", P("train.txt"), InputKind::kModelDir}).value_or("").find("found a file"), std::string::npos);
  fs::remove_all(dir_ / "seed" / "config.json");
  EXPECT_NE(Seed().value_or("").find("no config.json"), std::string::npos);
}

TEST_F(InputsTest, DataAndTokenizerMustBeReadableRegularFilesAndAMissingOneIsLeftToTheWorker) {
  EXPECT_EQ(CheckInput({"data.train[0]", P("train.txt"), InputKind::kData}), std::nullopt);
  EXPECT_EQ(CheckInput({"data.train[0]", P("elsewhere.txt"), InputKind::kData}), std::nullopt);
  ASSERT_EQ(::mkfifo(P("fifo").c_str(), 0600), 0);
  EXPECT_EQ(CheckInput({"data.train[0]", P("fifo"), InputKind::kData}).value_or(""), "not a regular file");
  fs::create_directories(dir_ / "empty" / "sub");
  EXPECT_EQ(CheckInput({"data.train[0]", P("empty"), InputKind::kData}).value_or(""), "the directory holds no files");
  std::ofstream(dir_ / "empty" / "sub" / "x.txt") << "x";
  EXPECT_EQ(CheckInput({"data.train[0]", P("empty"), InputKind::kData}), std::nullopt);
  std::ofstream(dir_ / "tok.model");
  EXPECT_EQ(CheckInput({"tokenizer", P("tok.model"), InputKind::kTokenizer}).value_or(""), "the tokenizer file is empty");
  if (::geteuid() != 0) {  // root reads anything
    fs::permissions(dir_ / "train.txt", fs::perms::none);
    EXPECT_TRUE(CheckInput({"data.train[0]", P("train.txt"), InputKind::kData}).has_value());
  }
}

TEST_F(InputsTest, RootsAreCheckedLexicallyAndAfterFollowingSymlinks) {
  const std::vector<std::string> roots = {P("seed"), "/srv/data"};
  EXPECT_EQ(CheckUnderRoots(P("seed/model.safetensors"), roots), std::nullopt);
  EXPECT_EQ(CheckUnderRoots(P("seed"), roots), std::nullopt);
  EXPECT_EQ(CheckUnderRoots("/srv/data/not/yet/there.txt", roots), std::nullopt);
  EXPECT_NE(CheckUnderRoots("/srv/data/../../etc/passwd", roots).value_or("").find("outside the data roots"), std::string::npos);
  EXPECT_NE(CheckUnderRoots("/srv/database", roots).value_or("").find("outside"), std::string::npos);
  EXPECT_NE(CheckUnderRoots("relative/x", roots).value_or("").find("absolute"), std::string::npos);
  fs::create_symlink(dir_ / "train.txt", dir_ / "seed" / "escape.txt");
  auto why = CheckUnderRoots(P("seed/escape.txt"), roots);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("resolves to " + P("train.txt")), std::string::npos) << *why;
  EXPECT_EQ(CheckUnderRoots("/anything", {}), std::nullopt);
}

}  // namespace
}  // namespace btx::contract
