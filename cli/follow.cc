#include "follow.h"

#include <condition_variable>
#include <mutex>
#include <thread>

#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "output.h"
#include "progress.h"
#include "terminal.h"

namespace btx::cli {

absl::StatusOr<v1::Pipeline> FollowPipeline(Client& client, const std::string& id, const FollowOptions& o) {
  auto snapshot = client.GetPipeline(id);
  if (!snapshot.ok()) return snapshot.status();
  PipelineView view = PipelineView::From(*snapshot);
  view.last_event_id = o.after_event_id;
  std::mutex mu;
  std::condition_variable cv;
  bool dirty = true, done = false;
  uint64_t footer_seen = 0;
  LiveBlock block(o.out);
  auto draw = [&] {  // with mu held
    RenderOptions ro;
    ro.width = TerminalWidth(o.out);
    ro.now = std::chrono::system_clock::now();
    auto lines = RenderProgress(view, ro);
    if (o.footer != nullptr) {
      footer_seen = o.footer->version();
      if (auto text = o.footer->text(); !text.empty()) lines.push_back(text.substr(0, std::max(0, ro.width - 1)));
    }
    block.Draw(lines);
    dirty = false;
  };
  // On a terminal one thread owns the screen: redraws are throttled, and the elapsed clock ticks
  // even when no event arrives.
  std::thread painter;
  if (o.tty) {
    painter = std::thread([&] {
      std::unique_lock lock(mu);
      auto last = std::chrono::steady_clock::now() - std::chrono::hours(1);
      while (!done) {
        const auto now = std::chrono::steady_clock::now();
        if (dirty && now - last >= o.redraw_every) {
          draw();
          last = now;
        }
        cv.wait_for(lock, dirty ? o.redraw_every : std::chrono::milliseconds(1000));
        if (!dirty && std::chrono::steady_clock::now() - last >= std::chrono::seconds(1)) dirty = true;
        if (o.footer != nullptr && o.footer->version() != footer_seen) dirty = true;
      }
    });
  }
  v1::WatchRequest req;
  req.set_pipeline_id(id);
  req.set_after_event_id(o.after_event_id);
  req.set_follow(true);
  absl::Status status = client.Watch(req, [&](const v1::Event& e) {
    std::lock_guard lock(mu);
    if (!view.Apply(e)) return true;
    if (o.tty) {
      dirty = true;
      cv.notify_all();
    } else if (auto line = EventLine(e, view)) {
      std::fputs((*line + "\n").c_str(), o.out);
      std::fflush(o.out);
    }
    return true;
  });
  if (o.on_stream_end) o.on_stream_end();
  absl::StatusOr<v1::Pipeline> final_state = status.ok() ? client.GetPipeline(id) : absl::StatusOr<v1::Pipeline>(status);
  {
    std::lock_guard lock(mu);
    done = true;
    if (o.tty) {
      if (final_state.ok()) {
        // The stored state is the truth; keep what only the stream knew (ETA inputs are moot now).
        PipelineView end = PipelineView::From(*final_state);
        for (auto& j : end.jobs) {
          if (const JobView* seen = view.Find(j.name); seen != nullptr && j.progress.total_steps() == 0) j.progress = seen->progress;
        }
        view = std::move(end);
      }
      draw();
      block.Done();
    }
  }
  cv.notify_all();
  if (painter.joinable()) painter.join();
  return final_state;
}

int ExitCodeForPipeline(const v1::Pipeline& p) { return p.state() == v1::PIPELINE_STATE_SUCCEEDED ? 0 : 1; }

std::string Summary(const v1::Pipeline& p) {
  std::string out;
  const double took = std::chrono::duration<double>(ToTimePoint(p.updated_at()) - ToTimePoint(p.created_at())).count();
  out += Cat("pipeline ", p.name(), " ", StateName(p.state()), " in ", FormatClock(took), " (", p.jobs_succeeded(), "/",
             p.jobs_total(), " jobs succeeded)");
  if (!p.error().empty()) out += ": " + p.error();
  out += "\n";
  if (p.state() == v1::PIPELINE_STATE_SUCCEEDED) {
    // The MoE: the router-finetuned model, or the merge itself for Branch-Train-Merge.
    for (const char* name : {"finetune", "merge"}) {
      const v1::Job* found = nullptr;
      for (const auto& j : p.jobs()) {
        if (j.name() == name && !j.artifact_uri().empty()) found = &j;
      }
      if (found == nullptr) continue;
      auto path = FileUriToPath(found->artifact_uri());
      out += Cat("model: ", path.ok() ? *path : found->artifact_uri(), "\n");
      break;
    }
    if (std::string eval = PipelineEvalTable(p); !eval.empty()) out += "\n" + eval;
  } else {
    for (const auto& j : p.jobs()) {
      if (j.state() != v1::JOB_STATE_FAILED) continue;
      out += Cat("  ", j.name(), " failed after attempt ", j.attempt(), ": ", j.error(), "\n");
      out += Cat("  see its log: btxctl logs ", j.id(), "\n");
    }
  }
  return out;
}

}  // namespace btx::cli
