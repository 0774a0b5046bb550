#include "btx/contract/files.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>
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

// A published artifact of one file (sub/model.bin) and its manifest.
std::string MakeArtifact(const fs::path& root, const std::string& name, const std::string& content) {
  const fs::path dir = root / name;
  fs::create_directories(dir / "sub");
  std::ofstream(dir / "sub" / "model.bin") << content;
  std::ofstream(dir / kManifestName) << Sha256Hex(content.data(), content.size()) << "  sub/model.bin\n";
  return dir.string();
}

TEST_F(ManifestTest, CorruptionIsDataLossAndOnlyThat) {
  const std::string good = MakeArtifact(dir_, "good", "weights");
  EXPECT_TRUE(VerifyManifest(good).ok());
  EXPECT_EQ(VerifyManifest((dir_ / "absent").string()).code(), StatusCode::kNotFound);
  const std::vector<std::pair<std::string, std::function<void(const std::string&)>>> corruptions = {
      {"sha256 mismatch", [](const std::string& d) { std::ofstream(d + "/sub/model.bin") << "tampered"; }},
      {"is missing", [](const std::string& d) { fs::remove(d + "/sub/model.bin"); }},
      {"not in the manifest", [](const std::string& d) { std::ofstream(d + "/extra") << "x"; }},
      {"no manifest.sha256", [](const std::string& d) { fs::remove(d + "/manifest.sha256"); }},
      {"malformed line", [](const std::string& d) { std::ofstream(d + "/manifest.sha256") << "nonsense\n"; }},
      {"escapes", [](const std::string& d) {
         std::ofstream(d + "/manifest.sha256") << std::string(64, 'a') << "  ../x\n" << std::string(64, 'a') << "  sub/model.bin\n";
       }},
      {"symlink", [](const std::string& d) { fs::create_symlink("/etc/hostname", d + "/sub/link"); }},
      {"not a regular file", [](const std::string& d) {
         fs::remove(d + "/sub/model.bin");
         ASSERT_EQ(::mkfifo((d + "/sub/model.bin").c_str(), 0644), 0);
       }},
  };
  for (size_t i = 0; i < corruptions.size(); ++i) {
    const auto& [what, corrupt] = corruptions[i];
    const std::string d = MakeArtifact(dir_, std::string("c").append(std::to_string(i)), "weights");
    corrupt(d);
    const Status s = VerifyManifest(d);
    EXPECT_EQ(s.code(), StatusCode::kDataLoss) << what << ": " << s.message();
    EXPECT_NE(s.message().find(what), std::string::npos) << s.message();
  }
}

// A file that cannot be opened or read says nothing about its content: Unavailable, never DataLoss (which
// would let a worker delete a good output that dependents already use).
TEST_F(ManifestTest, UnreadableIsUnavailableNotDataLoss) {
  const std::string leased = MakeArtifact(dir_, "leased", "weights");
  // A write lease: until it is given up, other opens with O_NONBLOCK fail with EWOULDBLOCK. Its break is
  // signalled with SIGIO, ignored here.
  std::signal(SIGIO, SIG_IGN);
  const int fd = ::open((leased + "/sub/model.bin").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  if (::fcntl(fd, F_SETLEASE, F_WRLCK) == 0) {
    const Status s = VerifyManifest(leased);
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.message();
    EXPECT_NE(s.message().find(std::strerror(EWOULDBLOCK)), std::string::npos) << s.message();
    ::fcntl(fd, F_SETLEASE, F_UNLCK);
    EXPECT_TRUE(VerifyManifest(leased).ok());
  } else {
    ADD_FAILURE() << "no file leases on " << dir_ << ": " << std::strerror(errno);
  }
  ::close(fd);

  // Permission denied, as a user that may list the artifact but not read the file (root reads anything:
  // the check runs in a child that drops to nobody).
  const std::string denied = MakeArtifact(dir_, "denied", "weights");
  for (const fs::path& p : {dir_, fs::path(denied), fs::path(denied) / "sub"}) ::chmod(p.c_str(), 0755);
  ::chmod((denied + "/manifest.sha256").c_str(), 0644);
  ::chmod((denied + "/sub/model.bin").c_str(), 0600);
  if (::geteuid() == 0) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(10);
      const Status s = VerifyManifest(denied);
      ::_exit(s.code() == StatusCode::kUnavailable && s.message().find("Permission denied") != std::string::npos ? 0 : 11);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "exit status " << status;
  } else {
    EXPECT_EQ(VerifyManifest(denied).code(), StatusCode::kUnavailable);
  }
}

TEST_F(ManifestTest, MissingManifestIsDataLoss) {
  EXPECT_EQ(VerifyManifest(dir_).code(), StatusCode::kDataLoss);
}

}  // namespace
}  // namespace btx
