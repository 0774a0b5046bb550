#include "btx/common/artifact_store.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <sstream>
#include <vector>

#include "btx/common/fs.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"

namespace btx {
namespace fs = std::filesystem;
namespace {

absl::StatusOr<std::vector<std::string>> RegularFilesBelow(const std::string& dir) {
  std::error_code ec;
  std::vector<std::string> out;
  fs::recursive_directory_iterator it(dir, ec), end;
  if (ec) return absl::NotFoundError(Cat("cannot list ", dir, ": ", ec.message()));
  for (; it != end; it.increment(ec)) {
    if (ec) return absl::InternalError(Cat("cannot list ", dir, ": ", ec.message()));
    if (it->is_symlink()) return absl::DataLossError(Cat(dir, ": symlink ", it->path().string(), " in an artifact"));
    if (it->is_regular_file()) out.push_back(fs::relative(it->path(), dir).string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

absl::Status FsyncFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(Cat("open ", path, ": ", std::strerror(errno)));
  const int r = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (r != 0) return absl::InternalError(Cat("fsync ", path, ": ", std::strerror(err)));
  return absl::OkStatus();
}

bool SafeRelative(const std::string& rel) {
  if (rel.empty() || rel.front() == '/') return false;
  for (const auto& part : Split(rel, '/')) {
    if (!IsSafeComponent(part)) return false;
  }
  return true;
}

}  // namespace

FileArtifactStore::FileArtifactStore(std::string root) : root_(fs::path(std::move(root)).lexically_normal().string()) {
  while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
}

absl::StatusOr<std::string> FileArtifactStore::Sha256File(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(Cat("open ", path, ": ", std::strerror(errno)));
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(Cat("read ", path, ": ", std::strerror(err)));
    }
    if (n == 0) break;
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  return HexLower(md, len);
}

absl::Status FileArtifactStore::WriteManifest(const std::string& dir) {
  auto files = RegularFilesBelow(dir);
  if (!files.ok()) return files.status();
  std::string text;
  for (const auto& f : *files) {
    if (f == kManifestFile) continue;
    auto h = Sha256File(Cat(dir, "/", f));
    if (!h.ok()) return h.status();
    text += Cat(*h, "  ", f, "\n");
    if (auto s = FsyncFile(Cat(dir, "/", f)); !s.ok()) return s;
  }
  return WriteFileAtomic(Cat(dir, "/", kManifestFile), text);
}

absl::Status FileArtifactStore::VerifyDir(const std::string& dir) {
  const std::string mpath = Cat(dir, "/", kManifestFile);
  auto text = ReadFile(mpath, size_t{64} << 20);
  if (!text.ok()) return absl::DataLossError(Cat(dir, ": no readable ", kManifestFile));
  std::map<std::string, std::string> listed;
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.size() < 67 || line.compare(64, 2, "  ") != 0 ||
        line.find_first_not_of("0123456789abcdef") < 64) {
      return absl::DataLossError(Cat(mpath, ": malformed line '", line.substr(0, 80), "'"));
    }
    const std::string rel = line.substr(66);
    if (!SafeRelative(rel)) return absl::DataLossError(Cat(mpath, ": path escapes the artifact: '", rel, "'"));
    listed[rel] = line.substr(0, 64);
  }
  auto files = RegularFilesBelow(dir);
  if (!files.ok()) return files.status();
  for (const auto& f : *files) {
    if (f != kManifestFile && !listed.count(f)) return absl::DataLossError(Cat(dir, ": file '", f, "' is not in the manifest"));
  }
  for (const auto& [f, want] : listed) {
    auto got = Sha256File(Cat(dir, "/", f));
    if (!got.ok()) return absl::DataLossError(Cat(dir, ": manifest lists '", f, "' but it is missing"));
    if (*got != want) {
      return absl::DataLossError(Cat(dir, ": sha256 mismatch for '", f, "' (manifest ", want, ", file ", *got, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FileArtifactStore::UriFor(std::string_view name) const {
  auto path = JoinUnder(root_, name);
  if (!path.ok()) return path.status();
  return PathToFileUri(*path);
}

absl::StatusOr<std::string> FileArtifactStore::PathOf(std::string_view uri) const {
  auto path = FileUriToPath(uri);
  if (!path.ok()) return path.status();
  const std::string normal = fs::path(*path).lexically_normal().string();
  if (normal.size() <= root_.size() || normal.compare(0, root_.size(), root_) != 0 || normal[root_.size()] != '/') {
    return absl::InvalidArgumentError(Cat("artifact URI '", uri, "' is outside the artifact root ", root_));
  }
  return normal;
}

absl::StatusOr<std::string> FileArtifactStore::Publish(const std::string& local_dir, std::string_view name) {
  if (name.empty()) return absl::InvalidArgumentError("publish: empty artifact name");
  auto final_path = JoinUnder(root_, name);
  if (!final_path.ok()) return final_path.status();
  std::error_code ec;
  if (!fs::is_directory(local_dir, ec)) return absl::InvalidArgumentError(Cat("publish: ", local_dir, " is not a directory"));
  if (fs::exists(*final_path, ec)) return absl::AlreadyExistsError(Cat("artifact ", *final_path, " already exists"));
  const fs::path parent = fs::path(*final_path).parent_path();
  fs::create_directories(parent, ec);
  if (ec) return absl::InternalError(Cat("cannot create ", parent.string(), ": ", ec.message()));
  // Stage beside the destination so the final rename never crosses a filesystem.
  const std::string staged = Cat(parent.string(), "/.", fs::path(*final_path).filename().string(), ".tmp-", ::getpid());
  fs::remove_all(staged, ec);
  fs::rename(local_dir, staged, ec);
  if (ec) {
    fs::copy(local_dir, staged, fs::copy_options::recursive, ec);
    if (ec) {
      fs::remove_all(staged, ec);
      return absl::InternalError(Cat("cannot stage ", local_dir, " at ", staged, ": ", ec.message()));
    }
    fs::remove_all(local_dir, ec);
  }
  if (auto s = WriteManifest(staged); !s.ok()) return s;
  if (auto s = FsyncDir(staged); !s.ok()) return s;
  // rename(2) silently replaces an empty directory; a concurrent publisher must lose instead.
  if (fs::exists(*final_path, ec)) {
    fs::remove_all(staged, ec);
    return absl::AlreadyExistsError(Cat("artifact ", *final_path, " already exists"));
  }
  fs::rename(staged, *final_path, ec);
  if (ec) return absl::InternalError(Cat("cannot publish ", *final_path, ": ", ec.message()));
  if (auto s = FsyncDir(parent.string()); !s.ok()) return s;
  return PathToFileUri(*final_path);
}

absl::StatusOr<std::string> FileArtifactStore::Fetch(std::string_view uri) {
  auto path = PathOf(uri);
  if (!path.ok()) return path.status();
  std::error_code ec;
  if (!fs::is_directory(*path, ec)) return absl::NotFoundError(Cat("artifact ", uri, " does not exist"));
  if (auto s = VerifyDir(*path); !s.ok()) return s;
  return *path;
}

absl::Status FileArtifactStore::Remove(std::string_view uri) {
  auto path = PathOf(uri);
  if (!path.ok()) return path.status();
  std::error_code ec;
  fs::remove_all(*path, ec);
  if (ec) return absl::InternalError(Cat("cannot remove ", *path, ": ", ec.message()));
  return FsyncDir(fs::path(*path).parent_path().string());
}

}  // namespace btx
