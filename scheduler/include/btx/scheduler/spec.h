// Pipeline specs: YAML or JSON text -> a validated, normalised pipeline spec. The sections a job reads
// as they are (`train`, `seed.init`, `tokenizer`, data) go through the job contract's own parsers
// (btx/contract/specs.h), so each has one definition; the pipeline's own sections are checked here.
// Every error names the field path, the bad value and what was expected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/statusor.h"
#include "btx/scheduler/yaml.h"

namespace btx::scheduler {

// An operator's limits, checked in addition to the contract's own bounds.
struct SpecLimits {
  size_t max_spec_bytes = kMaxSpecBytes;
  int max_experts = 64;
  int max_data_paths = 1024;
  int64_t max_steps = 10'000'000;
  int max_attempts = 20;
};

// Parses YAML (a superset of JSON) and validates; returns the normalised spec with every default
// filled in (re-parsing its JSON dump gives it back unchanged). Errors are INVALID_ARGUMENT with
// google.rpc.BadRequest field violations.
absl::StatusOr<nlohmann::json> ParseSpec(const std::string& text, const SpecLimits& limits = {});

}  // namespace btx::scheduler
