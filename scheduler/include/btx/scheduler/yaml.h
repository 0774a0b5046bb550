// Untrusted YAML (or JSON) text -> JSON: the first step of every pipeline spec, at submit and in btxctl.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/statusor.h"

namespace btx::scheduler {

// The largest spec the scheduler reads (SpecLimits::max_spec_bytes defaults to it).
inline constexpr size_t kMaxSpecBytes = size_t{1} << 20;

// YAML (a superset of JSON) -> JSON with YAML 1.2 core-schema typing: plain scalars become
// integers, floats, booleans or null, quoted ones stay strings. Hardened for untrusted input:
// rejects more than `max_bytes`, invalid UTF-8 (in the text or decoded from escapes), duplicate
// keys, nesting deeper than 32 and alias expansion beyond 2 * max_bytes. Errors are
// INVALID_ARGUMENT with a one-line message (line and column where the YAML breaks). btxctl uses
// it too, so that what it sends means what the scheduler would have read.
absl::StatusOr<nlohmann::json> YamlToJson(const std::string& text, size_t max_bytes = kMaxSpecBytes);

}  // namespace btx::scheduler
