#include "btx/contract/files.h"

#include <sys/stat.h>

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "btx/contract/sha256.h"

namespace btx {
namespace fs = std::filesystem;

namespace {
// Takes the errno value explicitly where a cleanup call (close, unlink) runs in between and could
// overwrite it: "No space left on device" must survive to the message.
std::string Errno(const std::string& what, const std::string& path, int err = errno) {
  return what + " " + path + ": " + std::strerror(err);
}
}  // namespace

std::string HexLower(const unsigned char* data, size_t size) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(2 * size, '0');
  for (size_t i = 0; i < size; ++i) {
    s[2 * i] = kDigits[data[i] >> 4];
    s[2 * i + 1] = kDigits[data[i] & 15];
  }
  return s;
}

std::string Sha256Hex(const void* data, size_t size) {
  Sha256 sha;
  sha.Update(data, size);
  return sha.FinishHex();
}

// "No such file" is an answer about the content; any other errno (EACCES, ESTALE, EIO, EWOULDBLOCK, EMFILE,
// ELOOP for a symlink) only says the file could not be read now.
Status OpenError(const std::string& path, int err = errno) {
  if (err == ENOENT || err == ENOTDIR) return NotFound(Errno("cannot open", path, err));
  if (err == ELOOP) return DataLoss(path + ": a symlink");
  return Unavailable(Errno("cannot open", path, err));
}

StatusOr<std::string> Sha256File(const std::string& path) {
  // O_NONBLOCK and the fstat: a FIFO or device planted under a listed name must fail, not block the reader.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
  if (fd < 0) return OpenError(path);
  struct stat st_buf {};
  if (::fstat(fd, &st_buf) != 0 || !S_ISREG(st_buf.st_mode)) {
    ::close(fd);
    return DataLoss(path + ": not a regular file");
  }
  Sha256 sha;
  std::vector<char> buf(1 << 20);
  Status st;
  for (;;) {
    ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0) {
      if (errno == EINTR) continue;
      st = Unavailable(Errno("read failed", path));
      break;
    }
    if (r == 0) break;
    sha.Update(buf.data(), static_cast<size_t>(r));
  }
  ::close(fd);
  if (!st.ok()) return st;
  return sha.FinishHex();
}

Status FsyncPath(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Internal(Errno("cannot open for fsync", path));
  int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return Internal(Errno("fsync failed", path, err));
  return Status::Ok();
}

Status WriteFileDurable(const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Internal(Errno("cannot create", path));
  // A file that could not be written whole is removed: a truncated token shard or config left
  // under its final name would be read later as if it were complete (and it holds the space that
  // a full disk is short of).
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return Internal(Errno(what, path, err));
  };
  size_t off = 0;
  while (off < content.size()) {
    ssize_t w = ::write(fd, content.data() + off, content.size() - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      return fail("write failed");
    }
    off += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) return fail("fsync failed");
  // Some filesystems (NFS) report a failed write-back only at close.
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return Internal(Errno("close failed", path, err));
  }
  return Status::Ok();
}

StatusOr<std::string> ReadFile(const std::string& path, size_t max_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return OpenError(path);
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return Unavailable(Errno("read failed", path, err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      ::close(fd);
      return InvalidArgument(path + ": larger than " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return out;
}

StatusOr<std::vector<std::string>> ListFilesRecursive(const std::string& dir) {
  std::error_code ec;
  std::vector<std::string> out;
  fs::recursive_directory_iterator it(dir, ec), end;
  if (ec == std::errc::no_such_file_or_directory) return NotFound("cannot list " + dir + ": " + ec.message());
  if (ec) return Unavailable("cannot list " + dir + ": " + ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) return Unavailable("cannot list " + dir + ": " + ec.message());
    // A link could make a verified directory read (or a manifest vouch for) a file outside it.
    if (it->is_symlink()) return DataLoss(dir + ": symlink " + it->path().string() + " in an artifact");
    if (it->is_regular_file()) out.push_back(fs::relative(it->path(), dir).string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace {
// Relative, below the directory, and no component that walks out of it.
bool SafeRelative(const std::string& rel) {
  if (rel.empty() || rel.front() == '/') return false;
  size_t start = 0;
  while (start <= rel.size()) {
    const size_t end = std::min(rel.find('/', start), rel.size());
    const std::string part = rel.substr(start, end - start);
    if (part.empty() || part == "." || part == ".." ||
        std::any_of(part.begin(), part.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; })) {
      return false;
    }
    start = end + 1;
  }
  return true;
}

bool IsSha256Hex(const std::string& h) {
  auto lower_hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  return h.size() == 64 && std::all_of(h.begin(), h.end(), lower_hex);
}

// A digest for a file that is not there would publish a manifest that no directory can match; it is a bug in
// the writer that reported it, not something to paper over.
Status CheckKnownDigests(const std::string& dir, const std::vector<std::string>& files, const FileDigests& known) {
  for (const auto& [f, h] : known) {
    if (f == kManifestName || !std::binary_search(files.begin(), files.end(), f))
      return Internal(dir + ": a sha256 is known for '" + f + "', which is not a file there");
    if (!IsSha256Hex(h)) return Internal(dir + ": the known sha256 of '" + f + "' is not 64 lowercase hex digits");
  }
  return Status::Ok();
}
}  // namespace

Status WriteManifest(const std::string& dir, const FileDigests& known) {
  BTX_ASSIGN_OR_RETURN(auto files, ListFilesRecursive(dir));
  BTX_RETURN_IF_ERROR(CheckKnownDigests(dir, files, known));
  std::string text;
  for (const auto& f : files) {
    if (f == kManifestName) continue;
    auto it = known.find(f);
    if (it != known.end()) {
      text += it->second + "  " + f + "\n";
      continue;
    }
    BTX_ASSIGN_OR_RETURN(std::string h, Sha256File(dir + "/" + f));
    text += h + "  " + f + "\n";
  }
  return WriteFileDurable(dir + "/" + kManifestName, text);
}

Status VerifyManifest(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    if (ec && ec != std::errc::no_such_file_or_directory) return Unavailable("cannot look at " + dir + ": " + ec.message());
    return NotFound(dir + ": no such directory");
  }
  const std::string mpath = dir + "/" + kManifestName;
  auto text = ReadFile(mpath, size_t{64} << 20);
  if (!text.ok() && text.status().code() == StatusCode::kNotFound) return DataLoss(dir + ": no " + std::string(kManifestName));
  if (!text.ok() && text.status().code() == StatusCode::kUnavailable) return text.status();
  if (!text.ok()) return DataLoss(dir + ": no readable " + std::string(kManifestName) + " (" + text.status().message() + ")");
  std::map<std::string, std::string> listed;
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line.size() < 67 || line.substr(64, 2) != "  " || !IsSha256Hex(line.substr(0, 64)))
      return DataLoss(mpath + ": malformed line '" + line.substr(0, 80) + "'");
    const std::string rel = line.substr(66);
    if (!SafeRelative(rel)) return DataLoss(mpath + ": path escapes the artifact: '" + rel + "'");
    listed[rel] = line.substr(0, 64);
  }
  BTX_ASSIGN_OR_RETURN(auto files, ListFilesRecursive(dir));
  for (const auto& f : files) {
    if (f == kManifestName) continue;
    if (!listed.count(f)) return DataLoss(dir + ": file '" + f + "' is not in the manifest");
  }
  for (const auto& [f, want] : listed) {
    auto got = Sha256File(dir + "/" + f);
    if (!got.ok() && got.status().code() == StatusCode::kNotFound)
      return DataLoss(dir + ": manifest lists '" + f + "' but it is missing");
    if (!got.ok() && got.status().code() == StatusCode::kUnavailable) return got.status();
    if (!got.ok()) return DataLoss(got.status().message());
    if (*got != want)
      return DataLoss(dir + ": sha256 mismatch for '" + f + "' (manifest " + want + ", file " + *got + ")");
  }
  return Status::Ok();
}

std::string HostName() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0 || buf[0] == '\0') return "unknown-host";
  std::string h(buf);
  for (char& c : h) {
    if (c == '/' || c == '@') c = '_';  // a path component, and '@' ends the pid part
  }
  return h;
}

