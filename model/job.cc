#include "btx/model/job.h"

#include <ATen/Parallel.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "btx/contract/files.h"
#include "btx/contract/inputs.h"
#include "btx/model/data.h"
#include "btx/model/eval.h"
#include "btx/model/hf_io.h"
#include "btx/model/merge.h"
#include "btx/model/tokenizer.h"
#include "btx/model/memory_model.h"
#include "btx/model/trainer.h"

namespace btx::model {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// JOB.json as the contract parsed it, plus what the process was given to run it with.
struct Job {
  contract::JobFile file;
  std::string device = "cpu";  // the LibTorch device: "cpu" or "cuda:0"
  int progress_fd = -1;
  const std::atomic<bool>* stop = nullptr;
  std::unique_ptr<DataParallel> dp;  // several ranks (distributed.h)
  bool follower() const { return dp && dp->rank() != 0; }
  const std::string& output_dir() const { return file.output_dir; }
  const std::string& checkpoint_dir() const { return file.checkpoint_dir; }
};

void EmitEvent(const Job& job, const json& ev) {
  if (job.progress_fd < 0) return;
  std::string line = ev.dump() + "\n";
  size_t off = 0;
  while (off < line.size()) {
    ssize_t w = ::write(job.progress_fd, line.data() + off, line.size() - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;  // the reader went away; logging continues on stderr
    }
    off += static_cast<size_t>(w);
  }
}

Status Invalid(const std::string& field, const std::string& why) { return InvalidArgument(field + ": " + why); }

// Model dirs are the one input the spec's parser cannot check: they must exist when the job runs.
Status ModelDirExists(const std::string& field, const std::string& dir) {
  if (!fs::is_directory(dir)) return Invalid(field, "model dir " + dir + " does not exist");
  return Status::Ok();
}

// The tokenizer a spec names for a seed without one; kTrainSentencePiece trains it once per job into a stable
// place (work_dir) so that every attempt tokenizes identically.
StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromSpec(const contract::TokenizerSpec& t,
                                                       const std::vector<std::string>& train_paths,
                                                       const std::string& work_dir) {
  using Kind = contract::TokenizerSpec::Kind;
  if (t.kind == Kind::kByte) return MakeByteTokenizer();
  if (t.kind == Kind::kSentencePiece) return LoadSentencePiece(t.path);
  const std::string path = work_dir + "/tokenizer.model";
  if (fs::exists(path)) return LoadSentencePiece(path);
  fs::create_directories(work_dir);
  BTX_ASSIGN_OR_RETURN(auto files, ExpandDataPaths(train_paths));
  std::vector<std::string> text;
  for (auto& f : files)
    if (!f.ends_with(".btxtok")) text.push_back(f);
  return TrainSentencePiece(text, static_cast<int>(t.vocab_size), path);
}

// The tokenizer a model dir carries, else the one the spec names. Guessing (e.g. bytes for a model trained
// with another tokenizer) would train on garbage silently, so neither is an invalid job.
StatusOr<std::unique_ptr<Tokenizer>> ModelTokenizer(const std::optional<contract::TokenizerSpec>& spec,
                                                    const std::string& field, const std::string& dir) {
  if (HasTokenizer(dir)) {
    auto tok = LoadTokenizer(dir);
    if (!tok.ok()) return tok.status().With(field);
    return tok;
  }
  if (!spec) return Invalid("spec.tokenizer", "required: " + dir + " has no btx_tokenizer.json or tokenizer.model");
  auto tok = TokenizerFromSpec(*spec, {}, dir);
  if (!tok.ok()) return tok.status().With("spec.tokenizer");
  return tok;
}

Status PublishModel(const Job& job, const LlamaModel& model, const Tokenizer* tok) {
  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(job.output_dir()));
  FileDigests weights;  // hashed as written: the manifest does not read them again
  BTX_RETURN_IF_ERROR(WriteModelFiles(model, staged.path(), {}, &weights));
  if (tok) BTX_RETURN_IF_ERROR(tok->SaveTo(staged.path()));
  return staged.Publish(weights);
}

struct TrainRun {
  LlamaModel model;
  std::unique_ptr<Tokenizer> tok;
  std::vector<DomainData> data;
  TrainConfig train;
  TrainOptions opts;
};

