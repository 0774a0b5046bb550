// Live progress of a pipeline: a view folded from the Get snapshot and the Watch event stream, and
// two renderings of it — a multi-line block redrawn in place on a terminal, and one plain log line
// per change otherwise. Both are pure functions (no clock reads, no I/O) so they are unit-tested.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "btx/common/clock.h"
#include "btx/v1/types.pb.h"

namespace btx::cli {

struct JobView {
  std::string id, name;
  v1::JobKind kind = v1::JOB_KIND_UNSPECIFIED;
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
  int attempt = 0, max_attempts = 0;
  v1::Progress progress;
  std::string message;                 // the last failure, or where the artifact went
  // The first progress of the current attempt: the step rate is measured from there, so start-up
  // (loading, tokenizing) and the step an attempt resumed from do not skew the ETA.
  std::optional<TimePoint> rate_since;
  int64_t rate_since_step = 0;
  std::optional<TimePoint> progress_at;
  // The last progress that came from the stream (the snapshot's may be newer than a replay).
  std::optional<v1::Progress> streamed;
};

struct PipelineView {
  std::string id, name, error;
  v1::PipelineState state = v1::PIPELINE_STATE_UNSPECIFIED;
  TimePoint created_at{};
  std::optional<TimePoint> finished_at;
  std::vector<JobView> jobs;  // in the scheduler's order (planning priority, then name)
  int64_t last_event_id = 0;

  static PipelineView From(const v1::Pipeline& pipeline);
  // Folds one event in; returns whether anything the display shows changed.
  bool Apply(const v1::Event& event);
  JobView* Find(const std::string& name);
  int succeeded() const;
};

// Seconds to the end of the job: the worker's estimate when it sent one, else from the step rate
// observed since the attempt's first progress report. Negative when unknown.
double EtaSeconds(const JobView& job);

struct RenderOptions {
  int width = 100;  // columns; lines are cut to width - 1 so that nothing wraps
  TimePoint now{};  // for "elapsed"
};

// The block redrawn on a terminal: a header line, then one line per job.
std::vector<std::string> RenderProgress(const PipelineView& view, const RenderOptions& options);

// The plain log line for an event (after Apply), or nothing for an event not worth a line.
// Prefixed with the time since the pipeline was created: "[1:23] branch/code step 40/150 ...".
std::optional<std::string> EventLine(const v1::Event& event, const PipelineView& view);

}  // namespace btx::cli
