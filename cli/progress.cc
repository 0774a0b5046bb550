#include "progress.h"

#include <algorithm>
#include <cstdio>

#include "btx/common/strings.h"
#include "output.h"

namespace btx::cli {
namespace {

std::string Loss(double v) {
  if (!(v > 0)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", v);
  return buf;
}

std::string Bar(const v1::Progress& p, v1::JobState state, int cells) {
  double frac = 0;
  if (state == v1::JOB_STATE_SUCCEEDED) frac = 1;
  else if (p.total_steps() > 0) frac = std::clamp(static_cast<double>(p.step()) / p.total_steps(), 0.0, 1.0);
  else return "";
  const int full = static_cast<int>(frac * cells + 1e-9);
  char pct[8];
  std::snprintf(pct, sizeof(pct), "%3d%%", static_cast<int>(frac * 100 + 1e-9));
  return Cat("[", std::string(full, '#'), std::string(cells - full, '.'), "] ", pct);
}

double Seconds(TimePoint a, TimePoint b) { return std::chrono::duration<double>(b - a).count(); }

}  // namespace

PipelineView PipelineView::From(const v1::Pipeline& p) {
  PipelineView v;
  v.id = p.id();
  v.name = p.name();
  v.state = p.state();
  v.error = p.error();
  v.created_at = ToTimePoint(p.created_at());
  if (IsTerminal(p.state())) v.finished_at = ToTimePoint(p.updated_at());
  for (const auto& j : p.jobs()) {
    JobView jv;
    jv.id = j.id();
    jv.name = j.name();
    jv.kind = j.kind();
    jv.state = j.state();
    jv.attempt = j.attempt();
    jv.max_attempts = j.max_attempts();
    jv.progress = j.progress();
    jv.message = j.error();
    v.jobs.push_back(std::move(jv));
  }
  return v;
}

JobView* PipelineView::Find(const std::string& name) {
  for (auto& j : jobs) {
    if (j.name == name) return &j;
  }
  return nullptr;
}

int PipelineView::succeeded() const {
  return static_cast<int>(std::count_if(jobs.begin(), jobs.end(), [](const JobView& j) { return j.state == v1::JOB_STATE_SUCCEEDED; }));
}

bool PipelineView::Apply(const v1::Event& e) {
  if (e.id() <= last_event_id) return false;  // a resumed stream may repeat nothing, but be safe
  last_event_id = e.id();
  const TimePoint t = ToTimePoint(e.time());
  const std::string& type = e.type();
  if (type.rfind("pipeline.", 0) == 0) {
    if (e.pipeline_state() != v1::PIPELINE_STATE_UNSPECIFIED) state = e.pipeline_state();
    if (type == "pipeline.succeeded" || type == "pipeline.failed" || type == "pipeline.cancelled") {
      finished_at = t;
      if (type != "pipeline.succeeded" && !e.message().empty()) error = e.message();
    } else if (type == "pipeline.retried") {
      finished_at.reset();
      state = v1::PIPELINE_STATE_RUNNING;
      error.clear();
    }
    return true;
  }
  if (e.job_name().empty()) return false;
  JobView* j = Find(e.job_name());
  if (j == nullptr) {
    jobs.emplace_back();
    j = &jobs.back();
    j->id = e.job_id();
    j->name = e.job_name();
  }
  if (e.job_state() != v1::JOB_STATE_UNSPECIFIED) j->state = e.job_state();
  if (e.attempt() > 0) j->attempt = e.attempt();
  if (type == "job.leased") {
    j->rate_since.reset();
    j->progress_at.reset();
    j->message.clear();
  } else if (type == "job.progress") {
    const auto& p = e.progress();
    // Heartbeats repeat the last progress until the trainer reports again; merge and eval have
    // no steps at all. Neither is a change worth a line or a redraw.
    const auto& q = j->streamed;
    const bool same = q && p.step() == q->step() && p.total_steps() == q->total_steps() && p.loss() == q->loss() &&
                      p.tokens() == q->tokens();
    if (same || (p.step() == 0 && p.total_steps() == 0)) return false;
    j->streamed = p;
    if (!j->rate_since) {
      j->rate_since = t;
      j->rate_since_step = p.step();
    }
    j->progress = e.progress();
    j->progress_at = t;
  } else if (type == "job.succeeded") {
    if (j->progress.total_steps() > 0) j->progress.set_step(j->progress.total_steps());
    j->progress.set_eta_seconds(0);
    j->message = e.message();
  } else if (type == "job.failed" || type == "job.retry_wait" || type == "job.lease_expired" || type == "job.cancelled") {
    j->message = e.message();
    j->progress.set_tokens_per_second(0);
  } else if (type == "job.checkpoint") {
    return false;  // nothing on screen changes
  }
  return true;
}

double EtaSeconds(const JobView& j) {
  if (j.state != v1::JOB_STATE_LEASED) return -1;
  const auto& p = j.progress;
  if (p.eta_seconds() > 0) return p.eta_seconds();
  if (p.total_steps() <= 0 || !j.rate_since || !j.progress_at) return -1;
  const int64_t done = p.step() - j.rate_since_step;
  const double elapsed = Seconds(*j.rate_since, *j.progress_at);
  if (done <= 0 || elapsed <= 0) return -1;
  return (p.total_steps() - p.step()) * elapsed / done;
}

std::vector<std::string> RenderProgress(const PipelineView& v, const RenderOptions& o) {
  const TimePoint end = v.finished_at ? *v.finished_at : o.now;
  std::vector<std::string> lines;
  lines.push_back(Cat(v.name, " (", v.id.substr(0, 8), ")  ", StateName(v.state), "  ", v.succeeded(), "/", v.jobs.size(),
                      " jobs done  elapsed ", FormatClock(std::max(0.0, Seconds(v.created_at, end)))));
  std::vector<std::vector<std::string>> rows;
  for (const auto& j : v.jobs) {
    const bool started = j.attempt > 0;
    const bool live = j.state == v1::JOB_STATE_LEASED;
    const auto& p = j.progress;
    std::string note;
    if (!j.message.empty() && (j.state == v1::JOB_STATE_FAILED || j.state == v1::JOB_STATE_RETRY_WAIT ||
                               j.state == v1::JOB_STATE_CANCELLED)) {
      note = j.message;
    }
    rows.push_back({j.name, StateName(j.state), started ? Cat(j.attempt, "/", j.max_attempts) : "-",
                    p.total_steps() > 0 ? Cat(p.step(), "/", p.total_steps()) : "-", Bar(p, j.state, 10),
                    Loss(p.loss()), live ? FormatRate(p.tokens_per_second()) : "-", FormatClock(EtaSeconds(j)), note});
  }
  const std::string table = RenderTable({"JOB", "STATE", "ATTEMPT", "STEP", "PROGRESS", "LOSS", "TOK/S", "ETA", ""}, rows);
  for (const auto& l : Split(table, '\n', true)) lines.push_back("  " + l);
  const size_t max = o.width > 1 ? static_cast<size_t>(o.width - 1) : 0;
  for (auto& l : lines) {
    if (max > 0 && l.size() > max) l = l.substr(0, max);
  }
  return lines;
}

std::optional<std::string> EventLine(const v1::Event& e, const PipelineView& v) {
  const std::string prefix = Cat("[", FormatClock(std::max(0.0, Seconds(v.created_at, ToTimePoint(e.time())))), "] ");
  const std::string& type = e.type();
  const std::string suffix = e.message().empty() ? "" : ": " + e.message();
  if (type == "pipeline.submitted") return Cat(prefix, "pipeline ", v.name, " (", v.id, ") submitted, ", v.jobs.size(), " jobs");
  if (type.rfind("pipeline.", 0) == 0) {
    std::string state = type.substr(9);
    for (char& c : state) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return Cat(prefix, "pipeline ", v.name, " ", state, type == "pipeline.succeeded" ? "" : suffix);
  }
  const std::string job = e.job_name().empty() ? e.job_id() : e.job_name();
  if (type == "job.progress") {
    const auto& p = e.progress();
    const JobView* j = nullptr;
    for (const auto& jv : v.jobs) {
      if (jv.name == e.job_name()) j = &jv;
    }
    std::string line = Cat(prefix, job, " step ", p.step(), "/", p.total_steps(), " loss ", Loss(p.loss()), " tok/s ",
                           FormatRate(p.tokens_per_second()));
    if (j != nullptr) {
      const double eta = EtaSeconds(*j);
      if (eta >= 0) line += " ETA " + FormatClock(eta);
    }
    return line;
  }
  if (type == "job.leased") return Cat(prefix, job, " LEASED attempt ", e.attempt());
  if (type == "job.checkpoint") return Cat(prefix, job, " checkpoint", suffix);
  if (type == "job.succeeded") return Cat(prefix, job, " SUCCEEDED", suffix);
  if (type == "job.ready") return Cat(prefix, job, " READY");
  if (type == "job.retry_wait") return Cat(prefix, job, " RETRY_WAIT after attempt ", e.attempt(), suffix);
  if (type == "job.failed") return Cat(prefix, job, " FAILED attempt ", e.attempt(), suffix);
  if (type == "job.cancelled") return Cat(prefix, job, " CANCELLED", suffix);
  if (type == "job.lease_expired") return Cat(prefix, job, " LEASE EXPIRED attempt ", e.attempt(), suffix);
  return Cat(prefix, job.empty() ? "" : job + " ", type, suffix);
}

}  // namespace btx::cli
