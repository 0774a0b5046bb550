// libFuzzer target: pipeline specs are the one input any gRPC client controls completely.
// Beyond "no crash, no UB, no leak" it checks the parser's contract:
//   - ParseSpec never throws; a rejection is INVALID_ARGUMENT whose field violations survive the
//     trip through gRPC rich errors (what btxctl shows the user);
//   - normalisation is idempotent: an accepted spec re-parses from its JSON dump to the same JSON
//     (the scheduler stores the dump, and Retry re-reads it);
//   - PlanJobs on an accepted spec succeeds: every planned job's spec passes btx-train's own parser
//     (contract::ParseJobSpec), so the planner and the contract never disagree;
//   - it gives uniquely named jobs whose dependencies exist and form a DAG, and every
//     {"$artifact": ...} a job reads resolves from its own dependencies alone.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <set>
#include <string>

#include "btx/common/uri.h"
#include "btx/rpc_status.h"
#include "btx/scheduler/plan.h"
#include "btx/scheduler/spec.h"

namespace {
using json = nlohmann::json;

std::string Printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n' || (c >= 0x20 && c < 0x7f)) {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

[[noreturn]] void Violated(const std::string& property, const std::string& input) {
  std::fprintf(stderr, "\nspec_fuzz: property violated: %s\n--- input ---\n%s\n--- end ---\n", property.c_str(),
               Printable(input).c_str());
  std::abort();
}

void CheckRejection(const absl::Status& status, const std::string& input) {
  if (status.code() != absl::StatusCode::kInvalidArgument) Violated("rejection is not INVALID_ARGUMENT", input);
  if (status.message().empty()) Violated("rejection without a message", input);
  if (btx::FieldViolationsOf(btx::ToGrpcStatus(status)).empty()) {
    Violated("rejection's field violations do not decode on the client side", input);
  }
}

void CheckPlan(const json& spec, const std::string& input) {
  const auto planned = btx::scheduler::PlanJobs(spec);
  if (!planned.ok()) {
    Violated("a job planned from an accepted spec fails the contract: " + std::string(planned.status().message()), input);
  }
  const auto& jobs = *planned;
  if (jobs.empty()) Violated("accepted spec plans no jobs", input);
  std::map<std::string, const btx::storage::NewJob*> by_name;
  for (const auto& j : jobs) {
    if (j.name.empty() || !by_name.emplace(j.name, &j).second) Violated("job name empty or repeated: " + j.name, input);
  }
  // Kahn's algorithm over depends_on: every parent exists and there is no cycle.
  std::map<std::string, int> pending;
  std::map<std::string, std::vector<std::string>> children;
  for (const auto& j : jobs) {
    pending[j.name] = static_cast<int>(j.depends_on.size());
    for (const auto& d : j.depends_on) {
      if (!by_name.count(d)) Violated("job " + j.name + " depends on unknown job " + d, input);
      children[d].push_back(j.name);
    }
  }
  std::vector<std::string> ready;
  for (const auto& [name, n] : pending)
    if (n == 0) ready.push_back(name);
  size_t done = 0;
  while (!ready.empty()) {
    std::string n = ready.back();
    ready.pop_back();
    ++done;
    for (const auto& c : children[n])
      if (--pending[c] == 0) ready.push_back(c);
  }
  if (done != jobs.size()) Violated("job dependencies form a cycle", input);

  for (const auto& j : jobs) {
    std::map<std::string, std::string> parents;
    for (const auto& d : j.depends_on) parents[d] = "file:///artifacts/" + btx::SanitizeComponent(d);
    auto resolved = btx::scheduler::ResolveArtifacts(json::parse(j.spec_json), parents);
    if (!resolved.ok()) {
      Violated("job " + j.name + " reads an artifact outside its dependencies: " + std::string(resolved.status().message()),
               input);
    }
  }
}

void Check(const std::string& input) {
  auto spec = btx::scheduler::ParseSpec(input);
  if (!spec.ok()) return CheckRejection(spec.status(), input);

  const std::string dumped = spec->dump();
  auto again = btx::scheduler::ParseSpec(dumped);
  if (!again.ok()) {
    Violated("accepted spec's JSON dump is rejected: " + std::string(again.status().message()) + "\ndump: " + dumped,
             input);
  }
  if (*again != *spec) Violated("normalisation not idempotent:\nfirst:  " + dumped + "\nsecond: " + again->dump(), input);
  CheckPlan(*spec, input);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  try {
    Check(input);
  } catch (const std::exception& e) {
    Violated(std::string("exception escaped: ") + e.what(), input);
  } catch (...) {
    Violated("non-std exception escaped", input);
  }
  return 0;
}
