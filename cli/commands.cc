#include "commands.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <mutex>

#include "btx/common/fs.h"
#include "btx/common/process.h"
#include "btx/common/strings.h"
#include "embedded.h"
#include "exit_codes.h"
#include "follow.h"
#include "signals.h"
#include "terminal.h"

namespace btx::cli {
using json = nlohmann::json;
namespace {

void Print(std::FILE* f, const std::string& s) {
  std::fwrite(s.data(), 1, s.size(), f);
  std::fflush(f);
}

std::string Upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

json JsonArray(const auto& messages) {
  json arr = json::array();
  for (const auto& m : messages) arr.push_back(ToJson(m));
  return arr;
}

// Streams as JSON lines (one compact object per line) for -o json, YAML documents for -o yaml.
void PrintStreamItem(const CommandEnv& env, const google::protobuf::Message& m) {
  if (env.format == Format::kYaml) Print(env.out, "---\n" + EmitYaml(ToJson(m)));
  else Print(env.out, ToJson(m).dump() + "\n");
}

}  // namespace

absl::StatusOr<v1::PipelineState> ParsePipelineState(const std::string& s) {
  std::string name = Upper(s);
  if (name.rfind("PIPELINE_STATE_", 0) != 0) name = "PIPELINE_STATE_" + name;
  v1::PipelineState st;
  if (!v1::PipelineState_Parse(name, &st) || st == v1::PIPELINE_STATE_UNSPECIFIED) {
    return absl::InvalidArgumentError(Cat("--state ", s, ": expected running, succeeded, failed or cancelled"));
  }
  return st;
}

absl::StatusOr<v1::JobState> ParseJobState(const std::string& s) {
  std::string name = Upper(s);
  if (name.rfind("JOB_STATE_", 0) != 0) name = "JOB_STATE_" + name;
  v1::JobState st;
  if (!v1::JobState_Parse(name, &st) || st == v1::JOB_STATE_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        Cat("--state ", s, ": expected pending, ready, leased, succeeded, retry_wait, failed or cancelled"));
  }
  return st;
}

absl::StatusOr<RewrittenSpec> LoadSpec(const std::string& file, const PathContext& paths) {
  std::string text;
  if (file == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    auto read = ReadFile(file, size_t{16} << 20);
    if (!read.ok()) {
      return absl::InvalidArgumentError(Cat("cannot read pipeline spec ", file, ": ", read.status().message()));
    }
    text = *std::move(read);
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
    return absl::InvalidArgumentError(Cat("pipeline spec ", file, " is empty; see examples/tiny-btx.yaml"));
  }
  return AbsolutizeSpecPaths(text, paths);
}

int SpecNodesPerJob(const RewrittenSpec& spec) {
  if (!spec.parsed || !spec.spec.is_object() || !spec.spec.contains("resources")) return 1;
  const json& r = spec.spec["resources"];
  if (!r.is_object() || !r.contains("nodes_per_job") || !r["nodes_per_job"].is_number_integer()) return 1;
  const int64_t n = r["nodes_per_job"].get<int64_t>();
  return n > 1 ? static_cast<int>(std::min<int64_t>(n, 1 << 16)) : 1;
}

