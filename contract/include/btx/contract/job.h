// The job contract between the worker and btx-train (docs/btx-train-protocol.md): the table of job kinds,
// JOB.json, the exit codes, and the parser every planned job's spec goes through (at submit and in btx-train).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <variant>

#include "btx/contract/fields.h"
#include "btx/contract/specs.h"
#include "btx/contract/status.h"

namespace btx::contract {

// The numbers are the btx.v1.JobKind values of the public API.
enum class JobKind { kPretrain = 1, kBranch = 2, kMerge = 3, kFinetune = 4, kEval = 5 };

struct JobKindInfo {
  JobKind kind;
  std::string_view name;       // in JOB.json, the database, metric labels and the API's lower-case names
  std::string_view reads;      // the spec fields that name model dirs it loads (each verified first)
  std::string_view publishes;  // what its output_dir holds
  std::string_view runner;     // the program that runs it
};
// Every job kind, in pipeline order. Adding one: docs/architecture.md, "Adding a job kind".
std::span<const JobKindInfo> JobKinds();
const JobKindInfo* FindJobKind(std::string_view name);
const JobKindInfo* FindJobKind(int api_number);
std::string_view JobKindName(JobKind kind);

// btx-train's exit codes.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;        // retried up to max_attempts
inline constexpr int kExitInvalidJob = 65;   // the job's input is wrong: not retried
inline constexpr int kExitInterrupted = 75;  // stopped (SIGTERM), resumable: retried

using JobSpec = std::variant<PretrainSpec, BranchSpec, MergeSpec, FinetuneSpec, EvalSpec>;
// Parses a spec of `kind` (errors under `path`, e.g. "spec.train.lr").
JobSpec ParseJobSpec(Reader& r, JobKind kind, const nlohmann::json& spec, const std::string& path);

// JOB.json: written by the worker, read by btx-train.
struct JobFile {
  std::string job_id;
  int64_t attempt = 1;
  std::string pipeline;
  std::string name;  // the job's name in its pipeline, e.g. "branch/code"
  JobKind kind = JobKind::kBranch;
  std::string output_dir;      // absolute; must not exist yet (published atomically)
  std::string checkpoint_dir;  // absolute; shared by all attempts (may be empty: no checkpoints)
  int64_t threads = 0;         // CPU threads (0 = LibTorch's default); spec.train.threads wins when set
  // "cpu", or "cuda": every device the worker made visible (CUDA_VISIBLE_DEVICES) belongs to this job.
  std::string device = "cpu";
  nlohmann::json spec = nlohmann::json::object();
  // Filled by ParseJobFile: `spec` as its kind's parser read it (not written by ToJson).
  JobSpec parsed;
};
nlohmann::json ToJson(const JobFile& job);
// Strict: unknown keys and a spec its kind's parser refuses are InvalidArgument naming the field.
StatusOr<JobFile> ParseJobFile(const nlohmann::json& j);
StatusOr<JobFile> ParseJobFileText(const std::string& text);

}  // namespace btx::contract
