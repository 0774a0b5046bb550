#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>

#include <gtest/gtest.h>

#include "btx/common/artifact_store.h"
#include "btx/common/clock.h"
#include "btx/common/status.h"
#include "btx/contract/files.h"
#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/secrets.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/common/utf8.h"

namespace btx {
namespace {

TEST(Uri, FileUriRoundTripAndTraversalRejected) {
  auto p = FileUriToPath("file:///data/btx/run");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, "/data/btx/run");
  EXPECT_EQ(PathToFileUri("/a/b"), "file:///a/b");
  EXPECT_FALSE(FileUriToPath("s3://bucket/x").ok());
  EXPECT_FALSE(FileUriToPath("file://relative/x").ok());
  auto bad = FileUriToPath("file:///data/../etc/passwd");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(".."), std::string_view::npos);
}

TEST(Uri, JoinUnderRejectsUnsafeComponents) {
  EXPECT_EQ(*JoinUnder("/root/", "p1/branch-code"), "/root/p1/branch-code");
  EXPECT_FALSE(JoinUnder("/root", "../x").ok());
  EXPECT_FALSE(JoinUnder("/root", "a/./b").ok());
  EXPECT_FALSE(JoinUnder("/root", "a b").ok());
  EXPECT_FALSE(JoinUnder("relative", "a").ok());
  EXPECT_EQ(SanitizeComponent("branch/code"), "branch-code");
  EXPECT_TRUE(IsSafeComponent("step-00000050"));
  EXPECT_FALSE(IsSafeComponent(".."));
}

// What a gang's rendezvous may be: the scheduler refuses anything else, a member ignores it.
TEST(Uri, IsHostPortTakesWhatBtxTrainReads) {
  for (const char* ok : {"127.0.0.1:29500", "gpu-node-1.example.org:1", "fe80::1:65535", "[::1]:8080"}) {
    EXPECT_TRUE(IsHostPort(ok)) << ok;
  }
  for (const char* bad : {"", ":80", "host", "host:", "host:0", "host:65536", "host:123456", "host:8o", "a b:80",
                          "no port; rm -rf /", "h/x:80"}) {
    EXPECT_FALSE(IsHostPort(bad)) << bad;
  }
  EXPECT_FALSE(IsHostPort(std::string(254, 'a') + ":80"));
  EXPECT_TRUE(IsHostPort(std::string(253, 'a') + ":80"));
}

TEST(ArtifactStore, FetchRefusesASymlinkLeadingOutOfTheRoot) {
  const std::string dir = *MakeTempDir("btx-artifacts-");
  std::filesystem::create_directories(dir + "/root/p/job/model");
  std::filesystem::create_directories(dir + "/outside");
  ASSERT_TRUE(ToAbsl(WriteManifest(dir + "/root/p/job/model")).ok());
  ASSERT_TRUE(ToAbsl(WriteManifest(dir + "/outside")).ok());
  std::filesystem::create_directory_symlink(dir + "/outside", dir + "/root/p/evil");
  FileArtifactStore store(dir + "/root");
  EXPECT_TRUE(store.Fetch(PathToFileUri(dir + "/root/p/job/model")).ok());
  auto evil = store.Fetch(PathToFileUri(dir + "/root/p/evil"));
  ASSERT_FALSE(evil.ok());
  EXPECT_EQ(evil.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(evil.status().message()).find("outside the artifact root"), std::string::npos) << evil.status();
  std::filesystem::remove_all(dir);
}

TEST(Clock, ManualClockAdvances) {
  ManualClock clock;
  auto t0 = clock.Now();
  clock.Advance(std::chrono::seconds(5));
  EXPECT_EQ(clock.Now() - t0, std::chrono::seconds(5));
  EXPECT_EQ(FromUnixMicros(ToUnixMicros(t0)), t0);
}

TEST(Fs, AtomicWriteReplacesContents) {
  auto dir = MakeTempDir("btx-fs-");
  ASSERT_TRUE(dir.ok());
  std::string path = *dir + "/f.txt";
  ASSERT_TRUE(WriteFileAtomic(path, "one").ok());
  ASSERT_TRUE(WriteFileAtomic(path, "two").ok());
  EXPECT_EQ(*ReadFile(path), "two");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(*dir), {}), 1);  // no temp left behind
  EXPECT_FALSE(ReadFile(*dir + "/missing").ok());
  std::filesystem::remove_all(*dir);
}