StatusOr<DomainData> LoadDomain(const std::string& field, const std::string& name, double weight,
                                const contract::DataSpec& d, const Tokenizer& tok, int64_t vocab, int64_t valid_tokens) {
  DomainData out;
  out.name = name;
  out.weight = weight;
  DataFormatOptions format;
  BTX_ASSIGN_OR_RETURN(format.format, ParseDataFormat(d.format));
  format.text_field = d.text_field;
  auto train = LoadData(d.train, tok, format, 0, vocab);
  if (!train.ok()) return train.status().With(field + ".train");
  out.train = train->tokens;
  out.train_loss = train->loss;
  if (!d.valid.empty()) {
    auto valid = LoadData(d.valid, tok, format, valid_tokens + 1, vocab);
    if (!valid.ok()) return valid.status().With(field + ".valid");
    out.valid = valid->tokens;
    out.valid_loss = valid->loss;
  }
  return out;
}

// Runs the trainer with checkpoints/resume and publishes the result; returns the exit code.
StatusOr<int> TrainAndPublish(Job& job, TrainRun& run) {
  TrainHooks hooks;
  hooks.emit = [&](const json& ev) { EmitEvent(job, ev); };
  const Tokenizer* tok = run.tok.get();
  hooks.extra_files = [tok](const std::string& dir) { return tok->SaveTo(dir); };
  hooks.stop = job.stop;
  run.opts.checkpoint_dir = job.checkpoint_dir();
  run.opts.device = job.device;
  run.opts.dp = job.dp.get();
  Trainer trainer(&run.model, run.train, run.opts, std::move(run.data), hooks);
  BTX_RETURN_IF_ERROR(trainer.Init());
  // After every input check: an invalid job's stderr is its one error line.
  std::cerr << "btx-train: " << contract::JobKindName(job.file.kind) << " " << job.file.name << " attempt "
            << job.file.attempt << " on " << job.device << ", " << at::get_num_threads() << " CPU threads, tokenizer "
            << tok->kind() << " (" << tok->vocab_size() << " tokens)\n";
  std::cerr << "btx-train: "
            << DescribeTrainingMemory(run.model, run.train, job.dp ? job.dp->world_size() : 1, job.device) << "\n";
  BTX_RETURN_IF_ERROR(trainer.ResumeFromLatest());
  BTX_ASSIGN_OR_RETURN(TrainOutcome outcome, trainer.Run());
  std::cerr << "btx-train: " << DescribeMeasuredPeak(c10::Device(job.device)) << "\n";
  if (outcome == TrainOutcome::kInterrupted) {
    std::cerr << "btx: interrupted at step " << trainer.step() << ", checkpoint " << trainer.last_checkpoint() << "\n";
    return kExitInterrupted;
  }
  // Every rank holds the trained model; rank 0 validates and publishes it.
  if (job.follower()) return kExitOk;
  json metrics = {{"train_loss", trainer.last_loss()}, {"steps", trainer.step()}};
  auto valid = trainer.Validate();
  if (!valid.empty()) {
    double sum = 0;
    for (auto& [name, loss] : valid) {
      metrics["valid_loss/" + name] = loss;
      sum += loss;
    }
    metrics["valid_loss"] = sum / static_cast<double>(valid.size());
  }
  EmitEvent(job, {{"event", "metrics"}, {"metrics", metrics}});
  LlamaModel cpu = run.model;
  cpu.To(c10::kCPU);
  BTX_RETURN_IF_ERROR(PublishModel(job, cpu, tok));
  EmitEvent(job, {{"event", "done"}, {"artifact", fs::absolute(job.output_dir()).string()}, {"metrics", metrics}});
  return kExitOk;
}

// The model dir a branch or finetune starts from, with its tokenizer.
Status LoadStart(TrainRun& run, const std::string& field, const std::string& dir,
                 const std::optional<contract::TokenizerSpec>& tokenizer) {
  BTX_RETURN_IF_ERROR(ModelDirExists(field, dir));
  auto model = LoadModelDir(dir);
  if (!model.ok()) return model.status().With(field);
  run.model = std::move(*model);
  BTX_ASSIGN_OR_RETURN(run.tok, ModelTokenizer(tokenizer, field, dir));
  return Status::Ok();
}