namespace {

v1::SubmitRequest MakeRequest(const RewrittenSpec& spec, const SubmitArgs& args) {
  v1::SubmitRequest req;
  req.set_spec(spec.text);
  req.set_format(spec.parsed ? v1::SPEC_FORMAT_JSON : v1::SPEC_FORMAT_UNSPECIFIED);
  req.set_idempotency_key(args.idempotency_key);
  req.set_dry_run(args.dry_run);
  return req;
}

// The unfinished pipeline of this state dir that was submitted with the same spec (as the scheduler
// normalises it: a dry run says), if any: a `btxctl run` that was killed and is run again follows it
// instead of training from zero beside it.
absl::StatusOr<std::optional<v1::Pipeline>> FindUnfinished(Client& client, v1::SubmitRequest req) {
  req.set_dry_run(true);
  req.set_idempotency_key("");
  auto planned = client.Submit(req);
  if (!planned.ok()) return planned.status();
  const json spec = json::parse(planned->pipeline().spec(), nullptr, false);
  auto running = client.ListPipelines(v1::PIPELINE_STATE_RUNNING, planned->pipeline().name(), 50);
  if (!running.ok()) return running.status();
  for (const auto& r : *running) {
    if (r.name() != planned->pipeline().name()) continue;
    auto full = client.GetPipeline(r.id());
    if (full.ok() && json::parse(full->spec(), nullptr, false) == spec) return std::optional<v1::Pipeline>(*full);
  }
  return std::optional<v1::Pipeline>();
}

// Submit's field violations name spec fields; say so, so that they read "spec: experts[0].steps: ...".
absl::Status SpecError(const absl::Status& s, const std::string& file) {
  if (s.code() != absl::StatusCode::kInvalidArgument) return s;
  auto violations = ViolationsOf(s);
  if (violations.empty()) return s;
  for (auto& v : violations) {
    if (v.field == "idempotency_key") v.field = "--idempotency-key";
    else if (v.field != "spec") v.field = "spec: " + v.field;
  }
  absl::Status out = absl::InvalidArgumentError(Cat("pipeline spec ", file, " was rejected"));
  out.SetPayload(kFieldViolationsPayload, *InvalidFields(violations).GetPayload(kFieldViolationsPayload));
  return out;
}

}  // namespace

absl::StatusOr<int> Submit(CommandEnv& env, const SubmitArgs& args) {
  auto spec = LoadSpec(args.file, env.paths);
  if (!spec.ok()) return spec.status();
  auto resp = env.client->Submit(MakeRequest(*spec, args));
  if (!resp.ok()) return SpecError(resp.status(), args.file);
  if (env.format != Format::kTable) {
    Print(env.out, Emit(env.format, ToJson(*resp)));
    return 0;
  }
  const auto& p = resp->pipeline();
  if (args.dry_run) {
    Print(env.out, Cat("spec is valid: pipeline ", p.name(), " would run ", p.jobs_size(), " jobs\n"));
    Print(env.out, PlanTable(p));
    return 0;
  }
  if (resp->created()) {
    Print(env.out, Cat("submitted pipeline ", p.name(), " ", p.id(), "\nfollow it: btxctl watch ", p.id(), "\n"));
  } else {
    Print(env.out, Cat("pipeline ", p.name(), " ", p.id(), " already exists for idempotency key '", args.idempotency_key,
                       "' (", StateName(p.state()), ")\n"));
  }
  return 0;
}

