// Where job outputs live. Artifacts are directories published atomically with a sha256 manifest
// (`manifest.sha256`: btx::WriteManifest / VerifyManifest of the job contract, btx/contract/files.h,
// the same code btx-train publishes with) and verified whenever they are fetched. Only file:// (a
// shared filesystem) is implemented.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace btx {

class ArtifactStore {
 public:
  virtual ~ArtifactStore() = default;
  // Makes the finished directory `local_dir` visible as artifact `name` (slash-separated safe
  // components) all at once; `local_dir` is consumed. Fails if the name is taken. Returns its URI.
  virtual absl::StatusOr<std::string> Publish(const std::string& local_dir, std::string_view name) = 0;
  // Verifies the artifact against its manifest and returns a local directory to read it from.
  virtual absl::StatusOr<std::string> Fetch(std::string_view uri) = 0;
  virtual absl::Status Remove(std::string_view uri) = 0;
  // URI an artifact named `name` has or will have.
  virtual absl::StatusOr<std::string> UriFor(std::string_view name) const = 0;
};

class FileArtifactStore final : public ArtifactStore {
 public:
  explicit FileArtifactStore(std::string root);  // absolute path
  absl::StatusOr<std::string> Publish(const std::string& local_dir, std::string_view name) override;
  absl::StatusOr<std::string> Fetch(std::string_view uri) override;
  absl::Status Remove(std::string_view uri) override;
  absl::StatusOr<std::string> UriFor(std::string_view name) const override;

  // The local path of a file:// URI that lies inside the root; INVALID_ARGUMENT otherwise.
  absl::StatusOr<std::string> PathOf(std::string_view uri) const;

 private:
  std::string root_;
};

}  // namespace btx
