#include "btx/contract/files.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "btx/contract/sha256.h"

namespace btx {
namespace {
namespace fs = std::filesystem;

std::string Portable(const std::string& data) {
  PortableSha256 sha;
  sha.Update(data.data(), data.size());
  const auto md = sha.Finish();
  return HexLower(md.data(), md.size());
}

TEST(Sha256, PortableCodeMatchesTheStandardVectors) {
  EXPECT_EQ(Portable(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Portable("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Portable("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Portable(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, BuildBackendAgreesWithThePortableCodeOnRandomSplits) {
  std::mt19937 rng(std::random_device{}());
  std::string data(100000, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  Sha256 sha;
  for (size_t off = 0; off < data.size();) {
    const size_t n = std::min(data.size() - off, static_cast<size_t>(rng() % 200));
    sha.Update(data.data() + off, n);
    off += n;
  }
  EXPECT_EQ(sha.FinishHex(), Portable(data));
  EXPECT_EQ(Sha256Hex(data.data(), data.size()), Portable(data));
}

class ManifestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("btx-contract-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "sub");
    std::ofstream(dir_ / "a.bin") << "abc";
    std::ofstream(dir_ / "sub" / "b.txt") << "hello";
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(ManifestTest, WrittenManifestVerifiesAndNamesTheFirstBadFile) {
  ASSERT_TRUE(WriteManifest(dir_).ok());
  EXPECT_TRUE(VerifyManifest(dir_).ok());
  auto text = ReadFile((dir_ / kManifestName).string());
  ASSERT_TRUE(text.ok());
  EXPECT_NE(text->find("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a.bin"), std::string::npos);
  std::ofstream(dir_ / "sub" / "b.txt") << "changed";
  EXPECT_NE(VerifyManifest(dir_).message().find("sha256 mismatch for 'sub/b.txt'"), std::string::npos);
}

TEST_F(ManifestTest, SymlinksEscapingPathsAndFifosAreRefusedWithoutBlocking) {
  ASSERT_TRUE(WriteManifest(dir_).ok());
  fs::create_symlink("/etc/hostname", dir_ / "link");
  EXPECT_EQ(VerifyManifest(dir_).code(), StatusCode::kDataLoss);
  fs::remove(dir_ / "link");
  std::ofstream(dir_ / kManifestName, std::ios::app)
      << "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  ../escape\n";
  EXPECT_NE(VerifyManifest(dir_).message().find("escapes"), std::string::npos);
  ASSERT_TRUE(WriteManifest(dir_).ok());
  ASSERT_EQ(::mkfifo((dir_ / "pipe").c_str(), 0600), 0);
  std::ofstream(dir_ / kManifestName, std::ios::app)
      << "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  pipe\n";
  const Status st = VerifyManifest(dir_);  // returns: a FIFO is not read
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("not a regular file"), std::string::npos) << st.message();
}

TEST_F(ManifestTest, StagingRemovesDeadTempDirsOfThisHostOnlyNeverAnotherHostsOnASharedFilesystem) {
  // A pid that is not running here: the child of a fork that has exited and been reaped.
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  const std::string dead = std::to_string(child);
  const fs::path ours = dir_ / std::string(".out.tmp-").append(dead).append("-1@").append(HostName());
  const fs::path theirs = dir_ / std::string(".out.tmp-").append(dead).append("-2@another-host");
  fs::create_directories(ours);
  fs::create_directories(theirs);
  std::ofstream(theirs / "model.safetensors") << "a live trainer's partial output on another host";
  auto staged = StagedDir::Create((dir_ / "out").string());
  ASSERT_TRUE(staged.ok()) << staged.status().message();
  EXPECT_FALSE(fs::exists(ours));
  EXPECT_TRUE(fs::exists(theirs / "model.safetensors"));
  EXPECT_TRUE(staged->path().ends_with(std::string("@").append(HostName()))) << staged->path();
}

TEST_F(ManifestTest, MissingManifestIsDataLoss) {
  EXPECT_EQ(VerifyManifest(dir_).code(), StatusCode::kDataLoss);
}

}  // namespace
}  // namespace btx
