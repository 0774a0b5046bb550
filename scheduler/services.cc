// PipelineService and WorkerService: validate the request, run one Store transaction, map the result.
#include "services.h"

#include <algorithm>
#include <filesystem>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>

#include "absl/strings/str_join.h"
#include "btx/common/strings.h"
#include "btx/common/utf8.h"
#include "btx/common/uri.h"
#include "btx/rpc_status.h"
#include "btx/scheduler/auth.h"
#include "btx/scheduler/plan.h"
#include "btx/scheduler/spec.h"
#include "convert.h"
#include "follow.h"
#include "input_check.h"

namespace btx::scheduler {
using json = nlohmann::json;
namespace v1 = btx::v1;

namespace {

// PostgreSQL's jsonb refuses \u0000 in strings (keys included). Iterative: a result may nest as
// deep as the message size allows.
bool HoldsNul(const json& root) {
  std::vector<const json*> todo{&root};
  while (!todo.empty()) {
    const json& j = *todo.back();
    todo.pop_back();
    if (j.is_string() && j.get_ref<const std::string&>().find('\0') != std::string::npos) return true;
    if (j.is_object()) {
      for (const auto& [k, v] : j.items()) {
        if (k.find('\0') != std::string::npos) return true;
        todo.push_back(&v);
      }
    } else if (j.is_array()) {
      for (const auto& v : j) todo.push_back(&v);
    }
  }
  return false;
}

absl::Status CheckId(const std::string& field, const std::string& value) {
  if (IsUuid(value)) return absl::OkStatus();
  return InvalidFields({{field, Cat("got '", value.substr(0, 64), "'; expected a UUID")}});
}

// The job's arguments as the worker receives them: parents' artifact references become paths.
absl::StatusOr<json> ResolveInputs(const storage::ClaimedJob& c) {
  json stored = json::parse(c.job.spec_json, nullptr, /*allow_exceptions=*/false);
  if (stored.is_discarded()) return absl::FailedPreconditionError("its stored arguments are not valid JSON");
  return ResolveArtifacts(stored, c.parent_artifacts);
}

// The members' ranks connect there (IsHostPort: as btx-train reads BTX_RENDEZVOUS).
absl::Status CheckRendezvous(const std::string& field, const std::string& v) {
  if (IsHostPort(v)) return absl::OkStatus();
  return InvalidFields({{field, Cat("got '", v.substr(0, 64), "'; expected host:port of the gang's rendezvous store")}});
}

absl::Status CheckKey(const std::string& key) {
  if (key.size() > 128) return InvalidFields({{"idempotency_key", "longer than 128 characters"}});
  for (char c : key) {
    if (c < 0x21 || c > 0x7e) return InvalidFields({{"idempotency_key", "expected printable ASCII without spaces"}});
  }
  return absl::OkStatus();
}

// A CPU job of R ranks needs a worker with at least R CPU threads (one per rank; docs/architecture.md).
absl::Status CheckSomeWorkerFitsRanks(storage::Store& store, const std::vector<storage::NewJob>& jobs) {
  int needed = 1;
  for (const auto& j : jobs) {
    if (j.gpus == 0) needed = std::max(needed, j.ranks);
  }
  if (needed <= 1) return absl::OkStatus();
  auto largest = store.LargestWorker(storage::WorkerResource::kCpuThreads);
  if (!largest.ok()) return largest.status();
  if (!largest->has_value() || (*largest)->cpu_threads >= needed) return absl::OkStatus();
  return absl::FailedPreconditionError(
      Cat("no registered worker can run this pipeline: its jobs run ", needed,
          " CPU ranks each (resources.ranks_per_job), one CPU thread per rank at least, and the largest registered "
          "worker, '", (*largest)->name, "', has ", (*largest)->cpu_threads, " CPU thread",
          (*largest)->cpu_threads == 1 ? "" : "s"));
}

// A job that needs more GPUs than any worker has would wait forever: refuse the pipeline while its
// owner can still change it. Every registered worker counts, in any state (Store::LargestWorker). With
// none registered yet, the pipeline is accepted and waits: a fleet may well start after its first
// submission.
absl::Status CheckSomeWorkerFits(storage::Store& store, const std::vector<storage::NewJob>& jobs) {
  // A gang needs nodes_per_job workers at once: refused when fewer are registered than it needs, for the
  // same reason (and with the same leniency for an empty fleet) as a job too large for any one worker.
  // The planner gives every training job of a pipeline the same shape: each distinct one is checked once.
  std::set<std::pair<int, int>> checked;  // (nodes, gpus)
  std::optional<bool> fleet_empty;
  for (const auto& j : jobs) {
    if (j.nodes <= 1 || !checked.insert({j.nodes, j.gpus}).second) continue;
    if (!fleet_empty) {
      auto any = store.LargestWorker();
      if (!any.ok()) return any.status();
      fleet_empty = !any->has_value();
    }
    if (*fleet_empty) break;
    auto fit = store.WorkersWithGpus(j.gpus);
    if (!fit.ok()) return fit.status();
    if (fit->first >= j.nodes) continue;
    return absl::FailedPreconditionError(Cat(
        "no set of registered workers can run this pipeline: its training jobs span ", j.nodes,
        " workers at once (resources.nodes_per_job)", j.gpus > 0 ? Cat(" with ", j.gpus, " GPUs each") : std::string(),
        ", and ", fit->first, " registered worker", fit->first == 1 ? " has" : "s have", j.gpus > 0 ? " that many" : "",
        fit->second.empty() ? std::string() : Cat(" (", absl::StrJoin(fit->second, ", "), ")"),
        "; a gang never starts on fewer"));
  }
  int needed = 0;
  for (const auto& j : jobs) needed = std::max(needed, j.gpus);
  if (needed == 0) return CheckSomeWorkerFitsRanks(store, jobs);
  auto largest = store.LargestWorker();
  if (!largest.ok()) return largest.status();
  if (!largest->has_value() || (*largest)->gpus >= needed) return CheckSomeWorkerFitsRanks(store, jobs);
  return absl::FailedPreconditionError(
      Cat("no registered worker can run this pipeline: its jobs need ", needed, " GPU", needed == 1 ? "" : "s",
          " each (resources.gpus_per_job), and the largest registered worker, '", (*largest)->name, "', has ",
          (*largest)->gpus, " GPU", (*largest)->gpus == 1 ? "" : "s"));
}

// Tenancy (docs/security.md): who calls, whose pipelines the call may see.
// An owner no identity can have (names in the identities file are printable, without control characters).
constexpr char kNobody[] = "\x01nobody";

struct Caller {
  std::string owner;                // recorded on the pipelines it submits
  std::optional<std::string> only;  // sees only this owner's pipelines; none: every pipeline
};

// The principal is taken from this call's own credentials, never from the connection's auth context:
// gRPC shares that context between all calls of a connection, so what one call recorded there would be
// seen by the next (another user's, through a proxy that multiplexes them).
Caller CallerOf(const grpc::ServerContextBase* ctx, const std::optional<Authenticator>& authenticator) {
  // No authentication (plaintext loopback dev mode): one anonymous owner who sees everything.
  if (!authenticator) return {"", std::nullopt};
  std::vector<std::string_view> authorization;
  const auto& md = ctx->client_metadata();
  for (auto [it, end] = md.equal_range("authorization"); it != end; ++it) {
    authorization.emplace_back(it->second.data(), it->second.size());
  }
  const auto auth = ctx->auth_context();
  const absl::StatusOr<Principal> who = authenticator->Authenticate(authorization, CertNameOf(auth.get()));
  // The transport's check let the call through, so this holds; if it ever did not, see nothing (fail closed).
  if (!who.ok()) return {kNobody, kNobody};
  if (who->role == Role::kAdmin) return {who->name, std::nullopt};
  return {who->name, who->name};
}

bool Sees(const Caller& c, const std::string& owner) { return !c.only || *c.only == owner; }

// The pipeline, if the caller may see it: another owner's answers exactly as a missing one, so its
// existence does not leak.
absl::StatusOr<storage::PipelineRecord> VisiblePipeline(storage::Store& store, const Caller& c, const std::string& id) {
  auto p = store.GetPipeline(id);
  if (p.ok() && !Sees(c, p->owner)) return absl::NotFoundError(Cat("pipeline '", id, "' not found"));
  return p;
}

// Where a job's attempts write: its output (`model`) and checkpoints, stable across attempts.
std::string JobDir(const std::string& root, const std::string& pipeline_id, const std::string& name) {
  // Normalised as FileArtifactStore::PathOf normalises what workers send back, so the two compare.
  std::string r = std::filesystem::path(root).lexically_normal().string();
  while (r.size() > 1 && r.back() == '/') r.pop_back();
  return Cat(r, "/", pipeline_id, "/", SanitizeComponent(name));
}

}  // namespace

grpc::Status PipelineServiceImpl::Submit(grpc::ServerContext* ctx, const v1::SubmitRequest* req,
                                         v1::SubmitResponse* resp) {
  if (auto s = CheckKey(req->idempotency_key()); !s.ok()) return ToGrpcStatus(s);
  auto spec = ParseSpec(req->spec());
  if (!spec.ok()) return ToGrpcStatus(spec.status());
  auto jobs = PlanJobs(*spec);
  if (!jobs.ok()) return ToGrpcStatus(jobs.status());
  if (auto s = CheckSomeWorkerFits(store_, *jobs); !s.ok()) return ToGrpcStatus(s);
  if (auto s = CheckJobInputs(*jobs, data_roots_); !s.ok()) return ToGrpcStatus(s);
  storage::NewPipeline p{.name = (*spec)["name"], .spec_json = spec->dump(), .idempotency_key = req->idempotency_key(),
                         .owner = CallerOf(ctx, authenticator_).owner, .jobs = *std::move(jobs)};
  if (req->dry_run()) {
    auto* out = resp->mutable_pipeline();
    out->set_name(p.name);
    out->set_spec(p.spec_json);
    out->set_state(v1::PIPELINE_STATE_UNSPECIFIED);
    for (const auto& j : p.jobs) {
      auto* job = out->add_jobs();
      job->set_name(j.name);
      job->set_kind(JobKindFromString(j.kind));
      job->set_spec_json(j.spec_json);
      job->set_max_attempts(j.max_attempts);
      job->mutable_resources()->set_gpus(j.gpus);
      job->mutable_resources()->set_ranks(j.ranks);
      if (j.nodes > 1) job->mutable_resources()->set_nodes(j.nodes);
      for (const auto& d : j.depends_on) job->add_depends_on(d);
    }
    return grpc::Status::OK;
  }
  auto created = store_.CreatePipeline(p, clock_.Now());
  if (!created.ok()) return ToGrpcStatus(created.status());
  ToProto(created->first, resp->mutable_pipeline());
  resp->set_created(created->second);
  wakeups_.JobsChanged();
  wakeups_.EventsChanged();
  return grpc::Status::OK;
}

grpc::Status PipelineServiceImpl::Get(grpc::ServerContext* ctx, const v1::GetPipelineRequest* req, v1::Pipeline* resp) {
  if (auto s = CheckId("id", req->id()); !s.ok()) return ToGrpcStatus(s);
  auto p = VisiblePipeline(store_, CallerOf(ctx, authenticator_), req->id());
  if (!p.ok()) return ToGrpcStatus(p.status());
  if (auto s = store_.DescribeGangs(p->jobs, clock_.Now()); !s.ok()) return ToGrpcStatus(s);
  ToProto(*p, resp);
  return grpc::Status::OK;
}

grpc::Status PipelineServiceImpl::List(grpc::ServerContext* ctx, const v1::ListPipelinesRequest* req,
                                       v1::ListPipelinesResponse* resp) {
  if (req->page_size() < 0 || req->page_size() > 500) {
    return ToGrpcStatus(InvalidFields({{"page_size", Cat("got ", req->page_size(), "; expected 0..500 (0 = 50)")}}));
  }
  if (!v1::PipelineState_IsValid(req->state())) {
    return ToGrpcStatus(InvalidFields({{"state", Cat("got ", static_cast<int>(req->state()), "; expected a PipelineState")}}));
  }
  storage::PipelineFilter f{.state = PipelineStateToString(req->state()), .name_prefix = req->name_prefix(),
                            .page_size = req->page_size() == 0 ? 50 : req->page_size(), .page_token = req->page_token(),
                            .owner = CallerOf(ctx, authenticator_).only};
  auto page = store_.ListPipelines(f);
  if (!page.ok()) return ToGrpcStatus(page.status());
  for (const auto& p : page->pipelines) ToProto(p, resp->add_pipelines());
  resp->set_next_page_token(page->next_page_token);
  return grpc::Status::OK;
}

grpc::Status PipelineServiceImpl::Cancel(grpc::ServerContext* ctx, const v1::CancelRequest* req, v1::Pipeline* resp) {
  if (auto s = CheckId("id", req->id()); !s.ok()) return ToGrpcStatus(s);
  // Owners never change, so checking first and acting second cannot race.
  if (auto v = VisiblePipeline(store_, CallerOf(ctx, authenticator_), req->id()); !v.ok()) return ToGrpcStatus(v.status());
  // Cut at a character boundary: half a character is invalid UTF-8, which neither PostgreSQL nor a proto
  // string field (every later Get and Watch of the pipeline) accepts.
  auto p = store_.CancelPipeline(req->id(), std::string(Utf8Prefix(req->reason(), 1024)), clock_.Now());
  if (!p.ok()) return ToGrpcStatus(p.status());
  ToProto(*p, resp);
  wakeups_.EventsChanged();
  return grpc::Status::OK;
}

grpc::Status PipelineServiceImpl::Retry(grpc::ServerContext* ctx, const v1::RetryRequest* req, v1::Pipeline* resp) {
  if (auto s = CheckId("id", req->id()); !s.ok()) return ToGrpcStatus(s);
  if (auto v = VisiblePipeline(store_, CallerOf(ctx, authenticator_), req->id()); !v.ok()) return ToGrpcStatus(v.status());
  auto p = store_.RetryPipeline(req->id(), clock_.Now());
  if (!p.ok()) return ToGrpcStatus(p.status());
  ToProto(*p, resp);
  wakeups_.JobsChanged();
  wakeups_.EventsChanged();
  return grpc::Status::OK;
}

namespace {

enum class Sent { kMore, kEnd, kGone };

// How one stream reads and writes its rows; Follow does the rest.
template <typename Row>
struct FollowOps {
  size_t page = 0;
  // The stream's own read of a page after a cursor, on the followers' pool: its catch-up.
  std::function<absl::StatusOr<std::vector<Row>>(int64_t after)> read;
  // Whether the last own read that returned less than a page saw the end (a job that had ended).
  std::function<bool()> read_saw_end = [] { return false; };
  // Writes one row (skipping those at or below the cursor): kEnd once the stream has reached its end.
  std::function<Sent(const Row&)> send;
  std::function<Followers::Membership<Row>(int64_t after)> join;
};

// Streams a follower's rows from `after` on: its own reads until it has caught up (or whenever it
// falls behind the shared feed's window), then the shared feed, which one reader fills for every
// follower of the same pipeline or job. Ends when `send` or the feed says so, the client goes away,
// or the scheduler stops.
template <typename Row>
grpc::Status Follow(grpc::ServerContext* ctx, const Followers& followers, bool follow, int64_t& after,
                    const FollowOps<Row>& ops) {
  const grpc::Status kDone = grpc::Status::OK;
  // A status: the stream is over.
  auto catch_up = [&]() -> std::optional<grpc::Status> {
    bool ended = false;
    while (true) {
      auto rows = ops.read(after);
      if (!rows.ok()) return ToGrpcStatus(rows.status());
      for (const auto& r : *rows) {
        const Sent sent = ops.send(r);
        if (sent == Sent::kGone) return kDone;
        ended |= sent == Sent::kEnd;
      }
      if (ended) return kDone;  // the rest of that page went out too, as it always has
      if (rows->size() < ops.page) break;
    }
    if (ops.read_saw_end()) return kDone;
    return std::nullopt;
  };
  if (auto over = catch_up()) return *over;
  if (!follow) return kDone;
  auto feed = ops.join(after);
  constexpr uint64_t kLook = ~uint64_t{0};  // a version no feed has: look without waiting
  uint64_t seen = kLook;
  std::vector<Row> batch;
  while (true) {
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    if (followers.stopped()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "scheduler shutting down; reconnect");
    bool behind = false, feed_ended = false;
    batch.clear();
    {
      std::unique_lock lock(feed->mu);
      // Bounded: a client that went away is only noticed by looking.
      feed->cv.wait_for(lock, std::chrono::seconds(1), [&] { return feed->version != seen || followers.stopped(); });
      seen = feed->version;
      if (!feed->error.ok()) return ToGrpcStatus(feed->error);
      if (after < feed->base) {
        behind = true;
      } else {
        auto from = std::upper_bound(feed->rows.begin(), feed->rows.end(), after,
                                     [](int64_t a, const Row& r) { return a < r.id; });
        batch.assign(from, feed->rows.end());
        feed_ended = feed->ended;
      }
    }
    if (behind) {
      if (auto over = catch_up()) return *over;
      seen = kLook;
      continue;
    }
    bool ended = feed_ended;
    for (const auto& r : batch) {
      const Sent sent = ops.send(r);
      if (sent == Sent::kGone) return kDone;
      ended |= sent == Sent::kEnd;
    }
    if (ended) return kDone;
  }
}

bool PipelineEnded(const std::string& event_type) {
  return event_type == "pipeline.succeeded" || event_type == "pipeline.failed" || event_type == "pipeline.cancelled";
}

}  // namespace

// Watch and Logs share the followers' caps, database pool and feeds (follow.h): nothing a follower
// does takes a connection from heartbeats and claims.
grpc::Status PipelineServiceImpl::Watch(grpc::ServerContext* ctx, const v1::WatchRequest* req,
                                        grpc::ServerWriter<v1::Event>* writer) {
  const Caller caller = CallerOf(ctx, authenticator_);
  const std::string& pipeline_id = req->pipeline_id();
  if (!pipeline_id.empty()) {
    if (auto s = CheckId("pipeline_id", pipeline_id); !s.ok()) return ToGrpcStatus(s);
  }
  auto slot = followers_.Open(caller.owner);
  if (!slot.ok()) return ToGrpcStatus(slot.status());
  if (!pipeline_id.empty()) {
    auto p = followers_.GetPipeline(pipeline_id);
    // Another owner's answers exactly as a missing one (VisiblePipeline).
    if (p.ok() && !Sees(caller, p->owner)) return ToGrpcStatus(absl::NotFoundError(Cat("pipeline '", pipeline_id, "' not found")));
    if (!p.ok()) return ToGrpcStatus(p.status());
  }
  // One pipeline was checked above (owners never change); all pipelines are filtered by owner in the query.
  const std::optional<std::string> owner = pipeline_id.empty() ? caller.only : std::nullopt;
  int64_t after = req->after_event_id();
  FollowOps<storage::EventRecord> ops;
  ops.page = Followers::kEventPage;
  ops.read = [&](int64_t from) { return followers_.EventsAfter(pipeline_id, from, Followers::kEventPage, owner); };
  ops.send = [&](const storage::EventRecord& e) {
    if (e.id <= after) return Sent::kMore;
    v1::Event out;
    ToProto(e, &out);
    if (!writer->Write(out)) return Sent::kGone;
    after = e.id;
    return !pipeline_id.empty() && PipelineEnded(e.type) ? Sent::kEnd : Sent::kMore;
  };
  ops.join = [&](int64_t from) { return followers_.JoinEvents(pipeline_id, owner, from); };
  if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "scheduler shutting down; reconnect");
  return Follow(ctx, followers_, req->follow(), after, ops);
}

