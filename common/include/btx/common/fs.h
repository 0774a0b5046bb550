// File helpers with the durability rules of the project: atomic replace = temp file, fsync,
// rename, fsync of the directory.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace btx {

absl::Status WriteFileAtomic(const std::string& path, std::string_view contents);
absl::StatusOr<std::string> ReadFile(const std::string& path, size_t max_bytes = size_t{1} << 30);
absl::Status FsyncDir(const std::string& dir);
// mkdtemp under $TMPDIR (or /tmp) with the given prefix.
absl::StatusOr<std::string> MakeTempDir(std::string_view prefix);

}  // namespace btx
