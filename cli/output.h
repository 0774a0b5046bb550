// Renderers for btxctl's output: tables for people, JSON/YAML for scripts. Pure functions of the
// API messages (and of `now` where ages are shown), so their output is pinned by golden tests.
#pragma once

#include <google/protobuf/message.h>

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "btx/common/clock.h"
#include "btx/v1/pipeline_service.pb.h"
#include "btx/v1/types.pb.h"

namespace btx::cli {

enum class Format { kTable, kJson, kYaml };
absl::StatusOr<Format> ParseFormat(const std::string& name);

// The proto3 JSON mapping with the .proto field names, every field present, and the JSON-in-a-string
// fields (spec, spec_json, result_json) inlined as JSON values.
nlohmann::json ToJson(const google::protobuf::Message& message);
std::string EmitJson(const nlohmann::json& value);  // pretty, ends with a newline
std::string EmitYaml(const nlohmann::json& value);  // block style, ends with a newline
std::string Emit(Format format, const nlohmann::json& value);

// Left-aligned columns two spaces apart (right-aligned where `right` names the column index);
// trailing spaces trimmed.
std::string RenderTable(const std::vector<std::string>& headers, const std::vector<std::vector<std::string>>& rows,
                        const std::set<size_t>& right = {});

// Short names used in tables: RUNNING, LEASED, branch, ...
std::string StateName(v1::PipelineState s);
std::string StateName(v1::JobState s);
std::string StateName(v1::WorkerState s);
std::string KindName(v1::JobKind k);
bool IsTerminal(v1::PipelineState s);
bool IsTerminal(v1::JobState s);

// "45s", "12m", "3h", "2d".
std::string FormatAge(Duration d);
// "0:42", "1:02:03"; "-" for negative.
std::string FormatClock(double seconds);
// 5120.5 -> "5.1k", 12 -> "12", 3.2e6 -> "3.2M".
std::string FormatRate(double per_second);
// "2024-05-01 12:00:03Z"
std::string FormatTime(const google::protobuf::Timestamp& t);
TimePoint ToTimePoint(const google::protobuf::Timestamp& t);

std::string PipelinesTable(const std::vector<v1::Pipeline>& pipelines, TimePoint now);
std::string JobsTable(const std::vector<v1::Job>& jobs, bool with_pipeline);
std::string WorkersTable(const std::vector<v1::Worker>& workers, TimePoint now);
// A job's resources for people: "2 nodes x 2 ranks (2 GPUs per node)", "2 nodes x 4 ranks (CPU)".
std::string GangResources(const v1::Resources& resources);
// A gang job (resources.nodes > 1) for `describe`: a line with its name, resources and state, then
// (indented) one line per member while LEASED ("node 0: worker-a (lease 12s left)", "(not yet picked
// up)" while the member has not received its assignment) and the rendezvous, or the scheduler's
// pending_reason while READY or RETRY_WAIT ("waiting for 2 workers: ...", or "waiting: REASON" when it
// does not start with "waiting"). Empty for a single-node job.
std::vector<std::string> GangLines(const v1::Job& job, TimePoint now);
// The planned jobs of a dry run.
std::string PlanTable(const v1::Pipeline& planned);

// eval.json (docs/btx-train-protocol.md "eval"): models x domains validation loss plus the average;
// the lowest loss of each column is starred. `order` lists model names to show first (the eval
// job's own order). Empty string when `eval` does not look like an evaluation result.
std::string EvalTable(const nlohmann::json& eval, const std::vector<std::string>& order = {});
// The eval job of a pipeline (if it has a result) rendered with EvalTable, with a title line.
std::string PipelineEvalTable(const v1::Pipeline& pipeline);

// `describe pipeline`: summary, jobs, metrics, evaluation, errors and the latest events (progress
// events left out; `max_events` newest).
std::string DescribePipeline(const v1::Pipeline& pipeline, const std::vector<v1::Event>& events, TimePoint now,
                             size_t max_events = 25);

}  // namespace btx::cli
