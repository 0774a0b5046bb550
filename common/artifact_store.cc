#include "btx/common/artifact_store.h"

#include <unistd.h>

#include <filesystem>

#include "btx/common/fs.h"
#include "btx/common/status.h"
#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/contract/files.h"

namespace btx {
namespace fs = std::filesystem;
namespace {

// The manifest itself is durable once written; the files it vouches for must be too before the
// directory appears under its final name.
absl::Status FsyncTree(const std::string& dir) {
  auto files = ListFilesRecursive(dir);
  if (!files.ok()) return ToAbsl(files.status());
  for (const auto& f : *files) {
    if (auto s = ToAbsl(FsyncPath(Cat(dir, "/", f))); !s.ok()) return s;
  }
  return FsyncDir(dir);
}

}  // namespace

FileArtifactStore::FileArtifactStore(std::string root) : root_(fs::path(std::move(root)).lexically_normal().string()) {
  while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
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
  if (auto s = ToAbsl(WriteManifest(staged)); !s.ok()) return s;
  if (auto s = FsyncTree(staged); !s.ok()) return s;
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
  // A symlinked directory (or parent) inside the root may lead anywhere: what counts is where reading goes.
  const fs::path real = fs::weakly_canonical(*path, ec), real_root = fs::weakly_canonical(root_, ec);
  if (ec) return absl::UnavailableError(Cat("artifact ", uri, ": ", ec.message()));
  const fs::path rel = real.lexically_relative(real_root);
  if (rel.empty() || *rel.begin() == "..") {
    return absl::InvalidArgumentError(Cat("artifact ", uri, " resolves to ", real.string(), ", outside the artifact root ", root_));
  }
  if (auto s = ToAbsl(VerifyManifest(*path)); !s.ok()) return s;
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