absl::StatusOr<int> Run(CommandEnv& env, const SubmitArgs& args, EmbeddedStack* stack) {
  auto spec = args.loaded != nullptr ? absl::StatusOr<RewrittenSpec>(*args.loaded) : LoadSpec(args.file, env.paths);
  if (!spec.ok()) return spec.status();
  if (stack != nullptr) {
    // The local worker reads these very paths: a missing one is a mistake to report now, not
    // after the jobs before it have trained. (A remote worker's filesystem may differ: no check.)
    std::vector<FieldViolation> missing;
    for (const auto& [field, path] : spec->paths) {
      std::error_code ec;
      if (!std::filesystem::exists(path, ec)) missing.push_back({"spec: " + field, Cat(path, " does not exist")});
    }
    if (!missing.empty()) {
      absl::Status s = absl::InvalidArgumentError(Cat("pipeline spec ", args.file,
                                                      " names files that do not exist (relative paths are taken from "
                                                      "the directory btxctl runs in, ", env.paths.cwd, ")"));
      s.SetPayload(kFieldViolationsPayload, *InvalidFields(missing).GetPayload(kFieldViolationsPayload));
      return s;
    }
  }
  if (stack != nullptr && spec->parsed && spec->spec.contains("resources") && spec->spec["resources"].is_object()) {
    const json& g = spec->spec["resources"].value("gpus_per_job", json(0));
    if (g.is_number_integer() && g.get<int64_t>() > stack->gpus_per_worker()) {
      const std::string has =
          stack->local_workers() > 1
              ? Cat("each of the ", stack->local_workers(), " local workers has ", stack->gpus_per_worker(),
                    " GPUs (this machine has ", stack->gpus(), ")")
              : Cat("this machine has ", stack->gpus(), " GPUs");
      return absl::InvalidArgumentError(
          Cat("spec: resources.gpus_per_job: ", g.get<int64_t>(), " but ", has,
              ", so no local worker could run the jobs; set it to 0 to train on the CPU, or submit to a "
              "scheduler with GPU workers (--server)"));
    }
  }
  if (stack != nullptr && SpecNodesPerJob(*spec) > stack->local_workers()) {
    return absl::InvalidArgumentError(Cat("spec: resources.nodes_per_job: ", SpecNodesPerJob(*spec),
                                          " but this btxctl runs ", stack->local_workers(),
                                          " local worker(s), so no training job could start; drop --local-workers "
                                          "(it defaults to nodes_per_job) or raise it"));
  }
  const bool live = env.tty && env.format == Format::kTable;
  Footer footer;
  // Notes go under the live display on a terminal (printing would tear it), else to stderr.
  auto note = [&](const std::string& text) {
    if (live) footer.Set(text);
    else Print(env.err, text + "\n");
  };
  std::mutex mu;
  std::string pipeline_id;
  ScopedSignalAction on_signal([&](int count) {
    std::string id;
    {
      std::lock_guard lock(mu);
      id = pipeline_id;
    }
    if (count == 1 && !id.empty()) {
      note(Cat("btxctl: interrupted: cancelling pipeline ", id,
               stack != nullptr ? "; running jobs checkpoint and stop (Ctrl-C again to kill them)" : ""));
      auto cancelled = env.client->CancelEvenIfInterrupted(id, "cancelled by btxctl run (interrupted)");
      if (!cancelled.ok()) {
        note(Cat("btxctl: ", cancelled.status().message()));
        env.client->CancelAll();
      }
      return;
    }
    if (count == 2 && stack != nullptr) note("btxctl: interrupted again: killing the running jobs");
    if (count <= 2) {
      if (stack != nullptr) stack->StopWorkers();
      env.client->CancelAll();
      return;
    }
    ::_exit(kExitInterrupted);
  });
  if (Signals::Interrupted()) return absl::CancelledError("interrupted");
  std::optional<v1::Pipeline> unfinished;
  if (stack != nullptr && args.idempotency_key.empty() && !args.fresh) {
    auto found = FindUnfinished(*env.client, MakeRequest(*spec, args));
    if (!found.ok()) return SpecError(found.status(), args.file);
    unfinished = *found;
  }
  if (stack != nullptr && !unfinished) {
    // A btxctl that was killed (not interrupted) leaves its pipeline RUNNING; the local worker
    // picks such jobs up again, so say why the new pipeline may wait.
    auto running = env.client->ListPipelines(v1::PIPELINE_STATE_RUNNING, "", 20);
    if (running.ok() && !running->empty()) {
      std::string ids;
      for (const auto& r : *running) ids += (ids.empty() ? "" : ", ") + r.name() + " " + r.id().substr(0, 8);
      Print(env.err, Cat("btxctl: note: ", running->size(), " earlier pipeline(s) in ", stack->state_dir(),
                         " are still RUNNING (", ids, "); the local worker resumes them too. Drop one with "
                         "`btxctl cancel ID`.\n"));
    }
  }
  absl::StatusOr<v1::SubmitResponse> resp = v1::SubmitResponse();
  if (unfinished) {
    *resp->mutable_pipeline() = *unfinished;
    resp->set_created(false);
    Print(env.err, Cat("btxctl: re-attaching to unfinished pipeline ", unfinished->name(), " ", unfinished->id(),
                       " of the same spec in ", stack->state_dir(),
                       ": its jobs resume from their checkpoints (--fresh starts a new pipeline instead)\n"));
  } else {
    resp = env.client->Submit(MakeRequest(*spec, args));
  }
  if (!resp.ok()) return SpecError(resp.status(), args.file);
  const auto& p = resp->pipeline();
  {
    std::lock_guard lock(mu);
    pipeline_id = p.id();
  }
  if (env.format == Format::kTable) {
    Print(env.out, Cat(resp->created() ? "submitted" : "following existing", " pipeline ", p.name(), " ", p.id(),
                       stack != nullptr ? Cat(" (local: ",
                                              stack->local_workers() > 1 ? Cat(stack->local_workers(), " workers x ") : "",
                                              stack->slots(), " slot(s), ", stack->threads_per_job(),
                                              " threads per job; state in ", stack->state_dir(), ")")
                                        : "",
                       "\n"));
  }
  // An interrupt that raced the submission cancels now that the id is known.
  if (Signals::Interrupted()) (void)env.client->CancelEvenIfInterrupted(p.id(), "cancelled by btxctl run (interrupted)");
  FollowOptions fo;
  fo.tty = live;
  fo.out = env.out;
  fo.footer = &footer;
  auto drain = [&] {
    if (stack == nullptr) return;
    auto now = env.client->GetPipeline(p.id());
    bool busy = false;
    if (now.ok()) {
      for (const auto& j : now->jobs()) busy |= j.state() == v1::JOB_STATE_LEASED;
    }
    if (busy) note("btxctl: waiting for the running jobs to checkpoint and stop");
    stack->DrainWorkers();
    stack->WaitWorkers();
    if (busy && live) footer.Set("");
  };
  fo.on_stream_end = drain;
  absl::StatusOr<v1::Pipeline> final_state = absl::UnknownError("not followed");
  if (env.format == Format::kTable) {
    final_state = FollowPipeline(*env.client, p.id(), fo);
  } else {
    v1::WatchRequest req;
    req.set_pipeline_id(p.id());
    req.set_follow(true);
    absl::Status s = env.client->Watch(req, [&](const v1::Event& e) {
      PrintStreamItem(env, e);
      return true;
    });
    drain();
    final_state = s.ok() ? env.client->GetPipeline(p.id()) : absl::StatusOr<v1::Pipeline>(s);
  }
  if (!final_state.ok()) {
    if (Signals::Interrupted()) return kExitInterrupted;
    return final_state.status();
  }
  if (env.format == Format::kTable) Print(env.out, "\n" + Summary(*final_state));
  if (Signals::Interrupted()) return kExitInterrupted;
  return ExitCodeForPipeline(*final_state);
}

