#include "btx/common/manifest_check.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <set>
#include <vector>

#include "btx/common/strings.h"
#include "btx/contract/files.h"
#include "btx/contract/sha256.h"

namespace btx {
namespace {

// "No such file" (or a path component that is a file): the thing is not there, which is a finding.
bool Absent(int err) { return err == ENOENT || err == ENOTDIR; }

absl::Status ReadError(const std::string& what, const std::string& path, int err) {
  return absl::UnavailableError(Cat("cannot ", what, " ", path, ": ", std::strerror(err)));
}

// The same rules as the contract's manifest reader (contract/files.cc).
bool SafeRelative(const std::string& rel) {
  if (rel.empty() || rel.front() == '/') return false;
  for (const std::string& part : Split(rel, '/')) {
    if (part.empty() || part == "." || part == ".." ||
        std::any_of(part.begin(), part.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; })) {
      return false;
    }
  }
  return true;
}

bool IsSha256Hex(std::string_view h) {
  return h.size() == 64 && std::all_of(h.begin(), h.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Opens a file that must be a regular one (not a symlink, FIFO, device or directory).
absl::Status OpenRegular(const std::string& path, const std::string& shown, int& fd_out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    if (Absent(err)) return absl::DataLossError(Cat(shown, " is missing"));
    if (err == ELOOP) return absl::DataLossError(Cat(shown, " is a symlink"));
    return ReadError("open", path, err);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ReadError("stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::DataLossError(Cat(shown, " is not a regular file"));
  }
  fd_out = fd;
  return absl::OkStatus();
}

// Regular files below `dir` (relative to `root_len` characters of it), sorted; DataLoss on a symlink.
absl::Status ListFiles(const std::string& dir, size_t root_len, std::set<std::string>& files) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ReadError("list", dir, errno);
  absl::Status status;
  for (;;) {
    errno = 0;
    const dirent* e = ::readdir(d);
    if (e == nullptr) {
      if (errno != 0) status = ReadError("list", dir, errno);
      break;
    }
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = dir + "/" + name;
    struct stat st {};
    if (::fstatat(::dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
      // Listed a moment ago and gone now: the directory is changing under us, which proves nothing.
      status = ReadError("stat", path, errno);
      break;
    }
    if (S_ISLNK(st.st_mode)) {
      status = absl::DataLossError(Cat("symlink ", path, " in an artifact"));
      break;
    }
    if (S_ISDIR(st.st_mode)) {
      status = ListFiles(path, root_len, files);
      if (!status.ok()) break;
    } else if (S_ISREG(st.st_mode)) {
      files.insert(path.substr(root_len));
    }
  }
  ::closedir(d);
  return status;
}

}  // namespace

absl::Status CheckManifest(const std::string& dir) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) {
    if (Absent(errno)) return absl::NotFoundError(Cat(dir, " does not exist"));
    return ReadError("stat", dir, errno);
  }
  if (!S_ISDIR(st.st_mode)) return absl::DataLossError(Cat(dir, " is not a directory"));

  // The manifest.
  const std::string mpath = Cat(dir, "/", kManifestName);
  if (::lstat(mpath.c_str(), &st) != 0) {
    if (Absent(errno)) return absl::DataLossError(Cat(dir, ": no ", kManifestName));
    return ReadError("stat", mpath, errno);
  }
  int mfd = -1;
  if (absl::Status s = OpenRegular(mpath, mpath, mfd); !s.ok()) return s;
  std::string text;
  {
    Fd fd(mfd);
    char buf[65536];
    for (;;) {
      const ssize_t r = ::read(fd.get(), buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return ReadError("read", mpath, errno);
      if (r == 0) break;
      text.append(buf, static_cast<size_t>(r));
      if (text.size() > (size_t{64} << 20)) return absl::DataLossError(Cat(mpath, ": larger than 64 MiB"));
    }
  }
  std::map<std::string, std::string> listed;
  for (const std::string& line : Split(text, '\n')) {
    if (line.empty()) continue;
    if (line.size() < 67 || line.substr(64, 2) != "  " || !IsSha256Hex(std::string_view(line).substr(0, 64))) {
      return absl::DataLossError(Cat(mpath, ": malformed line '", line.substr(0, 80), "'"));
    }
    const std::string rel = line.substr(66);
    if (!SafeRelative(rel)) return absl::DataLossError(Cat(mpath, ": path escapes the artifact: '", rel, "'"));
    listed[rel] = line.substr(0, 64);
  }

  // What is there.
  std::set<std::string> files;
  if (absl::Status s = ListFiles(dir, dir.size() + 1, files); !s.ok()) return s;
  for (const auto& f : files) {
    if (f != kManifestName && !listed.count(f)) return absl::DataLossError(Cat(dir, ": file '", f, "' is not in the manifest"));
  }

  // Every listed file, hashed.
  std::vector<char> buf(size_t{1} << 20);
  for (const auto& [rel, want] : listed) {
    const std::string path = Cat(dir, "/", rel);
    int raw = -1;
    if (absl::Status s = OpenRegular(path, Cat(dir, ": '", rel, "' (listed in the manifest)"), raw); !s.ok()) return s;
    Fd fd(raw);
    Sha256 sha;
    for (;;) {
      const ssize_t r = ::read(fd.get(), buf.data(), buf.size());
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return ReadError("read", path, errno);
      if (r == 0) break;
      sha.Update(buf.data(), static_cast<size_t>(r));
    }
    const std::string got = sha.FinishHex();
    if (got != want) {
      return absl::DataLossError(Cat(dir, ": sha256 mismatch for '", rel, "' (manifest ", want, ", file ", got, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace btx
