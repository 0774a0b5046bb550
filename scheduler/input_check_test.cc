// Submit-time checks of the files a pipeline names, through the real gRPC API and PostgreSQL: data roots
// (with a symlink leading out of one) and seeds this scheduler can see but btx-train could not use.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "btx/rpc_status.h"
#include "input_check.h"
#include "test_util.h"

namespace btx::scheduler {
namespace {
namespace fs = std::filesystem;

fs::path TestDir() {
  return fs::temp_directory_path() / ("btx-inputs-" + std::to_string(::getpid()) + "-" +
                                      ::testing::UnitTest::GetInstance()->current_test_info()->name());
}

class InputCheckTest : public testing::SchedulerFixture {
 protected:
  InputCheckTest() : SchedulerFixture(WithRoots(), false), dir_(TestDir()) {
    fs::create_directories(dir_ / "data" / "seed");
    std::ofstream(dir_ / "data" / "seed" / "config.json") << R"({"model_type": "llama"})";
    std::ofstream(dir_ / "data" / "seed" / "model.safetensors") << "x";
    std::ofstream(dir_ / "data" / "code.txt") << "int main() {}\n";
    std::ofstream(dir_ / "secret.key") << "key";
  }
  ~InputCheckTest() override { fs::remove_all(dir_); }
  static SchedulerConfig WithRoots() {
    SchedulerConfig c = TestConfig();
    c.data_roots = *NormaliseDataRoots({(TestDir() / "data").string() + "/"});
    return c;
  }

  std::string Spec(const std::string& seed, const std::string& data) const {
    return "name: p\nseed: {model: " + seed + "}\nexperts: [{name: code, data: {train: [" + data + "]}, steps: 2}]\n";
  }
  std::string D(const std::string& rel) const { return (dir_ / "data" / rel).string(); }
  fs::path dir_;
};

TEST_F(InputCheckTest, PathsUnderTheRootsAreAccepted) { Submit(Spec(D("seed"), D("code.txt"))); }

TEST_F(InputCheckTest, APathOutsideTheRootsIsRefusedNamingTheFieldAndNothingIsStored) {
  for (const std::string& bad : {(dir_ / "secret.key").string(), D("../secret.key")}) {
    grpc::Status st;
    Submit(Spec(D("seed"), bad), "", &st);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    auto v = FieldViolationsOf(st);
    ASSERT_EQ(v.size(), 1u) << st.error_message();
    EXPECT_EQ(v[0].field, "jobs[branch/code].spec.data.train[0]");
    EXPECT_NE(v[0].description.find("outside the data roots (" + D("").substr(0, D("").size() - 1) + ")"),
              std::string::npos)
        << v[0].description;
  }
  EXPECT_EQ(testing::QueryInt(conninfo_, "SELECT count(*) FROM pipelines"), 0);
}

TEST_F(InputCheckTest, ASymlinkUnderARootThatLeadsOutOfItIsRefused) {
  fs::create_symlink(dir_ / "secret.key", dir_ / "data" / "innocent.txt");
  grpc::Status st;
  Submit(Spec(D("seed"), D("innocent.txt")), "", &st);
  ASSERT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("resolves to " + (dir_ / "secret.key").string()), std::string::npos)
      << st.error_message();
}

TEST_F(InputCheckTest, AnUnusableSeedIsRefusedAtSubmitAndByDryRun) {
  fs::remove(dir_ / "data" / "seed" / "model.safetensors");
  for (bool dry_run : {false, true}) {
    grpc::ClientContext ctx;
    v1::SubmitRequest req;
    req.set_spec(Spec(D("seed"), D("code.txt")));
    req.set_dry_run(dry_run);
    v1::SubmitResponse resp;
    const grpc::Status st = pipelines_->Submit(&ctx, req, &resp);
    ASSERT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << dry_run;
    auto v = FieldViolationsOf(st);
    ASSERT_FALSE(v.empty());
    EXPECT_EQ(v[0].field, "jobs[branch/code].spec.seed");
    EXPECT_NE(v[0].description.find("has no weights"), std::string::npos) << v[0].description;
  }
}

TEST(DataRoots, MustBeAbsolute) {
  EXPECT_FALSE(NormaliseDataRoots({"data"}).ok());
  EXPECT_FALSE(NormaliseDataRoots({""}).ok());
  auto r = NormaliseDataRoots({"/srv/x/../data/"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->at(0), "/srv/data");
}

}  // namespace
}  // namespace btx::scheduler