absl::StatusOr<int> Get(CommandEnv& env, const GetArgs& a) {
  Client& c = *env.client;
  const auto now = std::chrono::system_clock::now();
  if (a.what == "pipelines" || a.what == "pipeline") {
    if (!a.id.empty()) {
      auto id = c.ResolvePipelineId(a.id);
      if (!id.ok()) return id.status();
      auto p = c.GetPipeline(*id);
      if (!p.ok()) return p.status();
      Print(env.out, env.format == Format::kTable ? PipelinesTable({*p}, now) : Emit(env.format, ToJson(*p)));
      return 0;
    }
    v1::PipelineState state = v1::PIPELINE_STATE_UNSPECIFIED;
    if (!a.state.empty()) {
      auto st = ParsePipelineState(a.state);
      if (!st.ok()) return st.status();
      state = *st;
    }
    auto list = c.ListPipelines(state, a.name_prefix, a.limit > 0 ? a.limit : 50);
    if (!list.ok()) return list.status();
    Print(env.out, env.format == Format::kTable ? PipelinesTable(*list, now) : Emit(env.format, JsonArray(*list)));
    return 0;
  }
  if (a.what == "jobs" || a.what == "job") {
    std::string pipeline_id;
    if (!a.pipeline.empty()) {
      auto id = c.ResolvePipelineId(a.pipeline);
      if (!id.ok()) return id.status();
      pipeline_id = *id;
    }
    v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
    if (!a.state.empty()) {
      auto st = ParseJobState(a.state);
      if (!st.ok()) return st.status();
      state = *st;
    }
    std::string job_id;
    if (!a.id.empty()) {
      auto id = c.ResolveJobId(a.id, a.pipeline);
      if (!id.ok()) return id.status();
      job_id = *id;
    }
    auto jobs = c.ListJobs(pipeline_id, job_id.empty() ? state : v1::JOB_STATE_UNSPECIFIED,
                           job_id.empty() && a.limit > 0 ? a.limit : (job_id.empty() ? 200 : 1000));
    if (!jobs.ok()) return jobs.status();
    if (!job_id.empty()) {
      std::vector<v1::Job> one;
      for (const auto& j : *jobs) {
        if (j.id() == job_id) one.push_back(j);
      }
      if (one.empty()) return absl::NotFoundError(Cat("job ", job_id, " not found among the newest 1000 jobs"));
      Print(env.out, env.format == Format::kTable ? JobsTable(one, pipeline_id.empty()) : Emit(env.format, ToJson(one[0])));
      return 0;
    }
    Print(env.out, env.format == Format::kTable ? JobsTable(*jobs, pipeline_id.empty()) : Emit(env.format, JsonArray(*jobs)));
    return 0;
  }
  if (a.what == "workers" || a.what == "worker") {
    auto workers = c.ListWorkers();
    if (!workers.ok()) return workers.status();
    std::vector<v1::Worker> shown;
    for (const auto& w : *workers) {
      if (a.id.empty() || w.id() == a.id || w.name() == a.id || (a.id.size() >= 4 && w.id().rfind(a.id, 0) == 0)) {
        shown.push_back(w);
      }
    }
    if (!a.id.empty() && shown.empty()) return absl::NotFoundError(Cat("no worker with id or name '", a.id, "'"));
    if (!a.id.empty() && env.format != Format::kTable) {
      Print(env.out, Emit(env.format, ToJson(shown[0])));
      return 0;
    }
    Print(env.out, env.format == Format::kTable ? WorkersTable(shown, now) : Emit(env.format, JsonArray(shown)));
    return 0;
  }
  return absl::InvalidArgumentError(Cat("get ", a.what, ": expected pipelines, jobs or workers"));
}

