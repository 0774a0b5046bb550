#include "btx/common/uri.h"

#include <cctype>
#include <vector>

#include "btx/common/strings.h"


namespace btx {
namespace {

absl::Status CheckPathComponents(std::string_view path, std::string_view what) {
  if (path.find('\0') != std::string_view::npos) return absl::InvalidArgumentError(Cat(what, " contains NUL"));
  for (const std::string& part : Split(path, '/')) {
    if (part == "..") {
      return absl::InvalidArgumentError(Cat(what, " '", path, "' contains '..'; expected a path without traversal"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> FileUriToPath(std::string_view uri) {
  constexpr std::string_view kScheme = "file://";
  if (uri.substr(0, kScheme.size()) != kScheme) {
    return absl::InvalidArgumentError(Cat("artifact URI '", uri, "': expected a file:// URI"));
  }
  std::string_view path = uri.substr(kScheme.size());
  if (path.empty() || path[0] != '/') {
    return absl::InvalidArgumentError(Cat("artifact URI '", uri, "': expected an absolute path (file:///...)"));
  }
  if (auto s = CheckPathComponents(path, "artifact URI"); !s.ok()) return s;
  return std::string(path);
}

std::string PathToFileUri(std::string_view absolute_path) { return Cat("file://", absolute_path); }

bool IsSafeComponent(std::string_view name) {
  if (name.empty() || name.size() > 128 || name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string SanitizeComponent(std::string_view name) {
  std::string out;
  for (char c : name) out += (c == '/' ? '-' : c);
  return out;
}

absl::StatusOr<std::string> JoinUnder(std::string_view root, std::string_view relative) {
  if (root.empty() || root[0] != '/') return absl::InvalidArgumentError(Cat("root '", root, "' is not absolute"));
  std::string out(root);
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  for (const std::string& part : Split(relative, '/', true)) {
    if (!IsSafeComponent(part)) {
      return absl::InvalidArgumentError(Cat("path component '", part, "' of '", relative,
                                                     "': expected [A-Za-z0-9._-], not '.' or '..'"));
    }
    out += Cat("/", part);
  }
  return out;
}

bool IsHostPort(std::string_view v) {
  const size_t colon = v.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon > 253) return false;
  for (char c : v.substr(0, colon)) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != ':' && c != '[' && c != ']') return false;
  }
  const std::string_view digits = v.substr(colon + 1);
  if (digits.empty() || digits.size() > 5) return false;
  int port = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    port = port * 10 + (c - '0');
  }
  return port > 0 && port <= 65535;
}

}  // namespace btx
