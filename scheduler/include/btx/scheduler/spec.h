// Pipeline specs: YAML or JSON text -> validated, normalised JSON -> a job DAG.
// Every validation error names the field path, the bad value and what was expected.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/storage/records.h"

namespace btx::scheduler {

struct SpecLimits {
  size_t max_spec_bytes = 1 << 20;
  int max_experts = 64;
  int max_data_paths = 1024;
  int64_t max_steps = 10'000'000;
  int max_attempts = 20;
};

// Parses YAML (a superset of JSON) and validates; returns the normalised spec with defaults filled in.
// Errors are INVALID_ARGUMENT with google.rpc.BadRequest field violations.
absl::StatusOr<nlohmann::json> ParseSpec(const std::string& text, const SpecLimits& limits = {});

// Turns a validated spec into jobs. Job arguments that depend on a parent's output hold
// {"$artifact": "<parent job name>"}, resolved to a URI when the job is leased.
std::vector<storage::NewJob> PlanJobs(const nlohmann::json& spec);

// Replaces every {"$artifact": name} in a job's spec with the parent's artifact URI.
absl::StatusOr<nlohmann::json> ResolveArtifacts(const nlohmann::json& spec,
                                                const std::map<std::string, std::string>& parent_artifacts);

}  // namespace btx::scheduler