StatusOr<int> RunPretrain(Job& job, const contract::PretrainSpec& s) {
  TrainRun run;
  run.train = s.train;
  run.opts.steps = s.steps;
  const std::string work = job.checkpoint_dir().empty() ? job.output_dir() + ".work" : job.checkpoint_dir();
  auto tok = TokenizerFromSpec(s.tokenizer, s.data.train, work);
  if (!tok.ok()) return tok.status().With("spec.tokenizer");
  run.tok = std::move(*tok);
  auto cfg = ConfigFromInit(s.init, run.tok->vocab_size(), run.tok->bos_id(), run.tok->eos_id());
  if (!cfg.ok()) return cfg.status().With("spec.init");
  auto model = LlamaModel::Init(*cfg, run.train.seed);
  if (!model.ok()) return model.status().With("spec.init");
  run.model = std::move(*model);
  BTX_ASSIGN_OR_RETURN(auto dom, LoadDomain("spec.data", "train", 1.0, s.data, *run.tok, cfg->vocab_size,
                                            run.train.valid_tokens));
  run.data.push_back(std::move(dom));
  return TrainAndPublish(job, run);
}

StatusOr<int> RunBranch(Job& job, const contract::BranchSpec& s) {
  TrainRun run;
  run.train = s.train;
  run.opts.steps = s.steps;
  BTX_RETURN_IF_ERROR(LoadStart(run, "spec.seed", s.seed, s.tokenizer));
  BTX_ASSIGN_OR_RETURN(auto dom, LoadDomain("spec.data", s.name, 1.0, s.data, *run.tok,
                                            run.model.config().vocab_size, run.train.valid_tokens));
  run.data.push_back(std::move(dom));
  return TrainAndPublish(job, run);
}

StatusOr<int> RunFinetune(Job& job, const contract::FinetuneSpec& s) {
  TrainRun run;
  run.train = s.train;
  run.opts.steps = s.steps;
  run.opts.freeze = s.freeze;
  BTX_RETURN_IF_ERROR(LoadStart(run, "spec.model", s.model, s.tokenizer));
  ModelConfig& cfg = run.model.mutable_config();
  if (!cfg.is_moe()) return Invalid("spec.model", s.model + " is not an MoE (Mixtral) model");
  if (s.top_k) cfg.num_experts_per_tok = *s.top_k;
  if (s.load_balance) cfg.router_aux_loss_coef = *s.load_balance;
  if (s.z_loss) cfg.router_z_loss_coef = *s.z_loss;
  if (s.router) cfg.router = *s.router;
  Status v = cfg.Validate();
  if (!v.ok()) return v.With("spec");
  if (cfg.router == "sparsemixer" && !KernelsAvailable())
    return FailedPrecondition("spec.router: sparsemixer needs the btx kernels library, which this build lacks");
  for (size_t i = 0; i < s.mixture.size(); ++i) {
    const auto& m = s.mixture[i];
    BTX_ASSIGN_OR_RETURN(auto dom, LoadDomain("spec.mixture[" + std::to_string(i) + "]", m.name, m.weight, m.data,
                                              *run.tok, cfg.vocab_size, run.train.valid_tokens));
    run.data.push_back(std::move(dom));
  }
  return TrainAndPublish(job, run);
}

StatusOr<int> RunMerge(Job& job, const contract::MergeSpec& m) {
  for (size_t i = 0; i < m.experts.size(); ++i) {
    BTX_RETURN_IF_ERROR(ModelDirExists("spec.experts[" + std::to_string(i) + "].model", m.experts[i].second));
  }
  if (!m.seed.empty()) BTX_RETURN_IF_ERROR(ModelDirExists("spec.seed", m.seed));
  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(job.output_dir()));
  // The weights were hashed as they were written: the manifest does not read them again.
  FileDigests weights;
  Status st = MergeToDir(m, staged.path(), job.stop, &weights);
  if (st.code() == StatusCode::kCancelled) return kExitInterrupted;
  BTX_RETURN_IF_ERROR(st);
  BTX_RETURN_IF_ERROR(staged.Publish(weights));
  BTX_ASSIGN_OR_RETURN(ModelConfig out, LoadConfig(job.output_dir()));
  json metrics = {{"num_experts", out.num_local_experts}, {"method", m.method}};
  EmitEvent(job, {{"event", "done"}, {"artifact", fs::absolute(job.output_dir()).string()}, {"metrics", metrics}});
  return kExitOk;
}

