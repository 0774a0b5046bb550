#include "input_check.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "btx/contract/inputs.h"
#include "btx/contract/job.h"
#include "btx/rpc_status.h"

namespace btx::scheduler {
namespace fs = std::filesystem;
using absl::StrCat;

absl::Status CheckJobInputs(const std::vector<storage::NewJob>& jobs, const std::vector<std::string>& data_roots) {
  std::vector<FieldViolation> violations;
  // Baselines and the main line read the same seed and data: report each path once.
  std::set<std::string> seen;
  for (const auto& job : jobs) {
    const contract::JobKindInfo* info = contract::FindJobKind(job.kind);
    if (info == nullptr) continue;  // the planner only writes known kinds
    const auto spec = nlohmann::json::parse(job.spec_json, nullptr, false);
    contract::FieldErrors errors;
    contract::Reader reader(errors, /*allow_artifact_refs=*/true);
    const contract::JobSpec parsed = contract::ParseJobSpec(reader, info->kind, spec, "");
    if (!errors.empty()) continue;  // planning already reported these
    for (const contract::Input& in : contract::InputsOf(parsed)) {
      if (!seen.insert(in.path).second) continue;
      const std::string field = StrCat("jobs[", job.name, "].spec.", in.field);
      if (auto why = contract::CheckUnderRoots(in.path, data_roots)) {
        violations.push_back({field, StrCat("'", in.path, "' is ", *why)});
      } else if (auto bad = contract::CheckInput(in)) {
        violations.push_back({field, StrCat("'", in.path, "': ", *bad)});
      }
    }
  }
  if (violations.empty()) return absl::OkStatus();
  return InvalidFields(violations);
}

absl::StatusOr<std::vector<std::string>> NormaliseDataRoots(const std::vector<std::string>& roots) {
  std::vector<std::string> out;
  for (const auto& r : roots) {
    const fs::path p(r);
    if (r.empty() || !p.is_absolute()) {
      return absl::InvalidArgumentError(StrCat("--data-root '", r, "': expected an absolute directory"));
    }
    std::error_code ec;
    // Resolved, so that a path under a symlinked root compares with where it really is.
    fs::path resolved = fs::weakly_canonical(p, ec);
    if (ec) return absl::InvalidArgumentError(StrCat("--data-root '", r, "': ", ec.message()));
    resolved = resolved.lexically_normal();
    // "/srv/data/" would otherwise keep an empty last element that no path below it shares.
    if (!resolved.has_filename() && resolved != resolved.root_path()) resolved = resolved.parent_path();
    out.push_back(resolved.string());
  }
  return out;
}

}  // namespace btx::scheduler
