// File helpers with the durability rules of the project: atomic replace = temp file, fsync,
// rename, fsync of the directory.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "btx/common/status.h"
#include "btx/contract/files.h"  // ReadFile, manifests

namespace btx {

absl::Status WriteFileAtomic(const std::string& path, std::string_view contents);
absl::Status FsyncDir(const std::string& dir);
// mkdtemp under $TMPDIR (or /tmp) with the given prefix.
absl::StatusOr<std::string> MakeTempDir(std::string_view prefix);

}  // namespace btx
