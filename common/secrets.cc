#include "btx/common/secrets.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "btx/common/strings.h"

extern char** environ;

namespace btx {

const std::vector<std::string>& CredentialEnvironmentVariables() {
  static const std::vector<std::string> names = {"BTX_WORKER_TOKEN", "BTX_TOKEN", "BTX_DATABASE_URL", "PGPASSWORD"};
  return names;
}

std::optional<std::string> TakeSecretFromEnvironment(const char* name) {
  const size_t n = std::strlen(name);
  std::optional<std::string> value;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    if (std::strncmp(*e, name, n) != 0 || (*e)[n] != '=') continue;
    char* v = *e + n + 1;
    if (!value) value = std::string(v);  // getenv's answer: the first entry
    // Where a process's initial environment lies, /proc/<pid>/environ reads it; unsetenv only drops
    // the pointer to it.
    std::memset(v, 0, std::strlen(v));
  }
  ::unsetenv(name);
  if (value && value->empty()) value.reset();
  return value;
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path, std::string* warning) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return absl::NotFoundError(Cat("cannot read the token file ", path, ": ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(Cat("token file ", path, ": not a regular file"));
  }
  std::string text;
  char buf[4096];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      return absl::UnavailableError(Cat("cannot read the token file ", path, ": ", std::strerror(err)));
    }
    if (r == 0) break;
    text.append(buf, static_cast<size_t>(r));
    if (text.size() > 65536) {
      ::close(fd);
      return absl::InvalidArgumentError(Cat("token file ", path, ": larger than 64 KiB; expected one token"));
    }
  }
  ::close(fd);
  auto blank = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  size_t begin = 0, end = text.size();
  while (begin < end && blank(text[begin])) ++begin;
  while (end > begin && blank(text[end - 1])) --end;
  std::string token = text.substr(begin, end - begin);
  if (token.empty()) return absl::InvalidArgumentError(Cat("token file ", path, " is empty"));
  for (char c : token) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) {
      return absl::InvalidArgumentError(
          Cat("token file ", path, ": expected one token on one line, without blanks or control characters"));
    }
  }
  if (warning != nullptr) {
    warning->clear();
    if ((st.st_mode & 077) != 0) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
      *warning = Cat("token file ", path, " is accessible to users other than its owner (mode ", mode, "): chmod 600 it");
    }
  }
  return token;
}

}  // namespace btx
