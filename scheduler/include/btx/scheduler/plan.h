// A validated pipeline spec (ParseSpec) -> its job DAG, and a job's arguments at lease time.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/storage/records.h"

namespace btx::scheduler {

// Turns a spec that ParseSpec returned into jobs. Job arguments that depend on a parent's output
// hold {"$artifact": "<parent job name>"}, resolved to a path when the job is leased. Every job's
// spec is then read with the trainer's own parser (contract::ParseJobSpec), so what submit accepts
// btx-train runs as written; a job it refuses is INVALID_ARGUMENT naming "jobs[<job>].spec.<field>"
// (the planner and the contract disagree: never for a spec ParseSpec accepted).
absl::StatusOr<std::vector<storage::NewJob>> PlanJobs(const nlohmann::json& spec);

// Replaces every {"$artifact": name} in a job's spec with the parent's artifact path.
absl::StatusOr<nlohmann::json> ResolveArtifacts(const nlohmann::json& spec,
                                                const std::map<std::string, std::string>& parent_artifacts);

}  // namespace btx::scheduler