grpc::Status PipelineServiceImpl::Logs(grpc::ServerContext* ctx, const v1::LogsRequest* req,
                                       grpc::ServerWriter<v1::LogLine>* writer) {
  if (auto s = CheckId("job_id", req->job_id()); !s.ok()) return ToGrpcStatus(s);
  const Caller caller = CallerOf(ctx, authenticator_);
  auto slot = followers_.Open(caller.owner);
  if (!slot.ok()) return ToGrpcStatus(slot.status());
  {
    auto job = followers_.GetJob(req->job_id());
    if (!job.ok()) return ToGrpcStatus(job.status());
    if (caller.only) {
      auto p = followers_.GetPipeline(job->pipeline_id);
      if (!p.ok() && !absl::IsNotFound(p.status())) return ToGrpcStatus(p.status());
      if (!p.ok() || !Sees(caller, p->owner)) {
        return ToGrpcStatus(absl::NotFoundError(Cat("job '", req->job_id(), "' not found")));
      }
    }
  }
  int64_t after = req->after_seq();
  bool job_ended = false;
  FollowOps<storage::LogRecord> ops;
  ops.page = Followers::kLogPage;
  ops.read = [&](int64_t from) -> absl::StatusOr<std::vector<storage::LogRecord>> {
    // The state first: lines read after seeing the job ended are all its lines.
    auto job = followers_.GetJob(req->job_id());
    if (!job.ok()) return job.status();
    job_ended = job->state == "SUCCEEDED" || job->state == "FAILED" || job->state == "CANCELLED";
    return followers_.LogsAfter(req->job_id(), from, Followers::kLogPage);
  };
  ops.read_saw_end = [&] { return job_ended; };
  ops.send = [&](const storage::LogRecord& l) {
    if (l.id <= after) return Sent::kMore;
    v1::LogLine out;
    out.set_seq(l.id);
    out.set_attempt(l.attempt);
    out.set_stream(l.stream);
    out.set_text(l.line);
    SetTime(l.created_at, out.mutable_time());
    if (!writer->Write(out)) return Sent::kGone;
    after = l.id;
    return Sent::kMore;
  };
  ops.join = [&](int64_t from) { return followers_.JoinLogs(req->job_id(), from); };
  if (stopping_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "scheduler shutting down; reconnect");
  return Follow(ctx, followers_, req->follow(), after, ops);
}

