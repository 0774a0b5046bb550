#include <signal.h>
#include <unistd.h>

#include <filesystem>

#include <gtest/gtest.h>

#include "btx/common/clock.h"
#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"

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

}  // namespace
}  // namespace btx