absl::StatusOr<int> DescribePipelineCmd(CommandEnv& env, const std::string& ref, int max_events) {
  auto id = env.client->ResolvePipelineId(ref);
  if (!id.ok()) return id.status();
  auto p = env.client->GetPipeline(*id);
  if (!p.ok()) return p.status();
  std::vector<v1::Event> events;
  v1::WatchRequest req;
  req.set_pipeline_id(*id);
  req.set_follow(false);
  auto s = env.client->Watch(req, [&](const v1::Event& e) {
    if (e.type() != "job.progress") events.push_back(e);
    return true;
  });
  if (!s.ok()) return s;
  if (env.format != Format::kTable) {
    json out = {{"pipeline", ToJson(*p)}, {"events", JsonArray(events)}};
    Print(env.out, Emit(env.format, out));
    return 0;
  }
  Print(env.out, DescribePipeline(*p, events, std::chrono::system_clock::now(), static_cast<size_t>(std::max(0, max_events))));
  return 0;
}

absl::StatusOr<int> Watch(CommandEnv& env, const std::string& ref, int64_t after_event_id) {
  auto id = env.client->ResolvePipelineId(ref);
  if (!id.ok()) return id.status();
  ScopedSignalAction on_signal([&](int count) {
    if (count >= 3) ::_exit(kExitInterrupted);
    env.client->CancelAll();
  });
  if (env.format != Format::kTable) {
    v1::WatchRequest req;
    req.set_pipeline_id(*id);
    req.set_after_event_id(after_event_id);
    req.set_follow(true);
    absl::Status s = env.client->Watch(req, [&](const v1::Event& e) {
      PrintStreamItem(env, e);
      return true;
    });
    if (!s.ok()) return Signals::Interrupted() ? absl::StatusOr<int>(kExitInterrupted) : s;
    auto p = env.client->GetPipeline(*id);
    if (!p.ok()) return p.status();
    return ExitCodeForPipeline(*p);
  }
  FollowOptions fo;
  fo.tty = env.tty;
  fo.out = env.out;
  fo.after_event_id = after_event_id;
  auto p = FollowPipeline(*env.client, *id, fo);
  if (!p.ok()) return Signals::Interrupted() ? absl::StatusOr<int>(kExitInterrupted) : p.status();
  Print(env.out, "\n" + Summary(*p));
  return ExitCodeForPipeline(*p);
}