grpc::Status PipelineServiceImpl::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                                           v1::ListJobsResponse* resp) {
  const Caller caller = CallerOf(ctx, authenticator_);
  if (!req->pipeline_id().empty()) {
    if (auto s = CheckId("pipeline_id", req->pipeline_id()); !s.ok()) return ToGrpcStatus(s);
    if (caller.only) {
      if (auto p = VisiblePipeline(store_, caller, req->pipeline_id()); !p.ok()) return ToGrpcStatus(p.status());
    }
  }
  if (req->limit() < 0 || req->limit() > 1000) {
    return ToGrpcStatus(InvalidFields({{"limit", Cat("got ", req->limit(), "; expected 0..1000 (0 = 200)")}}));
  }
  if (!v1::JobState_IsValid(req->state())) {
    return ToGrpcStatus(InvalidFields({{"state", Cat("got ", static_cast<int>(req->state()), "; expected a JobState")}}));
  }
  if (!req->page_token().empty() && !IsUuid(req->page_token())) {
    return ToGrpcStatus(InvalidFields({{"page_token", "not a next_page_token of an earlier ListJobs"}}));
  }
  std::string next;
  auto jobs = store_.ListJobs(req->pipeline_id(), JobStateToString(req->state()), req->limit() == 0 ? 200 : req->limit(),
                              caller.only, req->page_token(), &next);
  if (!jobs.ok()) return ToGrpcStatus(jobs.status());
  if (auto s = store_.DescribeGangs(*jobs, clock_.Now()); !s.ok()) return ToGrpcStatus(s);
  for (const auto& j : *jobs) ToProto(j, resp->add_jobs());
  resp->set_next_page_token(next);
  return grpc::Status::OK;
}