StatusOr<int> RunEval(Job& job, const contract::EvalSpec& s) {
  for (size_t i = 0; i < s.models.size(); ++i) {
    const std::string field = "spec.models[" + std::to_string(i) + "]." + (s.models[i].ensemble ? "ensemble" : "model");
    for (const auto& d : s.models[i].dirs) BTX_RETURN_IF_ERROR(ModelDirExists(field, d));
  }
  EvalOptions opts;
  opts.max_tokens = s.max_tokens;
  opts.seq_len = s.seq_len;
  opts.top_tokens = s.top_tokens;
  opts.min_token_count = s.min_token_count;
  auto result = Evaluate(s.models, s.domains, opts, job.stop);
  if (!result.ok() && result.status().code() == StatusCode::kCancelled) return kExitInterrupted;
  if (!result.ok()) return result.status();
  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(job.output_dir()));
  BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/eval.json", result->dump(2)));
  const std::string text = EvalText(*result);
  BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/eval.txt", text));
  // Routing charts exist only when some model is an MoE.
  if (const std::string svg = RoutingSvg(*result); !svg.empty()) {
    BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/routing.svg", svg));
    if (const std::string png = RoutingPng(*result); !png.empty())
      BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/routing.png", png));
  }
  BTX_RETURN_IF_ERROR(staged.Publish());
  std::cerr << text;
  EmitEvent(job, {{"event", "done"}, {"artifact", fs::absolute(job.output_dir()).string()}, {"metrics", *result}});
  return kExitOk;
}

// One runner per kind of the contract's table; a kind without one does not compile warning-free (-Wswitch).
StatusOr<int> RunKind(Job& job) {
  const contract::JobSpec& spec = job.file.parsed;
  switch (job.file.kind) {
    case contract::JobKind::kPretrain: return RunPretrain(job, std::get<contract::PretrainSpec>(spec));
    case contract::JobKind::kBranch: return RunBranch(job, std::get<contract::BranchSpec>(spec));
    case contract::JobKind::kMerge: return RunMerge(job, std::get<contract::MergeSpec>(spec));
    case contract::JobKind::kFinetune: return RunFinetune(job, std::get<contract::FinetuneSpec>(spec));
    case contract::JobKind::kEval: return RunEval(job, std::get<contract::EvalSpec>(spec));
  }
  return Internal("no runner for job kind " + std::string(contract::JobKindName(job.file.kind)));
}

// Threads: the spec's train.threads when set, else what the worker gave the job. Device: "cuda" means every
// device the worker made visible; until multi-GPU training exists exactly one is usable, and more is refused
// rather than run on one of them.
Status ApplyResources(Job& job) {
  int64_t threads = job.file.threads;
  if (const auto* t = std::get_if<contract::PretrainSpec>(&job.file.parsed); t && t->train.threads > 0) threads = t->train.threads;
  if (const auto* t = std::get_if<contract::BranchSpec>(&job.file.parsed); t && t->train.threads > 0) threads = t->train.threads;
  if (const auto* t = std::get_if<contract::FinetuneSpec>(&job.file.parsed); t && t->train.threads > 0) threads = t->train.threads;
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
  if (job.file.device == "cuda") {
    const int visible = at::detail::getCUDAHooks().getNumGPUs();
    if (visible == 0) return FailedPrecondition("device: cuda was asked for, but no CUDA device is visible to this process");
    if (visible > 1) {
      return FailedPrecondition("device: this job was given " + std::to_string(visible) +
                                " CUDA devices; multi-GPU training is not supported yet (one device per job)");
    }
    job.device = "cuda:0";
  }
  BTX_ASSIGN_OR_RETURN(DistConfig dist, DistConfigFromEnv());
  if (dist.world_size > 1) {
    const auto kind = job.file.kind;
    if (kind != contract::JobKind::kPretrain && kind != contract::JobKind::kBranch && kind != contract::JobKind::kFinetune) {
      return InvalidArgument("kind: " + std::string(contract::JobKindName(kind)) + " runs as one rank, not " +
                             std::to_string(dist.world_size));
    }
    // CUDA ranks (one device each) sum over NCCL when this build has it, Gloo otherwise (distributed.h).
    dist.device = job.device;
    BTX_ASSIGN_OR_RETURN(job.dp, DataParallel::Join(dist));
    std::cerr << "btx-train: rank " << dist.rank << " of " << dist.world_size << " over " << job.dp->backend() << "\n";
    if (job.follower()) job.progress_fd = -1;  // progress comes from rank 0
  }
  return Status::Ok();
}

}  // namespace