TEST(Process, CapturesOutputAndExitCode) {
  PosixProcessLauncher launcher;
  auto r = RunAndCapture(launcher, {.argv = {"/bin/sh", "-c", "echo out; echo err >&2; exit 3"}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit_code, 3);
  EXPECT_NE(r->output.find("out"), std::string::npos);
  EXPECT_NE(r->output.find("err"), std::string::npos);
}

TEST(Process, ProgressPipeIsFd3) {
  PosixProcessLauncher launcher;
  auto p = launcher.Launch({.argv = {"/bin/sh", "-c", "echo progress >&3"}, .progress_pipe = true});
  ASSERT_TRUE(p.ok()) << p.status();
  char buf[64] = {0};
  ssize_t n = ::read((*p)->progress_fd(), buf, sizeof(buf) - 1);
  EXPECT_EQ(std::string(buf, n > 0 ? n : 0), "progress\n");
  EXPECT_EQ((*p)->Wait(), 0);
}

TEST(Process, SignalKillsGroupAndReportsSignal) {
  PosixProcessLauncher launcher;
  auto p = launcher.Launch({.argv = {"/bin/sh", "-c", "exec sleep 30"}});
  ASSERT_TRUE(p.ok());
  (*p)->Signal(SIGKILL);
  EXPECT_EQ((*p)->Wait(), 128 + SIGKILL);
}

TEST(Process, MissingProgramIsAnError) {
  PosixProcessLauncher launcher;
  auto p = launcher.Launch({.argv = {"/nonexistent/program"}});
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("/nonexistent/program"), std::string_view::npos);
}

// PATH is process-wide: restore it whatever the test's outcome.
class PathOverride {
 public:
  explicit PathOverride(const std::string& value) {
    if (const char* old = std::getenv("PATH")) old_ = old;
    ::setenv("PATH", value.c_str(), 1);
  }
  ~PathOverride() { ::setenv("PATH", old_.c_str(), 1); }

 private:
  std::string old_;
};

TEST(Process, FindOnPathSkipsNonExecutablesAndDirectories) {
  const auto root = std::filesystem::temp_directory_path() / ("btx_find_" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root / "a" / "btx-tool");  // a directory of that name
  std::filesystem::create_directories(root / "b");
  std::filesystem::create_directories(root / "c");
  ASSERT_TRUE(WriteFileAtomic((root / "b" / "btx-tool").string(), "#!/bin/sh\n").ok());
  // No execute bit at all: root's access(X_OK) passes on any one of them.
  std::filesystem::permissions(root / "b" / "btx-tool", std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  ASSERT_TRUE(WriteFileAtomic((root / "c" / "btx-tool").string(), "#!/bin/sh\n").ok());
  std::filesystem::permissions(root / "c" / "btx-tool", std::filesystem::perms::owner_all);
  {
    PathOverride path(Cat((root / "a").string(), "::", (root / "b").string(), ":", (root / "c").string()));
    EXPECT_EQ(FindOnPath("btx-tool"), (root / "c" / "btx-tool").string());
    EXPECT_EQ(FindSiblingExecutable("btx-tool"), (root / "c" / "btx-tool").string());
    EXPECT_EQ(FindOnPath("btx-no-such-tool"), "");
    EXPECT_EQ(FindSiblingExecutable("btx-no-such-tool"), "");
    EXPECT_EQ(FindOnPath("c/btx-tool"), "") << "names only, never paths";
  }
  std::filesystem::remove_all(root);
}

TEST(Process, FindSiblingExecutablePrefersTheDirectoryOfThisBinary) {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  ASSERT_FALSE(ec);
  PathOverride path("/nonexistent");
  EXPECT_EQ(FindSiblingExecutable(self.filename().string()), self.string());
}

TEST(Process, UnsetEnvKeepsNamedVariablesFromTheChild) {
  ::setenv("BTX_TEST_SECRET", "s3cret", 1);
  ::setenv("BTX_TEST_SECRET_NOT", "kept", 1);
  PosixProcessLauncher launcher;
  auto r = RunAndCapture(launcher, {.argv = {"/usr/bin/env"}, .env = {{"BTX_TEST_ADDED", "added"}},
                                    .unset_env = {"BTX_TEST_SECRET"}});
  ::unsetenv("BTX_TEST_SECRET");
  ::unsetenv("BTX_TEST_SECRET_NOT");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->output.find("s3cret"), std::string::npos) << r->output;
  EXPECT_NE(r->output.find("BTX_TEST_SECRET_NOT=kept"), std::string::npos) << r->output;  // names match whole
  EXPECT_NE(r->output.find("BTX_TEST_ADDED=added"), std::string::npos) << r->output;
}

