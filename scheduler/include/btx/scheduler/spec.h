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

// YAML (a superset of JSON) -> JSON with YAML 1.2 core-schema typing: plain scalars become
// integers, floats, booleans or null, quoted ones stay strings. Hardened for untrusted input:
// rejects more than `max_bytes`, invalid UTF-8 (in the text or decoded from escapes), duplicate
// keys, nesting deeper than 32 and alias expansion beyond 2 * max_bytes. Errors are
// INVALID_ARGUMENT with a one-line message (line and column where the YAML breaks). btxctl uses
// it too, so that what it sends means what the scheduler would have read.
absl::StatusOr<nlohmann::json> YamlToJson(const std::string& text, size_t max_bytes = SpecLimits{}.max_spec_bytes);

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
