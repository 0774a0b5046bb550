// The disk fills up while btx-train writes a checkpoint. The real trainer writes its checkpoints
// into a small tmpfs mounted in a private mount namespace (so nothing is left mounted if the test
// dies). The tmpfs is sized from the checkpoint the first run wrote, so the next checkpoint runs
// out of space part-way through, wherever that falls. Expected: a clean failure that names ENOSPC
// with exit code 1 (a failure the worker retries, docs/btx-train-protocol.md), nothing half-written
// left behind, the previous checkpoint intact (its sha256 manifest verifies, its bytes unchanged),
// and once there is space again the same job resumes from it and finishes.
#include <sched.h>
#include <sys/mount.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "btx/contract/files.h"
#include "btx/contract/job.h"
#include "cluster.h"

namespace btx::chaos {
namespace {
namespace fs = std::filesystem;

using contract::kExitFailed;  // btx-train: a failure that is neither bad input nor an interruption

// A private mount namespace for this process, so that the tmpfs below is invisible to the rest of
// the machine and vanishes with the process. As root, CLONE_NEWNS is enough; otherwise a user
// namespace in which we are root. Returns why not, or "" on success.
std::string EnterPrivateMountNamespace() {
  std::string why;
  if (::unshare(CLONE_NEWNS) != 0) {
    why = Cat("unshare(CLONE_NEWNS): ", std::strerror(errno));
    const uid_t uid = ::geteuid();
    const gid_t gid = ::getegid();
    // Needs a single-threaded process; the test starts no threads before this.
    if (::unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0) return Cat(why, "; unshare(CLONE_NEWUSER|CLONE_NEWNS): ", std::strerror(errno));
    std::ofstream("/proc/self/setgroups") << "deny";
    std::ofstream("/proc/self/uid_map") << "0 " << uid << " 1";
    std::ofstream("/proc/self/gid_map") << "0 " << gid << " 1";
  }
  // Mounts made here must not propagate back into the namespace we came from.
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    return Cat("making / private in the new namespace: ", std::strerror(errno));
  }
  return "";
}

int64_t UsedBytes(const std::string& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) return -1;
  return static_cast<int64_t>(st.f_blocks - st.f_bfree) * static_cast<int64_t>(st.f_frsize);
}

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

class DiskFullTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = EnterPrivateMountNamespace(); !why.empty()) {
      GTEST_SKIP() << "cannot create a private mount namespace for the small tmpfs (" << why
                   << "); run as root or allow unprivileged user namespaces";
    }
    auto dir = MakeTempDir("btx-chaos-disk-");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    small_ = dir_ + "/small";
    fs::create_directories(small_);
    ASSERT_EQ(::mount("tmpfs", small_.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=0755"), 0)
        << "mount tmpfs: " << std::strerror(errno);
    mounted_ = true;
    corpora_ = dir_ + "/data";
    e2e::MakeCorpora(corpora_, 60000);
  }
  void TearDown() override {
    if (mounted_) ::umount2(small_.c_str(), MNT_DETACH);
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  absl::Status Resize(const std::string& size) {
    if (::mount(nullptr, small_.c_str(), nullptr, MS_REMOUNT | MS_NOSUID | MS_NODEV, ("size=" + size).c_str()) != 0) {
      return absl::InternalError(Cat("remount ", small_, " size=", size, ": ", std::strerror(errno)));
    }
    return absl::OkStatus();
  }

  // Runs btx-train on a pretrain job that checkpoints into the small filesystem.
  RunResult Train(const std::string& name, int steps, const std::string& output_dir) {
    contract::JobFile job;
    job.job_id = "00000000-0000-0000-0000-000000000001";
    job.pipeline = "chaos-disk";
    job.kind = contract::JobKind::kPretrain;
    job.name = "pretrain";
    job.output_dir = output_dir;
    job.checkpoint_dir = small_ + "/checkpoints";
    job.threads = 1;
    job.device = "cpu";
    job.spec = {{"init", {{"preset", "tiny"}}},
                {"data", {{"train", {corpora_ + "/code/train.txt"}}}},
                {"train", {{"batch_tokens", 512}, {"seq_len", 64}, {"lr", 3e-3}, {"warmup", 2}, {"checkpoint_every", 10},
                           {"log_every", 5}, {"valid_tokens", 256}}},
                {"steps", steps}};
    const std::string path = Cat(dir_, "/", name, ".json");
    EXPECT_TRUE(WriteFileAtomic(path, contract::ToJson(job).dump(2)).ok());
    ProcessSpec ps;
    ps.argv = {Cat(BTX_BIN_DIR, "/btx-train"), "--job", path, "--progress-fd", "-1"};
    auto r = RunAndCapture(launcher_, ps);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : RunResult{};
  }

  std::string dir_, small_, corpora_;
  bool mounted_ = false;
  PosixProcessLauncher launcher_;
};

TEST_F(DiskFullTest, FailedCheckpointLeavesThePreviousOneIntactAndTheJobResumesFromIt) {
  const std::string checkpoints = small_ + "/checkpoints";
  const std::string first = checkpoints + "/step-00000010", second = checkpoints + "/step-00000020";

  // A first run leaves one checkpoint, the one to protect.
  RunResult a = Train("a", 10, dir_ + "/out-a");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  ASSERT_EQ(Entries(checkpoints), std::vector<std::string>{"step-00000010"});
  ASSERT_TRUE(VerifyManifest(first).ok());
  auto manifest_before = ReadFile(first + "/manifest.sha256");
  ASSERT_TRUE(manifest_before.ok());
  const int64_t used = UsedBytes(small_);
  ASSERT_GT(used, 0);

  // Room for half of another checkpoint of the same size: the next write fails part-way.
  ASSERT_TRUE(Resize(std::to_string(used + used / 2)).ok());
  RunResult b = Train("b", 20, dir_ + "/out-b");
  EXPECT_EQ(b.exit_code, kExitFailed) << b.output;
  EXPECT_NE(b.output.find("No space left on device"), std::string::npos) << "ENOSPC not surfaced:\n" << b.output;
  EXPECT_NE(b.output.find("writing checkpoint " + second), std::string::npos) << b.output;
  EXPECT_NE(b.output.find("resumed from " + first + " at step 10"), std::string::npos) << b.output;
  for (const auto& line : Split(b.output, '\n', true)) {
    if (line.find("No space") != std::string::npos) std::cerr << "the failed run said: " << line << "\n";
  }
  EXPECT_FALSE(fs::exists(dir_ + "/out-b"));
  // Nothing half-written remains (no step-20, no staging dir) and its space is given back.
  EXPECT_EQ(Entries(checkpoints), std::vector<std::string>{"step-00000010"});
  EXPECT_EQ(UsedBytes(small_), used);
  // The previous checkpoint is untouched and still verifies.
  auto verified = VerifyManifest(first);
  EXPECT_TRUE(verified.ok()) << verified.ToString();
  EXPECT_EQ(ReadFile(first + "/manifest.sha256").value_or(""), *manifest_before);

  // Space again: the same job resumes from the surviving checkpoint and finishes.
  ASSERT_TRUE(Resize("64m").ok());
  RunResult c = Train("b", 20, dir_ + "/out-b");
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("resumed from " + first + " at step 10"), std::string::npos) << c.output;
  auto out = VerifyManifest(dir_ + "/out-b");
  EXPECT_TRUE(out.ok()) << out.ToString();
  auto last = VerifyManifest(second);
  EXPECT_TRUE(last.ok()) << last.ToString();
  EXPECT_EQ(Entries(checkpoints), (std::vector<std::string>{"step-00000010", "step-00000020"}));
}

}  // namespace
}  // namespace btx::chaos
