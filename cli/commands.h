// The btxctl subcommands, over a Client. main.cc parses flags, builds the Client (to --server or to
// the embedded stack) and calls one of these; each returns the exit code, or an error status that
// main prints as one line and maps with ExitCodeFor.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client.h"
#include "output.h"
#include "spec_paths.h"

namespace btx::cli {

class EmbeddedStack;

struct CommandEnv {
  Client* client = nullptr;
  Format format = Format::kTable;
  std::FILE* out = stdout;
  std::FILE* err = stderr;
  bool tty = false;  // stdout is a terminal: live display instead of log lines
  PathContext paths;
};

struct SubmitArgs {
  std::string file;  // "-" = stdin
  std::string idempotency_key;
  bool dry_run = false;
  bool fresh = false;  // run: never re-attach to an unfinished pipeline of the same spec
  // The spec as LoadSpec read it already (main reads it before the embedded stack starts, to size it);
  // null: the command reads `file` itself.
  const RewrittenSpec* loaded = nullptr;
};

// Reads the spec file and makes its paths absolute. Errors name the file.
absl::StatusOr<RewrittenSpec> LoadSpec(const std::string& file, const PathContext& paths);
// The spec's resources.nodes_per_job (the workers each training job spans), or 1 when it is not set
// or not a positive integer (the scheduler's validation reports that).
int SpecNodesPerJob(const RewrittenSpec& spec);

absl::StatusOr<int> Submit(CommandEnv& env, const SubmitArgs& args);
// Submits and follows to the end. With `stack` (the embedded default) its workers run the jobs
// and are drained at the end; Ctrl-C cancels the pipeline first.
absl::StatusOr<int> Run(CommandEnv& env, const SubmitArgs& args, EmbeddedStack* stack);

struct GetArgs {
  std::string what;  // pipelines | jobs | workers
  std::string id;    // optional
  std::string pipeline;
  std::string state;
  std::string name_prefix;
  int limit = 0;  // 0 = the default for the kind
};
absl::StatusOr<int> Get(CommandEnv& env, const GetArgs& args);
absl::StatusOr<int> DescribePipelineCmd(CommandEnv& env, const std::string& ref, int max_events);
absl::StatusOr<int> Watch(CommandEnv& env, const std::string& ref, int64_t after_event_id);
absl::StatusOr<int> Logs(CommandEnv& env, const std::string& job_ref, const std::string& pipeline_ref, bool follow,
                         int64_t after_seq);
absl::StatusOr<int> Cancel(CommandEnv& env, const std::string& ref, const std::string& reason);
absl::StatusOr<int> Retry(CommandEnv& env, const std::string& ref);

// `data prepare`: runs in btx-model-tool (next to btxctl), which links LibTorch and the tokenizers so that
// btxctl need not. Numeric options are forwarded as written, validated by the tool.
struct DataPrepareArgs {
  std::vector<std::string> inputs;
  std::string out, tokenizer, valid_fraction, shard_tokens, seed;  // empty = the tool's default
  std::string format, text_field;                                   // empty = inferred per file / "text"
};
// The one-line bar `data prepare` redraws on a terminal: input bytes done of total, cut to `width` columns.
std::string DataPrepareBar(int64_t done, int64_t total, int width);
absl::StatusOr<int> DataPrepare(CommandEnv& env, const DataPrepareArgs& args);

// "running" / "RUNNING" / "PIPELINE_STATE_RUNNING" -> the enum; errors list the valid names.
absl::StatusOr<v1::PipelineState> ParsePipelineState(const std::string& s);
absl::StatusOr<v1::JobState> ParseJobState(const std::string& s);

}  // namespace btx::cli
