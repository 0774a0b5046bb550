#include "btx/contract/job.h"

#include <array>

namespace btx::contract {
using json = nlohmann::json;
namespace {

constexpr std::array<JobKindInfo, 5> kKinds = {{
    {JobKind::kPretrain, "pretrain", "data files", "a dense model dir (config.json, weights, tokenizer)", "btx-train"},
    {JobKind::kBranch, "branch", "seed", "a dense model dir: the seed trained on one domain", "btx-train"},
    {JobKind::kMerge, "merge", "seed, experts[].model", "an MoE (btx, upcycle) or dense (btm) model dir", "btx-train"},
    {JobKind::kFinetune, "finetune", "model", "the MoE model dir with its router (and more) trained", "btx-train"},
    {JobKind::kEval, "eval", "models[].model, models[].ensemble", "eval.json, eval.txt, routing.svg/png", "btx-train"},
}};

const std::vector<std::string> kJobFileKeys = {"job_id", "attempt",        "pipeline", "name",    "kind",
                                               "output_dir", "checkpoint_dir", "threads",  "device", "spec"};

std::string KindNames() {
  std::string out;
  for (const auto& k : kKinds) out += (out.empty() ? "" : " | ") + std::string(k.name);
  return out;
}

}  // namespace

std::span<const JobKindInfo> JobKinds() { return kKinds; }

const JobKindInfo* FindJobKind(std::string_view name) {
  for (const auto& k : kKinds) {
    if (k.name == name) return &k;
  }
  return nullptr;
}

const JobKindInfo* FindJobKind(int api_number) {
  for (const auto& k : kKinds) {
    if (static_cast<int>(k.kind) == api_number) return &k;
  }
  return nullptr;
}

std::string_view JobKindName(JobKind kind) {
  const JobKindInfo* k = FindJobKind(static_cast<int>(kind));
  return k ? k->name : "unknown";
}

JobSpec ParseJobSpec(Reader& r, JobKind kind, const json& spec, const std::string& path) {
  switch (kind) {
    case JobKind::kPretrain: return ParsePretrain(r, spec, path);
    case JobKind::kBranch: return ParseBranch(r, spec, path);
    case JobKind::kMerge: return ParseMerge(r, spec, path);
    case JobKind::kFinetune: return ParseFinetune(r, spec, path);
    case JobKind::kEval: return ParseEval(r, spec, path);
  }
  r.Fail(path, static_cast<int>(kind), "a known job kind");
  return BranchSpec{};
}

json ToJson(const JobFile& job) {
  return {{"job_id", job.job_id},         {"attempt", job.attempt},
          {"pipeline", job.pipeline},     {"name", job.name},
          {"kind", JobKindName(job.kind)}, {"output_dir", job.output_dir},
          {"checkpoint_dir", job.checkpoint_dir}, {"threads", job.threads},
          {"device", job.device},         {"spec", job.spec}};
}

StatusOr<JobFile> ParseJobFile(const json& j) {
  FieldErrors errors;
  Reader r(errors);
  JobFile job;
  if (!r.Object("", j, kJobFileKeys)) return InvalidArgument(Describe(errors));
  if (j.contains("job_id")) job.job_id = r.String(j, "", "job_id", 128);
  job.attempt = r.Int(j, "", "attempt", 1, 1, 1'000'000);
  if (j.contains("pipeline")) job.pipeline = r.String(j, "", "pipeline", 256);
  if (j.contains("name")) job.name = r.String(j, "", "name", 256);
  const std::string kind = r.Enum(j, "", "kind", "", [] {
    std::vector<std::string> names;
    for (const auto& k : kKinds) names.emplace_back(k.name);
    return names;
  }());
  if (!j.contains("kind")) r.FailMissing("kind", KindNames());
  job.output_dir = r.PathField(j, "", "output_dir", true);
  if (!job.output_dir.empty() && job.output_dir[0] != '/') r.Fail("output_dir", job.output_dir, "an absolute path");
  job.checkpoint_dir = r.PathField(j, "", "checkpoint_dir", false);
  if (!job.checkpoint_dir.empty() && job.checkpoint_dir[0] != '/') {
    r.Fail("checkpoint_dir", job.checkpoint_dir, "an absolute path");
  }
  job.threads = r.Int(j, "", "threads", 0, 0, 4096);
  job.device = r.Enum(j, "", "device", "cpu", {"cpu", "cuda"});
  if (!j.contains("spec") || !j["spec"].is_object()) {
    r.Fail("spec", j.contains("spec") ? j["spec"] : json(), "a mapping");
  } else {
    job.spec = j["spec"];
  }
  if (const JobKindInfo* info = FindJobKind(kind); info != nullptr && r.ok()) {
    job.kind = info->kind;
    job.parsed = ParseJobSpec(r, job.kind, job.spec, "spec");
  }
  if (!r.ok()) return InvalidArgument(Describe(errors));
  return job;
}

StatusOr<JobFile> ParseJobFileText(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return InvalidArgument(std::string("job file is not valid JSON: ") + e.what());
  }
  return ParseJobFile(j);
}

}  // namespace btx::contract