TEST(Utf8, ValidInputIsKeptAndIllFormedSequencesBecomeOneReplacementPerMaximalSubpart) {
  const std::string r = "\xEF\xBF\xBD";
  for (const std::string& ok : std::vector<std::string>{"", "plain ascii", "\xC3\xA9t\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xED\x9F\xBF",
                               "\xEF\xBF\xBF", "\xF4\x8F\xBF\xBF", std::string("nul \0 inside", 12)}) {
    EXPECT_TRUE(IsValidUtf8(ok)) << ok;
    EXPECT_EQ(SanitizeUtf8(ok), ok);
  }
  // Unicode's own examples (§3.9, Tables 3-8 to 3-11) and the usual suspects.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\xFF", r},                                              // never a lead byte
      {"bad \xFF\xFE bytes", "bad " + r + r + " bytes"},
      {"\x80", r},                                              // a lone continuation byte
      {"\xC3", r},                                              // truncated two-byte character
      {"\xC3" "a", r + "a"},
      {"\xC0\xAF", r + r},                                      // overlong '/'
      {"\xE0\x80\xAF", r + r + r},                              // overlong, three bytes
      {"\xED\xA0\x80", r + r + r},                              // a surrogate
      {"\xF4\x90\x80\x80", r + r + r + r},                      // above U+10FFFF
      {"\xE2\x82", r},                                          // one maximal subpart, one U+FFFD
      {"\xF0\x9F\x98", r},
      {"\xF0\x9F\x98" "x", r + "x"},
      {"\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64", "a" + r + r + r + "b" + r + "c" + r + r + "d"},
  };
  for (const auto& [in, want] : cases) {
    EXPECT_FALSE(IsValidUtf8(in)) << in;
    EXPECT_EQ(SanitizeUtf8(in), want) << in;
    EXPECT_TRUE(IsValidUtf8(SanitizeUtf8(in))) << in;
    std::string copy = in;
    SanitizeUtf8InPlace(copy);
    EXPECT_EQ(copy, want);
  }
}

TEST(Utf8, PrefixNeverEndsInsideACharacter) {
  const std::string s = "ab\xC3\xA9" "c\xE2\x82\xAC" "d\xF0\x9F\x98\x80";  // a b é c € d 😀
  const std::vector<size_t> want = {0, 1, 2, 2, 4, 5, 5, 5, 8, 9, 9, 9, 9, 13, 13};
  for (size_t n = 0; n < want.size(); ++n) {
    const auto p = Utf8Prefix(s, n);
    EXPECT_EQ(p.size(), std::min(want[n], s.size())) << n;
    EXPECT_TRUE(IsValidUtf8(p)) << n;
  }
  EXPECT_EQ(Utf8Prefix(s, 100), s);
}

TEST(Secrets, TakeSecretFromEnvironmentUnsetsAndOverwritesIt) {
  ::setenv("BTX_TEST_TOKEN", "tok-123", 1);
  char* where = std::getenv("BTX_TEST_TOKEN");
  ASSERT_NE(where, nullptr);
  EXPECT_EQ(TakeSecretFromEnvironment("BTX_TEST_TOKEN"), std::optional<std::string>("tok-123"));
  EXPECT_EQ(std::getenv("BTX_TEST_TOKEN"), nullptr);
  EXPECT_EQ(std::string(where, 7), std::string(7, '\0')) << "the value's bytes are overwritten where they lay";
  EXPECT_EQ(TakeSecretFromEnvironment("BTX_TEST_TOKEN"), std::nullopt);
  ::setenv("BTX_TEST_TOKEN", "", 1);
  EXPECT_EQ(TakeSecretFromEnvironment("BTX_TEST_TOKEN"), std::nullopt) << "empty counts as unset";
  const auto& names = CredentialEnvironmentVariables();
  EXPECT_NE(std::find(names.begin(), names.end(), "BTX_WORKER_TOKEN"), names.end());
}

TEST(Secrets, ReadSecretFileTakesOneLineAndWarnsAboutLooseModes) {
  const std::string dir = *MakeTempDir("btx-secret-");
  const std::string path = dir + "/token";
  ASSERT_TRUE(WriteFileAtomic(path, "  abc.DEF-123_x \n").ok());
  ::chmod(path.c_str(), 0600);
  std::string warning = "stale";
  EXPECT_EQ(ReadSecretFile(path, &warning).value_or("?"), "abc.DEF-123_x");
  EXPECT_EQ(warning, "");
  ::chmod(path.c_str(), 0644);
  EXPECT_TRUE(ReadSecretFile(path, &warning).ok());
  EXPECT_NE(warning.find("mode 644"), std::string::npos) << warning;
  for (const std::string& bad : std::vector<std::string>{"", " \n", "qqq1\nqqq2\n", "qqq3 qqq4\n", std::string("qqq\0x", 5)}) {
    ASSERT_TRUE(WriteFileAtomic(path, bad).ok());
    auto t = ReadSecretFile(path);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    if (bad.size() > 3) {
      EXPECT_EQ(std::string(t.status().message()).find(bad.substr(0, 3)), std::string::npos) << "quoted";
    }
  }
  EXPECT_EQ(ReadSecretFile(dir + "/missing").status().code(), absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace btx