absl::StatusOr<int> Logs(CommandEnv& env, const std::string& job_ref, const std::string& pipeline_ref, bool follow,
                         int64_t after_seq) {
  auto id = env.client->ResolveJobId(job_ref, pipeline_ref);
  if (!id.ok()) return id.status();
  ScopedSignalAction on_signal([&](int count) {
    if (count >= 3) ::_exit(kExitInterrupted);
    env.client->CancelAll();
  });
  v1::LogsRequest req;
  req.set_job_id(*id);
  req.set_follow(follow);
  req.set_after_seq(after_seq);
  int attempt = 0;
  absl::Status s = env.client->Logs(req, [&](const v1::LogLine& l) {
    if (env.format != Format::kTable) {
      PrintStreamItem(env, l);
      return true;
    }
    if (l.attempt() != attempt) {
      if (attempt != 0 || l.attempt() > 1) Print(env.out, Cat("--- attempt ", l.attempt(), " ---\n"));
      attempt = l.attempt();
    }
    Print(env.out, l.text() + (l.text().empty() || l.text().back() != '\n' ? "\n" : ""));
    return true;
  });
  if (!s.ok()) return Signals::Interrupted() ? absl::StatusOr<int>(kExitInterrupted) : s;
  return 0;
}

absl::StatusOr<int> Cancel(CommandEnv& env, const std::string& ref, const std::string& reason) {
  auto id = env.client->ResolvePipelineId(ref);
  if (!id.ok()) return id.status();
  auto p = env.client->Cancel(*id, reason);
  if (!p.ok()) return p.status();
  if (env.format != Format::kTable) {
    Print(env.out, Emit(env.format, ToJson(*p)));
    return 0;
  }
  if (p->state() == v1::PIPELINE_STATE_CANCELLED) {
    int running = 0;
    for (const auto& j : p->jobs()) running += j.state() == v1::JOB_STATE_LEASED ? 1 : 0;
    Print(env.out, Cat("pipeline ", p->name(), " ", p->id(), " CANCELLED",
                       running > 0 ? Cat("; ", running, " running job(s) stop at their next heartbeat") : "", "\n"));
  } else {
    Print(env.out, Cat("pipeline ", p->name(), " ", p->id(), " had already ended ", StateName(p->state()),
                       "; nothing to cancel\n"));
  }
  return 0;
}

absl::StatusOr<int> Retry(CommandEnv& env, const std::string& ref) {
  auto id = env.client->ResolvePipelineId(ref);
  if (!id.ok()) return id.status();
  auto p = env.client->Retry(*id);
  if (!p.ok()) return p.status();
  if (env.format != Format::kTable) {
    Print(env.out, Emit(env.format, ToJson(*p)));
    return 0;
  }
  Print(env.out, Cat("pipeline ", p->name(), " ", p->id(), " is ", StateName(p->state()),
                     " again; follow it: btxctl watch ", p->id(), "\n"));
  return 0;
}

std::string DataPrepareBar(int64_t done, int64_t total, int width) {
  const double frac = total > 0 ? std::clamp(static_cast<double>(done) / static_cast<double>(total), 0.0, 1.0) : 1.0;
  char tail[64];
  std::snprintf(tail, sizeof tail, " %3d%% %.1f/%.1f MB", static_cast<int>(frac * 100), done / 1e6, total / 1e6);
  const int cells = std::max(10, std::min(40, width - 1 - static_cast<int>(std::strlen(tail)) - 13));
  const int full = static_cast<int>(frac * cells);
  std::string bar = "tokenizing [" + std::string(full, '#') + std::string(cells - full, '.') + "]" + tail;
  if (static_cast<int>(bar.size()) > width - 1) bar.resize(std::max(0, width - 1));
  return bar;
}