StatusOr<StagedDir> StagedDir::Create(const std::string& final_dir) {
  fs::path fin = fs::absolute(final_dir).lexically_normal();
  if (fin.filename().empty()) fin = fin.parent_path();
  std::error_code ec;
  if (fs::exists(fin, ec)) return FailedPrecondition(fin.string() + " already exists");
  fs::create_directories(fin.parent_path(), ec);
  if (ec) return Internal("cannot create " + fin.parent_path().string() + ": " + ec.message());
  // Temp dirs of attempts that died (their pid is gone) are garbage; a live one may be a concurrent writer. A pid
  // only means something on the host that wrote it: on a shared filesystem another host's temp dir (named
  // "<pid>-<random>@<host>") is never removed from here, whatever its pid is on this host.
  std::string prefix(".");  // built by appends: GCC 12 warns falsely (-Wrestrict) on "." + std::string
  prefix.append(fin.filename().string()).append(".tmp-");
  std::string host("@");  // built by appends: GCC 12 warns falsely (-Wrestrict) on "@" + std::string
  host += HostName();
  for (auto& e : fs::directory_iterator(fin.parent_path(), ec)) {
    const std::string n = e.path().filename().string();
    if (!n.starts_with(prefix) || !n.ends_with(host)) continue;
    const long pid = std::strtol(n.c_str() + prefix.size(), nullptr, 10);
    if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) fs::remove_all(e.path(), ec);
  }
  std::random_device rd;
  std::string name = prefix;
  name.append(std::to_string(::getpid())).append("-").append(std::to_string(rd() % 1000000)).append(host);
  const std::string tmp = (fin.parent_path() / name).string();
  fs::remove_all(tmp, ec);
  if (!fs::create_directory(tmp, ec)) return Internal("cannot create " + tmp + ": " + ec.message());
  return StagedDir(tmp, fin.string());
}

StagedDir::StagedDir(StagedDir&& o) noexcept : tmp_(std::move(o.tmp_)), final_(std::move(o.final_)), done_(o.done_) {
  o.done_ = true;
}

StagedDir::~StagedDir() {
  if (!done_ && !tmp_.empty()) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

Status StagedDir::Publish(const FileDigests& known) {
  if (done_) return FailedPrecondition("already published: " + final_);
  BTX_RETURN_IF_ERROR(WriteManifest(tmp_, known));
  BTX_ASSIGN_OR_RETURN(auto files, ListFilesRecursive(tmp_));
  for (const auto& f : files) BTX_RETURN_IF_ERROR(FsyncPath(tmp_ + "/" + f));
  BTX_RETURN_IF_ERROR(FsyncPath(tmp_));
  // rename(2) replaces an empty dir silently; refuse explicitly so two attempts never both "win".
  if (fs::exists(final_)) return FailedPrecondition(final_ + " already exists");
  if (::rename(tmp_.c_str(), final_.c_str()) != 0) return Internal(Errno("rename failed to", final_));
  done_ = true;
  return FsyncPath(fs::path(final_).parent_path().string());
}

}  // namespace btx