namespace {

// A parent's output always carries a manifest. The scheduler lays a pipeline's outputs out as
// <artifact root>/<pipeline>/<job>/model, so a model dir of that shape beside this job's own output is a
// parent's; one without its manifest was damaged or tampered with and must not pass for a user's seed,
// which the loaders accept unchecked (they verify any manifest they find: only its presence is checked here).
Status CheckParentManifests(const Job& job) {
  const fs::path output = fs::path(job.output_dir()).lexically_normal();
  if (output.filename() != "model") return Status::Ok();
  const fs::path pipeline_dir = output.parent_path().parent_path();
  if (pipeline_dir.empty() || pipeline_dir == pipeline_dir.root_path()) return Status::Ok();
  for (const contract::Input& in : contract::InputsOf(job.file.parsed)) {
    if (in.kind != contract::InputKind::kModelDir) continue;
    const fs::path input = fs::path(in.path).lexically_normal();
    if (input.filename() != "model" || input.parent_path().parent_path() != pipeline_dir) continue;
    std::error_code ec;
    if (!fs::exists(fs::path(in.path) / kManifestName, ec)) {
      return DataLoss(in.field + ": " + in.path + " is a parent job's output without its " + kManifestName +
                      " (deleted or never published): refusing to load it unchecked");
    }
  }
  return Status::Ok();
}

}  // namespace

int RunJobFile(const std::string& job_path, int progress_fd, const std::atomic<bool>* stop) {
  auto text = ReadFile(job_path, size_t{64} << 20);
  auto parsed = text.ok() ? contract::ParseJobFileText(*text) : StatusOr<contract::JobFile>(text.status());
  if (!parsed.ok()) {
    std::cerr << "btx-train: invalid job: " << parsed.status().message() << "\n";
    return kExitInvalidJob;
  }
  Job job;
  job.file = std::move(*parsed);
  job.progress_fd = progress_fd;
  job.stop = stop;
  const std::string kind(contract::JobKindName(job.file.kind));
  // A previous attempt may have published and died before reporting: its verified output is the result.
  if (fs::exists(job.output_dir())) {
    Status v = VerifyManifest(job.output_dir());
    if (!v.ok()) {
      std::cerr << "btx-train: output_dir exists but does not verify: " << v.message() << "\n";
      return kExitFailed;
    }
    json metrics = json::object();
    if (job.file.kind == contract::JobKind::kEval) {
      auto eval = ReadFile(job.output_dir() + "/eval.json");
      if (eval.ok()) metrics = json::parse(*eval, nullptr, false);
    }
    EmitEvent(job, {{"event", "done"}, {"artifact", job.output_dir()}, {"metrics", metrics}});
    std::cerr << "btx-train: " << job.output_dir() << " already published\n";
    return kExitOk;
  }
  StatusOr<int> rc = 0;
  try {
    Status resources = CheckParentManifests(job);
    if (resources.ok()) resources = ApplyResources(job);
    rc = resources.ok() ? RunKind(job) : StatusOr<int>(resources);
  } catch (const std::exception& e) {
    std::cerr << "btx-train: " << kind << " failed: " << e.what() << "\n";
    return kExitFailed;
  }
  if (!rc.ok()) {
    const Status& st = rc.status();
    if (st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kNotFound) {
      std::cerr << "btx-train: invalid job: " << st.message() << "\n";
      return kExitInvalidJob;
    }
    std::cerr << "btx-train: " << kind << " failed: " << st.message() << "\n";
    return kExitFailed;
  }
  return *rc;
}

}  // namespace btx::model