namespace {
// Runs the tool, redrawing DataPrepareBar on stderr from the "progress DONE TOTAL" lines it writes to its fd 3.
absl::StatusOr<RunResult> RunWithBar(ProcessSpec spec, std::FILE* bar_out) {
  spec.capture_stdout = spec.capture_stderr = spec.progress_pipe = true;
  spec.argv.insert(spec.argv.end(), {"--progress-fd", "3"});
  PosixProcessLauncher launcher;
  auto proc = launcher.Launch(spec);
  if (!proc.ok()) return proc.status();
  RunResult result;
  std::string progress;
  bool drawn = false;
  pollfd fds[3] = {{(*proc)->stdout_fd(), POLLIN, 0}, {(*proc)->stderr_fd(), POLLIN, 0}, {(*proc)->progress_fd(), POLLIN, 0}};
  int open_fds = 3;
  char buf[4096];
  while (open_fds > 0) {
    if (::poll(fds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int k = 0; k < 3; ++k) {
      pollfd& p = fds[k];
      if (p.fd < 0 || !(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = ::read(p.fd, buf, sizeof(buf));
      if (n <= 0 && (n == 0 || errno != EINTR)) {
        p.fd = -1;
        --open_fds;
        continue;
      }
      if (n <= 0) continue;
      if (k < 2) {
        result.output.append(buf, static_cast<size_t>(n));
        continue;
      }
      progress.append(buf, static_cast<size_t>(n));
      for (size_t nl; (nl = progress.find('\n')) != std::string::npos; progress.erase(0, nl + 1)) {
        long long done = 0, total = 0;
        if (std::sscanf(progress.c_str(), "progress %lld %lld", &done, &total) != 2) continue;
        Print(bar_out, "\r" + DataPrepareBar(done, total, TerminalWidth(bar_out)));
        drawn = true;
      }
    }
  }
  if (drawn) Print(bar_out, "\r\033[K");
  result.exit_code = (*proc)->Wait();
  return result;
}
}  // namespace

absl::StatusOr<int> DataPrepare(CommandEnv& env, const DataPrepareArgs& args) {
  const std::string tool = SelfExeDir() + "/btx-model-tool";
  if (::access(tool.c_str(), X_OK) != 0) {
    return absl::UnavailableError(
        Cat("data prepare needs btx-model-tool next to btxctl (", tool,
            "); build it with `cmake --build build --target btx-model-tool`"));
  }
  ProcessSpec spec;
  spec.argv = {tool, "data-prepare"};
  spec.argv.insert(spec.argv.end(), args.inputs.begin(), args.inputs.end());
  const std::pair<const char*, const std::string*> flags[] = {{"--out", &args.out},
                                                              {"--tokenizer", &args.tokenizer},
                                                              {"--valid-fraction", &args.valid_fraction},
                                                              {"--shard-tokens", &args.shard_tokens},
                                                              {"--seed", &args.seed},
                                                              {"--format", &args.format},
                                                              {"--text-field", &args.text_field}};
  for (const auto& [flag, value_ptr] : flags) {
    const std::string& value = *value_ptr;
    if (value.empty()) continue;
    spec.argv.push_back(flag);
    spec.argv.push_back(value);
  }
  // Same process group: Ctrl-C at the terminal stops the tool too, and btxctl then reports 130.
  spec.new_session = false;
  PosixProcessLauncher launcher;
  // The bar only on a terminal: piped output stays the one summary line.
  auto run = IsTty(stderr) ? RunWithBar(spec, stderr) : RunAndCapture(launcher, spec);
  if (!run.ok()) return absl::InternalError(Cat("cannot run ", tool, ": ", run.status().message()));
  // The tool's last line is its summary, or its one-line error; sentencepiece training may log above it.
  std::string line = run->output;
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
  if (auto nl = line.rfind('\n'); nl != std::string::npos) line = line.substr(nl + 1);
  if (run->exit_code == 0) {
    Print(env.out, line + "\n");
    return kExitOk;
  }
  constexpr std::string_view kPrefix = "btx-model-tool: ";
  if (line.starts_with(kPrefix)) line = line.substr(kPrefix.size());
  // The tokenizer helper's own reason (e.g. a vocabulary too small for the corpus) is more useful than the
  // tool's "helper failed"; keep it on the same line.
  if (auto at = run->output.rfind("btx-spm: "); at != std::string::npos) {
    std::string why = run->output.substr(at + 9);
    why = why.substr(0, why.find('\n'));
    line = Cat(line, " (", why, ")");
  }
  if (Signals::Interrupted() || run->exit_code == 128 + SIGINT || run->exit_code == 128 + SIGTERM) {
    return absl::CancelledError("data prepare interrupted");
  }
  if (run->exit_code == 65) return absl::InvalidArgumentError(Cat("data prepare: ", line));
  return absl::InternalError(Cat("data prepare failed (btx-model-tool exit ", run->exit_code, "): ", line));
}

}  // namespace btx::cli
