// Artifact URIs. Only file:// is implemented; every path is checked so that no name or URI can
// escape the artifact root.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace btx {

// "file:///abs/path" -> "/abs/path". Rejects other schemes, relative paths, "..", NUL and empty.
absl::StatusOr<std::string> FileUriToPath(std::string_view uri);
std::string PathToFileUri(std::string_view absolute_path);

// A name usable as one path component: [A-Za-z0-9._-], not "." or "..", 1..128 chars.
bool IsSafeComponent(std::string_view name);
// "branch/code" -> "branch-code": job names become directory names.
std::string SanitizeComponent(std::string_view name);

// Joins root and relative components after checking each; fails on traversal.
absl::StatusOr<std::string> JoinUnder(std::string_view root, std::string_view relative);

// "host:port" as btx-train reads BTX_RENDEZVOUS (the last colon splits, so an IPv6 host may stand
// unbracketed): a host of [A-Za-z0-9.-:[]] up to 253 characters and a port in 1..65535.
bool IsHostPort(std::string_view v);

}  // namespace btx
