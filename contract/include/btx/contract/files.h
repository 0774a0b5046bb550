// Durable file helpers: sha256 manifests (an artifact's integrity, written by the trainer and verified by
// the worker, the scheduler's clients and every job that reads it) and atomic publication of directories.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "btx/contract/status.h"

namespace btx {

inline constexpr const char* kManifestName = "manifest.sha256";

// Lowercase hex sha256 of a regular file (anything else, e.g. a FIFO, is DataLoss rather than a read that blocks).
// NotFound when it does not exist, Unavailable when it cannot be read now.
StatusOr<std::string> Sha256File(const std::string& path);
std::string Sha256Hex(const void* data, size_t size);
std::string HexLower(const unsigned char* data, size_t size);

// sha256 (lowercase hex, as Sha256File gives) of files below a directory, by path relative to it: what a writer
// hashed as it wrote, so that publication need not read those files again.
using FileDigests = std::map<std::string, std::string>;

// Writes `content` to `path` and fsyncs it (no rename: callers publish whole directories).
Status WriteFileDurable(const std::string& path, const std::string& content);
// The whole file; InvalidArgument when it is larger than max_bytes; NotFound / Unavailable as Sha256File.
StatusOr<std::string> ReadFile(const std::string& path, size_t max_bytes = size_t{1} << 30);
Status FsyncPath(const std::string& path);

// manifest.sha256 uses the `sha256sum` text format ("<hex>  <relative path>"), so `sha256sum -c`
// can check a directory by hand. It covers every regular file below `dir` except itself. Files in `known` are
// listed with the digest given there, unread (the manifest is the same as without them when those are right);
// a `known` entry for a file that is not there, or that is not a sha256 hex digest, is an Internal error.
Status WriteManifest(const std::string& dir, const FileDigests& known = {});
// OK, or the first problem, keeping what it says about the content:
//   DataLoss     positively corrupt: no manifest, a malformed line or a listed path that leaves the dir, a
//                symlink, a listed file missing or not a regular file, a file not listed, a digest mismatch
//                (only this allows removing the directory);
//   Unavailable  something could not be read (EIO, ESTALE, EACCES, EWOULDBLOCK, ...): nothing is known;
//   NotFound     the directory itself does not exist.
// Files are opened with O_NONBLOCK (a FIFO or a leased file must not block the reader) and O_NOFOLLOW.
Status VerifyManifest(const std::string& dir);

// A directory that becomes visible under its final name only once it is complete:
// files go into a hidden sibling temp dir (".<name>.tmp-<pid>-<random>@<host>"; Create removes those of dead
// processes of this host, never another host's); Publish() writes the manifest, fsyncs every file and the
// dir, renames it into place and fsyncs the parent. An unpublished temp dir is removed on destruction.
// `known`: digests the writers computed as they wrote (see WriteManifest), so the manifest does not re-read them.
class StagedDir {
 public:
  static StatusOr<StagedDir> Create(const std::string& final_dir);
  StagedDir(StagedDir&& o) noexcept;
  StagedDir& operator=(StagedDir&&) = delete;
  StagedDir(const StagedDir&) = delete;
  ~StagedDir();
  const std::string& path() const { return tmp_; }
  const std::string& final_path() const { return final_; }
  Status Publish(const FileDigests& known = {});

 private:
  StagedDir(std::string tmp, std::string fin) : tmp_(std::move(tmp)), final_(std::move(fin)) {}
  std::string tmp_, final_;
  bool done_ = false;
};

// This machine's host name as staged temp dirs record it ('/' and '@' replaced).
std::string HostName();

// Regular files below dir, relative paths, sorted; DataLoss on a symlink.
StatusOr<std::vector<std::string>> ListFilesRecursive(const std::string& dir);

}  // namespace btx