grpc::Status PipelineServiceImpl::ListWorkers(grpc::ServerContext*, const v1::ListWorkersRequest*,
                                              v1::ListWorkersResponse* resp) {
  auto workers = store_.ListWorkers();
  if (!workers.ok()) return ToGrpcStatus(workers.status());
  for (const auto& w : *workers) ToProto(w, resp->add_workers());
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------------------------

grpc::Status WorkerServiceImpl::Register(grpc::ServerContext*, const v1::RegisterRequest* req, v1::RegisterResponse* resp) {
  if (req->name().empty() || req->name().size() > 128) {
    return ToGrpcStatus(InvalidFields({{"name", "expected 1..128 characters identifying the worker"}}));
  }
  const auto& c = req->capabilities();
  if (c.gpus() < 0 || c.slots() < 0 || c.cpu_threads() < 0) {
    return ToGrpcStatus(InvalidFields({{"capabilities", "gpus, slots and cpu_threads must be >= 0"}}));
  }
  json caps = {{"gpus", c.gpus()}, {"cpu_threads", c.cpu_threads()}, {"slots", c.slots()},
               {"gpu_memory_bytes", std::vector<int64_t>(c.gpu_memory_bytes().begin(), c.gpu_memory_bytes().end())}};
  auto id = store_.RegisterWorker(req->name(), req->hostname(), caps.dump(), req->version(), clock_.Now());
  if (!id.ok()) return ToGrpcStatus(id.status());
  resp->set_worker_id(*id);
  resp->set_heartbeat_interval_ms(config_.heartbeat_interval.count());
  resp->set_lease_duration_ms(config_.lease.count());
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* WorkerServiceImpl::OnHandlerPool(grpc::CallbackServerContext* ctx,
                                                           std::function<grpc::Status()> body) {
  auto* reactor = ctx->DefaultReactor();
  handlers_.Submit([reactor, body = std::move(body)] { reactor->Finish(body()); });
  return reactor;
}

grpc::ServerUnaryReactor* WorkerServiceImpl::AcquireJob(grpc::CallbackServerContext* ctx,
                                                        const v1::AcquireJobRequest* req, v1::AcquireJobResponse* resp) {
  return OnHandlerPool(ctx, [=, this] { return AcquireJobBlocking(ctx, req, resp); });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::Complete(grpc::CallbackServerContext* ctx, const v1::CompleteRequest* req,
                                                      v1::CompleteResponse*) {
  return OnHandlerPool(ctx, [=, this] { return CompleteBlocking(req); });
}

grpc::Status WorkerServiceImpl::AcquireJobBlocking(grpc::ServerContextBase* ctx, const v1::AcquireJobRequest* req,
                                                   v1::AcquireJobResponse* resp) {
  if (auto s = CheckId("worker_id", req->worker_id()); !s.ok()) return ToGrpcStatus(s);
  if (req->free_gpus() < 0) return ToGrpcStatus(InvalidFields({{"free_gpus", "expected >= 0"}}));
  if (req->wait_timeout_ms() < 0 || req->wait_timeout_ms() > 60000) {
    return ToGrpcStatus(InvalidFields({{"wait_timeout_ms", Cat("got ", req->wait_timeout_ms(), "; expected 0..60000")}}));
  }
  // The long-poll deadline and the claim latency are real elapsed time; lease times come from the
  // injected clock.
  const auto arrived = std::chrono::steady_clock::now();
  const auto wait = std::min<Duration>(Duration(req->wait_timeout_ms()), config_.max_poll);
  const auto give_up = arrived + wait;
  while (true) {
    // A worker that gave up on this call would never learn of a job claimed for it.
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
    const uint64_t gen = wakeups_.jobs().generation();
    const auto started = clock_.Now();
    const uint64_t mark = metrics_ ? metrics_->Mark() : 0;
    auto claimed = claims_.Call({req->worker_id(), req->free_gpus()});
    if (!claimed.ok()) return ToGrpcStatus(claimed.status());
    if (claimed->has_value() && (*claimed)->note != storage::ClaimNote::kNone) {
      // Gangs (docs/reliability.md): pick up a member lease another worker's offer formed, or offer this
      // worker to the waiting head gang until this poll ends, which may form it now.
      auto gang = GangStep(*req, (*claimed)->note, give_up);
      if (!gang.ok()) return ToGrpcStatus(gang.status());
      *claimed = std::move(*gang);
    }
    if (claimed->has_value()) {
      const auto& c = **claimed;
      auto spec = ResolveInputs(c);
      if (!spec.ok()) {
        // No attempt can do better than this one (the stored arguments do not change), and an
        // error would only send the worker into backoff with the job still leased to it: fail
        // the job for good, where the pipeline's owner sees why, and look for other work.
        const std::string error = Cat("the scheduler could not prepare job ", c.job.name,
                                      " for a worker: ", spec.status().message()).substr(0, 8192);
        auto failed = store_.FailJob(req->worker_id(), c.job.id, c.job.attempt, error, /*retryable=*/false,
                                     /*cancelled=*/false, /*checkpoint_uri=*/"", config_.retry, clock_.Now());
        if (failed.ok()) {
          if (metrics_) metrics_->OnFail(c.job.id, *failed);
          wakeups_.EventsChanged();
        } else if (!absl::IsFailedPrecondition(failed.status()) && !absl::IsNotFound(failed.status())) {
          // Stale (the attempt ended meanwhile: cancelled, reaped) needs nothing more; only a
          // database error goes back, and the reaper requeues the lease if the worker never returns.
          return ToGrpcStatus(failed.status());
        }
        continue;
      }
      auto* job = resp->mutable_job();
      job->set_job_id(c.job.id);
      job->set_attempt(c.job.attempt);
      job->set_pipeline_id(c.job.pipeline_id);
      job->set_pipeline_name(c.pipeline_name);
      job->set_name(c.job.name);
      job->set_kind(JobKindFromString(c.job.kind));
      job->set_spec_json(spec->dump());
      const std::string dir = JobDir(config_.artifact_root, c.job.pipeline_id, c.job.name);
      RememberJobDir(c.job.id, dir);
      job->set_output_uri(PathToFileUri(dir + "/model"));
      job->set_checkpoint_uri(PathToFileUri(dir + "/checkpoints"));
      job->set_resume_from_uri(c.job.checkpoint_uri);
      if (c.job.lease_deadline) SetTime(*c.job.lease_deadline, job->mutable_lease_deadline());
      job->mutable_resources()->set_gpus(c.job.gpus);
      job->mutable_resources()->set_ranks(c.job.ranks);
      if (c.job.nodes > 1) {
        job->mutable_resources()->set_nodes(c.job.nodes);
        job->set_node_rank(c.node_rank);
        job->set_nodes(c.job.nodes);
        job->set_rendezvous(c.job.rendezvous);
      }
      if (ctx->IsCancelled()) {
        // Cancelled while the claim was at the database: hand the job back at once, as an interruption
        // (no attempt spent), instead of letting its lease expire as a failure of an attempt that never ran.
        auto back = store_.FailJob(req->worker_id(), c.job.id, c.job.attempt,
                                   "the worker's AcquireJob call was cancelled before the job reached it", true, false,
                                   "", config_.retry, clock_.Now(), /*interrupted=*/true);
        if (back.ok()) wakeups_.JobsChanged();
        return grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled");
      }
      if (metrics_) {
        metrics_->OnClaim(c, started, std::chrono::duration<double>(std::chrono::steady_clock::now() - arrived).count(), mark);
      }
      // There may be more where this came from: pass the wake-up on, to two waiters, so a burst of
      // new jobs reaches every idle worker in a few steps while an empty queue stops the chain.
      wakeups_.jobs().NotifyOne(2);
      wakeups_.EventsChanged();
      return grpc::Status::OK;
    }
    if (stopping_ || ctx->IsCancelled() || std::chrono::steady_clock::now() >= give_up) return grpc::Status::OK;
    const auto left = std::chrono::duration_cast<Duration>(give_up - std::chrono::steady_clock::now());
    // Wakes on any commit that makes a job claimable; the cap re-checks backoff expiries.
    wakeups_.jobs().WaitFor(gen, std::min<Duration>(left, std::chrono::seconds(1)));
  }
}

absl::StatusOr<std::optional<storage::ClaimedJob>> WorkerServiceImpl::GangStep(
    const v1::AcquireJobRequest& req, storage::ClaimNote note, std::chrono::steady_clock::time_point give_up) {
  const TimePoint now = clock_.Now();
  if (note == storage::ClaimNote::kMemberLeaseWaiting) return store_.TakeMemberLease(req.worker_id(), now);
  // The offer lasts as long as this poll waits, plus a heartbeat's slack for the worker's next poll.
  const auto left = std::chrono::duration_cast<Duration>(give_up - std::chrono::steady_clock::now());
  auto offer = store_.OfferToGangs(req.worker_id(), req.free_gpus(), now + std::max<Duration>(left, Duration(0)) +
                                                                         config_.heartbeat_interval,
                                   config_.lease, now);
  if (!offer.ok()) return offer.status();
  if (!offer->formed_job_id.empty()) {
    if (metrics_) metrics_->OnGangFormed();
    // The other members polling here pick their leases up now (other replicas through NOTIFY btx_gangs).
    wakeups_.jobs().Notify();
    wakeups_.EventsChanged();
  }
  return std::move(offer->mine);
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req, v1::HeartbeatResponse* resp) {
  if (auto s = CheckId("worker_id", req->worker_id()); !s.ok()) return ToGrpcStatus(s);
  if (req->jobs_size() > 64) return ToGrpcStatus(InvalidFields({{"jobs", "more than 64 job reports"}}));
  std::vector<storage::JobReportRow> rows;
  for (int i = 0; i < req->jobs_size(); ++i) {
    const auto& r = req->jobs(i);
    if (auto s = CheckId(Cat("jobs[", i, "].job_id"), r.job_id()); !s.ok()) return ToGrpcStatus(s);
    if (r.logs_size() > 2000) return ToGrpcStatus(InvalidFields({{Cat("jobs[", i, "].logs"), "more than 2000 lines"}}));
    storage::JobReportRow row{.job_id = r.job_id(), .attempt = r.attempt(), .checkpoint_uri = r.checkpoint_uri()};
    if (!r.rendezvous().empty()) {
      if (auto s = CheckRendezvous(Cat("jobs[", i, "].rendezvous"), r.rendezvous()); !s.ok()) return ToGrpcStatus(s);
      row.rendezvous = r.rendezvous();
    }
    if (!r.checkpoint_uri().empty()) {
      if (auto s = CheckAssignedUri(Cat("jobs[", i, "].checkpoint_uri"), r.job_id(), r.attempt(), r.checkpoint_uri(),
                                  Assigned::kCheckpoint);
          !s.ok()) {
        return ToGrpcStatus(s);
      }
    }
    if (r.has_progress()) {
      const auto& p = r.progress();
      row.step = p.step();
      row.loss = p.loss();
      row.tokens_per_second = p.tokens_per_second();
      row.learning_rate = p.learning_rate();
      row.progress_json = json{{"step", p.step()}, {"total_steps", p.total_steps()}, {"loss", p.loss()},
                               {"lr", p.learning_rate()}, {"tokens_per_s", p.tokens_per_second()},
                               {"tokens", p.tokens()}, {"eta_s", p.eta_seconds()}}
                              .dump();
    }
    for (const auto& l : r.logs()) {
      storage::LogRecord rec{0, r.attempt(), l.stream().substr(0, 16), l.text().substr(0, 8192), clock_.Now(), l.seq()};
      row.logs.push_back(std::move(rec));
    }
    rows.push_back(std::move(row));
  }
  const uint64_t mark = metrics_ ? metrics_->Mark() : 0;
  const TimePoint now = clock_.Now();
  auto directives =
      store_.Heartbeat(req->worker_id(), rows, req->draining(), config_.lease, now, config_.ProgressEventInterval());
  if (!directives.ok()) return ToGrpcStatus(directives.status());
  if (metrics_) {
    for (size_t i = 0; i < directives->size() && static_cast<int>(i) < req->jobs_size(); ++i) {
      const auto& r = req->jobs(static_cast<int>(i));
      ReportedProgress p;
      if (r.has_progress()) {
        p = {r.progress().step(), r.progress().total_steps(), r.progress().loss(), r.progress().tokens_per_second(),
             r.progress().eta_seconds()};
      }
      metrics_->OnHeartbeat((*directives)[i], r.has_progress() ? &p : nullptr, now, mark);
    }
  }
  for (const auto& d : *directives) {
    auto* out = resp->add_jobs();
    out->set_job_id(d.job_id);
    out->set_attempt(d.attempt);
    out->set_directive(d.directive == storage::Directive::kContinue ? v1::JOB_DIRECTIVE_CONTINUE
                       : d.directive == storage::Directive::kCancel ? v1::JOB_DIRECTIVE_CANCEL
                                                                    : v1::JOB_DIRECTIVE_LEASE_LOST);
    if (d.lease_deadline) SetTime(*d.lease_deadline, out->mutable_lease_deadline());
    if (!d.rendezvous.empty()) out->set_rendezvous(d.rendezvous);
  }
  if (!rows.empty()) wakeups_.EventsChanged();
  return grpc::Status::OK;
}

// A worker may not point a job's dependents (or a retry's resume) at any file outside what the job was given.
void WorkerServiceImpl::RememberJobDir(const std::string& job_id, std::string dir) {
  constexpr size_t kMax = 100000;
  std::lock_guard lock(job_dirs_mu_);
  if (job_dirs_.insert_or_assign(job_id, std::move(dir)).second) job_dirs_order_.push_back(job_id);
  while (job_dirs_order_.size() > kMax) {
    job_dirs_.erase(job_dirs_order_.front());
    job_dirs_order_.pop_front();
  }
}

std::optional<std::string> WorkerServiceImpl::RememberedJobDir(const std::string& job_id) {
  std::lock_guard lock(job_dirs_mu_);
  auto it = job_dirs_.find(job_id);
  if (it == job_dirs_.end()) return std::nullopt;
  return it->second;
}

absl::Status WorkerServiceImpl::CheckAssignedUri(const std::string& field, const std::string& job_id, int attempt,
                                                  const std::string& uri, Assigned what) {
  auto path = artifacts_.PathOf(uri);
  if (!path.ok()) return InvalidFields({{field, std::string(path.status().message())}});
  auto fits = [&](const std::string& dir) {
    return what == Assigned::kOutput ? *path == dir + "/model" : path->rfind(dir + "/checkpoints/", 0) == 0;
  };
  // The common case, a URI that fits the job claimed here, needs no database read; anything else is looked up.
  if (auto dir = RememberedJobDir(job_id); dir && fits(*dir)) return absl::OkStatus();
  auto job = store_.GetJob(job_id);
  // An unknown job or another attempt is the store's to refuse (the fence), with the status every stale call gets.
  if (absl::IsNotFound(job.status())) return absl::OkStatus();
  if (!job.ok()) return job.status();
  if (job->attempt != attempt) return absl::OkStatus();
  const std::string dir = JobDir(config_.artifact_root, job->pipeline_id, job->name);
  if (what == Assigned::kOutput) {
    if (*path == dir + "/model") return absl::OkStatus();
    return InvalidFields({{field, Cat("'", uri, "' is not the output assigned to job ", job_id, " (", PathToFileUri(dir + "/model"), ")")}});
  }
  if (path->rfind(dir + "/checkpoints/", 0) == 0) return absl::OkStatus();
  return InvalidFields({{field, Cat("'", uri, "' is not below the checkpoint dir assigned to job ", job_id, " (",
                                    PathToFileUri(dir + "/checkpoints"), ")")}});
}

grpc::Status WorkerServiceImpl::CompleteBlocking(const v1::CompleteRequest* req) {
  if (auto s = CheckId("worker_id", req->worker_id()); !s.ok()) return ToGrpcStatus(s);
  if (auto s = CheckId("job_id", req->job_id()); !s.ok()) return ToGrpcStatus(s);
  if (auto s = CheckAssignedUri("artifact_uri", req->job_id(), req->attempt(), req->artifact_uri(), Assigned::kOutput); !s.ok()) {
    return ToGrpcStatus(s);
  }
  if (!req->result_json().empty()) {
    const json result = json::parse(req->result_json(), nullptr, false);
    if (!result.is_object()) return ToGrpcStatus(InvalidFields({{"result_json", "expected a JSON object"}}));
    if (HoldsNul(result)) {
      return ToGrpcStatus(InvalidFields({{"result_json", "a string holds \\u0000, which the database cannot store"}}));
    }
  }
  auto readied = completions_.Call({.worker_id = req->worker_id(), .job_id = req->job_id(), .attempt = req->attempt(),
                                     .artifact_uri = req->artifact_uri(), .result_json = req->result_json()});
  if (readied.ok()) {
    if (metrics_) metrics_->OnComplete(req->job_id());
    if (*readied > 0) wakeups_.JobsChanged();
    wakeups_.EventsChanged();
  }
  return ToGrpcStatus(readied.status());
}

std::vector<storage::ClaimOutcome> WorkerServiceImpl::RunClaims(std::vector<ClaimCall>& calls) {
  if (metrics_) metrics_->OnBatch("claim", calls.size());
  std::vector<std::string> workers;
  for (const auto& c : calls) workers.push_back(c.worker_id);
  // The batcher groups calls by free_gpus.
  auto claimed = store_.ClaimJobs(workers, calls.front().free_gpus, config_.lease, clock_.Now());
  if (!claimed.ok()) return std::vector<storage::ClaimOutcome>(calls.size(), claimed.status());
  return std::move(*claimed);
}

std::vector<absl::StatusOr<int>> WorkerServiceImpl::RunCompletions(std::vector<storage::Completion>& completions) {
  if (metrics_) metrics_->OnBatch("complete", completions.size());
  const TimePoint now = clock_.Now();
  std::vector<absl::StatusOr<int>> out;
  if (completions.size() > 1) {
    auto done = store_.CompleteJobs(completions, now);
    if (done.ok()) {
      for (const auto& d : *done) out.push_back(d.status.ok() ? absl::StatusOr<int>(d.readied) : d.status);
      return out;
    }
    // Nothing was applied; one entry's error must not become the answer to the others.
  }
  for (const auto& c : completions) {
    int readied = 0;
    auto s = store_.CompleteJob(c.worker_id, c.job_id, c.attempt, c.artifact_uri, c.result_json, now, &readied);
    out.push_back(s.ok() ? absl::StatusOr<int>(readied) : s);
  }
  return out;
}

grpc::Status WorkerServiceImpl::Fail(grpc::ServerContext*, const v1::FailRequest* req, v1::FailResponse*) {
  if (auto s = CheckId("worker_id", req->worker_id()); !s.ok()) return ToGrpcStatus(s);
  if (auto s = CheckId("job_id", req->job_id()); !s.ok()) return ToGrpcStatus(s);
  if (!req->checkpoint_uri().empty()) {
    if (auto s = CheckAssignedUri("checkpoint_uri", req->job_id(), req->attempt(), req->checkpoint_uri(),
                                    Assigned::kCheckpoint); !s.ok()) {
      return ToGrpcStatus(s);
    }
  }
  auto out = store_.FailJob(req->worker_id(), req->job_id(), req->attempt(), std::string(Utf8Prefix(req->error(), 8192)),
                            req->retryable(), req->cancelled(), req->checkpoint_uri(), config_.retry, clock_.Now(),
                            req->interrupted());
  if (out.ok()) {
    if (metrics_) metrics_->OnFail(req->job_id(), *out);
    // A retry becomes claimable after its backoff, which long polls re-check on their own.
    wakeups_.EventsChanged();
  }
  return ToGrpcStatus(out.status());
}

}  // namespace btx::scheduler
