#include "convert.h"

#include <nlohmann/json.hpp>

#include "btx/contract/job.h"

namespace btx::scheduler {
using json = nlohmann::json;

void SetTime(TimePoint t, google::protobuf::Timestamp* ts) {
  int64_t us = ToUnixMicros(t);
  ts->set_seconds(us / 1000000);
  ts->set_nanos(static_cast<int32_t>((us % 1000000) * 1000));
}

btx::v1::JobState JobStateFromString(const std::string& s) {
  btx::v1::JobState st;
  return btx::v1::JobState_Parse("JOB_STATE_" + s, &st) ? st : btx::v1::JOB_STATE_UNSPECIFIED;
}
std::string JobStateToString(btx::v1::JobState s) {
  return s == btx::v1::JOB_STATE_UNSPECIFIED ? "" : btx::v1::JobState_Name(s).substr(10);
}
btx::v1::PipelineState PipelineStateFromString(const std::string& s) {
  btx::v1::PipelineState st;
  return btx::v1::PipelineState_Parse("PIPELINE_STATE_" + s, &st) ? st : btx::v1::PIPELINE_STATE_UNSPECIFIED;
}
std::string PipelineStateToString(btx::v1::PipelineState s) {
  return s == btx::v1::PIPELINE_STATE_UNSPECIFIED ? "" : btx::v1::PipelineState_Name(s).substr(15);
}
// The contract numbers its kinds as the API does (JobKinds.ContractTableAndApiAgree checks every row).
static_assert(static_cast<int>(contract::JobKind::kPretrain) == btx::v1::JOB_KIND_PRETRAIN);
static_assert(static_cast<int>(contract::JobKind::kBranch) == btx::v1::JOB_KIND_BRANCH);
static_assert(static_cast<int>(contract::JobKind::kMerge) == btx::v1::JOB_KIND_MERGE);
static_assert(static_cast<int>(contract::JobKind::kFinetune) == btx::v1::JOB_KIND_FINETUNE);
static_assert(static_cast<int>(contract::JobKind::kEval) == btx::v1::JOB_KIND_EVAL);

btx::v1::JobKind JobKindFromString(const std::string& s) {
  const contract::JobKindInfo* k = contract::FindJobKind(s);
  return k != nullptr ? static_cast<btx::v1::JobKind>(k->kind) : btx::v1::JOB_KIND_UNSPECIFIED;
}

static void ProgressFromJson(const std::string& text, btx::v1::Progress* p) {
  json j = json::parse(text, nullptr, false);
  if (!j.is_object()) return;
  p->set_step(j.value("step", int64_t{0}));
  p->set_total_steps(j.value("total_steps", int64_t{0}));
  p->set_loss(j.value("loss", 0.0));
  p->set_learning_rate(j.value("lr", 0.0));
  p->set_tokens_per_second(j.value("tokens_per_s", 0.0));
  p->set_tokens(j.value("tokens", int64_t{0}));
  p->set_eta_seconds(j.value("eta_s", 0.0));
}

void ToProto(const storage::JobRecord& j, btx::v1::Job* out) {
  out->set_id(j.id);
  out->set_pipeline_id(j.pipeline_id);
  out->set_name(j.name);
  out->set_kind(JobKindFromString(j.kind));
  out->set_state(JobStateFromString(j.state));
  out->set_attempt(j.attempt);
  out->set_max_attempts(j.max_attempts);
  for (const auto& d : j.depends_on) out->add_depends_on(d);
  out->set_worker_id(j.worker_id);
  if (j.lease_deadline) SetTime(*j.lease_deadline, out->mutable_lease_deadline());
  if (j.ready_at) SetTime(*j.ready_at, out->mutable_ready_at());
  ProgressFromJson(j.progress_json, out->mutable_progress());
  out->set_checkpoint_uri(j.checkpoint_uri);
  out->set_artifact_uri(j.artifact_uri);
  out->set_error(j.error);
  out->set_spec_json(j.spec_json);
  out->set_result_json(j.result_json);
  out->mutable_resources()->set_gpus(j.gpus);
  out->mutable_resources()->set_ranks(j.ranks);
  if (j.nodes > 1) out->mutable_resources()->set_nodes(j.nodes);
  for (const auto& m : j.members) {
    auto* g = out->add_members();
    g->set_node_rank(m.node_rank);
    g->set_worker_id(m.worker_id);
    g->set_worker_name(m.worker_name);
    SetTime(m.lease_deadline, g->mutable_lease_deadline());
    g->set_delivered(m.delivered);
  }
  out->set_pending_reason(j.pending_reason);
  if (j.state == storage::job_state::kLeased) out->set_rendezvous(j.rendezvous);
  out->set_cancel_requested(j.cancel_requested);
  SetTime(j.created_at, out->mutable_created_at());
  if (j.started_at) SetTime(*j.started_at, out->mutable_started_at());
  if (j.finished_at) SetTime(*j.finished_at, out->mutable_finished_at());
}

void ToProto(const storage::PipelineRecord& p, btx::v1::Pipeline* out) {
  out->set_id(p.id);
  out->set_name(p.name);
  out->set_state(PipelineStateFromString(p.state));
  out->set_spec(p.spec_json);
  out->set_idempotency_key(p.idempotency_key);
  out->set_error(p.error);
  out->set_result_json(p.result_json);
  SetTime(p.created_at, out->mutable_created_at());
  SetTime(p.updated_at, out->mutable_updated_at());
  out->set_jobs_total(p.jobs_total);
  out->set_jobs_succeeded(p.jobs_succeeded);
  for (const auto& j : p.jobs) ToProto(j, out->add_jobs());
}

void ToProto(const storage::WorkerRecord& w, btx::v1::Worker* out) {
  out->set_id(w.id);
  out->set_name(w.name);
  out->set_hostname(w.hostname);
  json caps = json::parse(w.capabilities_json, nullptr, false);
  if (caps.is_object()) {
    out->mutable_capabilities()->set_gpus(caps.value("gpus", 0));
    out->mutable_capabilities()->set_cpu_threads(caps.value("cpu_threads", 0));
    out->mutable_capabilities()->set_slots(caps.value("slots", 0));
    if (caps.contains("gpu_memory_bytes") && caps["gpu_memory_bytes"].is_array()) {
      for (const auto& m : caps["gpu_memory_bytes"]) out->mutable_capabilities()->add_gpu_memory_bytes(m.get<int64_t>());
    }
  }
  btx::v1::WorkerState st;
  out->set_state(btx::v1::WorkerState_Parse("WORKER_STATE_" + w.state, &st) ? st : btx::v1::WORKER_STATE_UNSPECIFIED);
  SetTime(w.registered_at, out->mutable_registered_at());
  SetTime(w.last_seen, out->mutable_last_seen());
  for (const auto& j : w.running_job_ids) out->add_running_job_ids(j);
  out->set_version(w.version);
}

void ToProto(const storage::EventRecord& e, btx::v1::Event* out) {
  out->set_id(e.id);
  out->set_pipeline_id(e.pipeline_id);
  out->set_job_id(e.job_id);
  out->set_job_name(e.job_name);
  out->set_type(e.type);
  SetTime(e.created_at, out->mutable_time());
  json p = json::parse(e.payload_json, nullptr, false);
  if (!p.is_object()) return;
  if (p.contains("pipeline_state")) out->set_pipeline_state(PipelineStateFromString(p["pipeline_state"]));
  if (p.contains("state")) out->set_job_state(JobStateFromString(p["state"]));
  if (p.contains("message") && p["message"].is_string()) out->set_message(p["message"]);
  if (p.contains("attempt")) out->set_attempt(p["attempt"].get<int>());
  if (p.contains("progress")) ProgressFromJson(p["progress"].dump(), out->mutable_progress());
}

}  // namespace btx::scheduler
