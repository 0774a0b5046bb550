// Following a pipeline to its end: the live display on a terminal, a plain log otherwise, and the
// closing summary (outcome, final model, evaluation table).
#pragma once

#include <cstdio>
#include <functional>
#include <mutex>
#include <utility>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "btx/v1/types.pb.h"
#include "client.h"

namespace btx::cli {

// A line shown under the live display (set from any thread, e.g. the signal thread): on a
// terminal, printing it directly would tear the block that is redrawn in place.
class Footer {
 public:
  void Set(std::string text) {
    std::lock_guard lock(mu_);
    text_ = std::move(text);
    ++version_;
  }
  std::string text() {
    std::lock_guard lock(mu_);
    return text_;
  }
  uint64_t version() {
    std::lock_guard lock(mu_);
    return version_;
  }

 private:
  std::mutex mu_;
  std::string text_;
  uint64_t version_ = 0;
};

struct FollowOptions {
  bool tty = false;                                    // redraw in place (else one line per change)
  std::FILE* out = stdout;
  int64_t after_event_id = 0;                          // resume a watch after this event
  Duration redraw_every = std::chrono::milliseconds(200);  // at most this often on a terminal
  Footer* footer = nullptr;                            // optional line under the display
  // Runs when the stream has ended, before the final state is read (run drains its local
  // workers here, so that the last frame shows the interrupted jobs stopped).
  std::function<void()> on_stream_end;
};

// Streams the pipeline's events until it is terminal; returns the final pipeline (with its jobs).
// CANCELLED status when interrupted (Client::CancelAll).
absl::StatusOr<v1::Pipeline> FollowPipeline(Client& client, const std::string& pipeline_id, const FollowOptions& options);

// What `run` and `watch` print at the end: the outcome line, the final model, the evaluation table
// and, for a failure, which jobs failed and how to see their logs.
std::string Summary(const v1::Pipeline& pipeline);

// 0 for SUCCEEDED, 1 for FAILED or CANCELLED, 1 for a pipeline that is somehow not terminal.
int ExitCodeForPipeline(const v1::Pipeline& pipeline);

}  // namespace btx::cli
