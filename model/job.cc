#include "btx/model/job.h"

#include <ATen/Parallel.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "btx/model/data.h"
#include "btx/model/eval.h"
#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/merge.h"
#include "btx/model/tokenizer.h"
#include "btx/model/trainer.h"

namespace btx {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct Job {
  json raw;
  std::string kind, output_dir, checkpoint_dir, device = "cpu";
  int64_t threads = 0;
  json spec;
  int progress_fd = -1;
  const std::atomic<bool>* stop = nullptr;
};

struct JobError {
  int code;
  std::string message;
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

StatusOr<std::vector<std::string>> PathList(const json& spec, const std::string& field, const json& v) {
  std::vector<std::string> out;
  if (v.is_string()) out.push_back(v.get<std::string>());
  else if (v.is_array()) {
    for (const auto& x : v) {
      if (!x.is_string()) return Invalid(field, "must be a path or a list of paths");
      out.push_back(x.get<std::string>());
    }
  } else {
    return Invalid(field, "must be a path or a list of paths");
  }
  if (out.empty()) return Invalid(field, "is empty");
  return out;
}

StatusOr<std::string> StringField(const json& o, const std::string& prefix, const char* key, bool required = true,
                                  const std::string& def = "") {
  if (!o.contains(key)) {
    if (required) return Invalid(prefix + key, "is required");
    return def;
  }
  if (!o[key].is_string()) return Invalid(prefix + key, "must be a string");
  return o[key].get<std::string>();
}

StatusOr<int64_t> IntField(const json& o, const std::string& prefix, const char* key, bool required, int64_t def) {
  if (!o.contains(key)) {
    if (required) return Invalid(prefix + key, "is required");
    return def;
  }
  if (!o[key].is_number_integer()) return Invalid(prefix + key, "must be an integer");
  return o[key].get<int64_t>();
}

// Model dirs carry their tokenizer; a job may name one for seeds without it: "byte",
// {"type": "byte"}, {"sentencepiece": path}, or (pretrain) {"type": "sentencepiece", "vocab_size": N}.
StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromSpec(const json& t, const std::vector<std::string>& train_paths,
                                                       const std::string& work_dir) {
  if (t.is_null() || (t.is_string() && t == "byte")) return MakeByteTokenizer();
  if (t.is_string()) return LoadSentencePiece(t.get<std::string>());
  if (!t.is_object()) return Invalid("spec.tokenizer", "must be \"byte\", a path or an object");
  if (t.contains("sentencepiece")) {
    if (!t["sentencepiece"].is_string()) return Invalid("spec.tokenizer.sentencepiece", "must be a path");
    return LoadSentencePiece(t["sentencepiece"].get<std::string>());
  }
  const std::string type = t.value("type", std::string("byte"));
  if (type == "byte") return MakeByteTokenizer();
  if (type != "sentencepiece") return Invalid("spec.tokenizer.type", "must be byte or sentencepiece");
  if (!t.contains("vocab_size") || !t["vocab_size"].is_number_integer())
    return Invalid("spec.tokenizer.vocab_size", "is required to train a sentencepiece model");
  // Trained once per job into a stable place so that every attempt tokenizes identically.
  const std::string path = work_dir + "/tokenizer.model";
  if (fs::exists(path)) return LoadSentencePiece(path);
  fs::create_directories(work_dir);
  BTX_ASSIGN_OR_RETURN(auto files, ExpandDataPaths(train_paths));
  std::vector<std::string> text;
  for (auto& f : files)
    if (!f.ends_with(".btxtok")) text.push_back(f);
  return TrainSentencePiece(text, t["vocab_size"].get<int>(), path);
}

// The tokenizer a model dir carries, else the one the spec names. Guessing (e.g. bytes for a model trained
// with another tokenizer) would train on garbage silently, so neither is an invalid job.
StatusOr<std::unique_ptr<Tokenizer>> ModelTokenizer(const json& spec, const std::string& field, const std::string& dir) {
  if (HasTokenizer(dir)) {
    auto tok = LoadTokenizer(dir);
    if (!tok.ok()) return tok.status().With(field);
    return tok;
  }
  if (!spec.contains("tokenizer"))
    return Invalid("spec.tokenizer", "required: " + dir + " has no btx_tokenizer.json or tokenizer.model");
  const json& t = spec["tokenizer"];
  if (t.is_object() && t.value("type", std::string()) == "sentencepiece" && !t.contains("sentencepiece"))
    return Invalid("spec.tokenizer", "a tokenizer can only be trained by pretrain; give a model path");
  auto tok = TokenizerFromSpec(t, {}, dir);
  if (!tok.ok()) return tok.status().With("spec.tokenizer");
  return tok;
}

Status PublishModel(const Job& job, const LlamaModel& model, const Tokenizer* tok) {
  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(job.output_dir));
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

StatusOr<DomainData> LoadDomain(const std::string& field, const std::string& name, double weight, const json& d,
                                const Tokenizer& tok, int64_t vocab, int64_t valid_tokens) {
  DomainData out;
  out.name = name;
  out.weight = weight;
  if (!d.is_object() || !d.contains("train")) return Invalid(field + ".train", "is required");
  BTX_ASSIGN_OR_RETURN(auto train_paths, PathList(d, field + ".train", d["train"]));
  auto train = LoadTokens(train_paths, tok, 0, vocab);
  if (!train.ok()) return train.status().With(field + ".train");
  out.train = *train;
  if (d.contains("valid")) {
    BTX_ASSIGN_OR_RETURN(auto valid_paths, PathList(d, field + ".valid", d["valid"]));
    auto valid = LoadTokens(valid_paths, tok, valid_tokens + 1, vocab);
    if (!valid.ok()) return valid.status().With(field + ".valid");
    out.valid = *valid;
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
  run.opts.checkpoint_dir = job.checkpoint_dir;
  run.opts.device = job.device;
  Trainer trainer(&run.model, run.train, run.opts, std::move(run.data), hooks);
  BTX_RETURN_IF_ERROR(trainer.Init());
  BTX_RETURN_IF_ERROR(trainer.ResumeFromLatest());
  BTX_ASSIGN_OR_RETURN(TrainOutcome outcome, trainer.Run());
  if (outcome == TrainOutcome::kInterrupted) {
    std::cerr << "btx: interrupted at step " << trainer.step() << ", checkpoint " << trainer.last_checkpoint() << "\n";
    return kExitInterrupted;
  }
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
  EmitEvent(job, {{"event", "done"}, {"artifact", fs::absolute(job.output_dir).string()}, {"metrics", metrics}});
  return kExitOk;
}

Status ParseTrainCommon(const Job& job, TrainRun& run) {
  const json& s = job.spec;
  BTX_ASSIGN_OR_RETURN(run.train, TrainConfigFromJson(s.value("train", json::object())));
  BTX_ASSIGN_OR_RETURN(run.opts.steps, IntField(s, "spec.", "steps", true, 0));
  if (run.opts.steps < 1) return Invalid("spec.steps", "must be >= 1");
  return Status::Ok();
}

StatusOr<int> RunPretrain(Job& job) {
  TrainRun run;
  const json& s = job.spec;
  BTX_RETURN_IF_ERROR(ParseTrainCommon(job, run));
  if (!s.contains("data")) return Invalid("spec.data", "is required");
  std::vector<std::string> train_paths;
  if (s["data"].is_object() && s["data"].contains("train")) {
    BTX_ASSIGN_OR_RETURN(train_paths, PathList(s, "spec.data.train", s["data"]["train"]));
  }
  const std::string work = job.checkpoint_dir.empty() ? job.output_dir + ".work" : job.checkpoint_dir;
  auto tok = TokenizerFromSpec(s.value("tokenizer", json()), train_paths, work);
  if (!tok.ok()) return tok.status().With("spec.tokenizer");
  run.tok = std::move(*tok);
  ModelConfig cfg;
  const json init = s.value("init", json::object());
  if (!init.is_object()) return Invalid("spec.init", "must be an object");
  if (init.contains("preset")) {
    if (!init["preset"].is_string()) return Invalid("spec.init.preset", "must be a string");
    auto p = ConfigPreset(init["preset"].get<std::string>());
    if (!p.ok()) return p.status().With("spec.init.preset");
    cfg = *p;
  }
  json fields = ConfigToHfJson(cfg);
  fields["vocab_size"] = run.tok->vocab_size();
  fields["bos_token_id"] = run.tok->bos_id();
  fields["eos_token_id"] = run.tok->eos_id();
  for (auto& [k, v] : init.items())
    if (k != "preset") fields[k] = v;
  auto c = ConfigFromHfJson(fields);
  if (!c.ok()) return c.status().With("spec.init");
  if (c->vocab_size < run.tok->vocab_size()) return Invalid("spec.init.vocab_size", "is smaller than the tokenizer's");
  auto model = LlamaModel::Init(*c, run.train.seed);
  if (!model.ok()) return model.status().With("spec.init");
  run.model = std::move(*model);
  auto dom = LoadDomain("spec.data", "train", 1.0, s["data"], *run.tok, c->vocab_size, run.train.valid_tokens);
  if (!dom.ok()) return dom.status();
  run.data.push_back(std::move(*dom));
  return TrainAndPublish(job, run);
}

StatusOr<int> RunBranch(Job& job) {
  TrainRun run;
  const json& s = job.spec;
  BTX_RETURN_IF_ERROR(ParseTrainCommon(job, run));
  BTX_ASSIGN_OR_RETURN(std::string seed, StringField(s, "spec.", "seed"));
  if (!fs::is_directory(seed)) return Invalid("spec.seed", "model dir " + seed + " does not exist");
  auto model = LoadModelDir(seed);
  if (!model.ok()) return model.status().With("spec.seed");
  run.model = std::move(*model);
  BTX_ASSIGN_OR_RETURN(run.tok, ModelTokenizer(s, "spec.seed", seed));
  if (!s.contains("data")) return Invalid("spec.data", "is required");
  auto dom = LoadDomain("spec.data", s.value("name", std::string("train")), 1.0, s["data"], *run.tok,
                        run.model.config().vocab_size, run.train.valid_tokens);
  if (!dom.ok()) return dom.status();
  run.data.push_back(std::move(*dom));
  return TrainAndPublish(job, run);
}

StatusOr<int> RunFinetune(Job& job) {
  TrainRun run;
  const json& s = job.spec;
  BTX_RETURN_IF_ERROR(ParseTrainCommon(job, run));
  BTX_ASSIGN_OR_RETURN(std::string dir, StringField(s, "spec.", "model"));
  if (!fs::is_directory(dir)) return Invalid("spec.model", "model dir " + dir + " does not exist");
  auto model = LoadModelDir(dir);
  if (!model.ok()) return model.status().With("spec.model");
  run.model = std::move(*model);
  ModelConfig& cfg = run.model.mutable_config();
  if (!cfg.is_moe()) return Invalid("spec.model", dir + " is not an MoE (Mixtral) model");
  BTX_ASSIGN_OR_RETURN(cfg.num_experts_per_tok, IntField(s, "spec.", "top_k", false, cfg.num_experts_per_tok));
  if (s.contains("load_balance")) {
    if (!s["load_balance"].is_number()) return Invalid("spec.load_balance", "must be a number");
    cfg.router_aux_loss_coef = s["load_balance"].get<double>();
  }
  if (s.contains("z_loss")) {
    if (!s["z_loss"].is_number()) return Invalid("spec.z_loss", "must be a number");
    cfg.router_z_loss_coef = s["z_loss"].get<double>();
  }
  BTX_ASSIGN_OR_RETURN(cfg.router, StringField(s, "spec.", "router", false, cfg.router));
  Status v = cfg.Validate();
  if (!v.ok()) return v.With("spec");
  if (cfg.router == "sparsemixer" && !KernelsAvailable())
    return FailedPrecondition("spec.router: sparsemixer needs the btx kernels library, which this build lacks");
  if (s.contains("freeze")) {
    if (!s["freeze"].is_array()) return Invalid("spec.freeze", "must be a list");
    for (auto& f : s["freeze"]) {
      if (!f.is_string()) return Invalid("spec.freeze", "entries must be strings");
      run.opts.freeze.push_back(f.get<std::string>());
    }
    Status fz = ValidateFreeze(run.opts.freeze);
    if (!fz.ok()) return fz.With("spec");
  }
  BTX_ASSIGN_OR_RETURN(run.tok, ModelTokenizer(s, "spec.model", dir));
  if (!s.contains("mixture") || !s["mixture"].is_array() || s["mixture"].empty())
    return Invalid("spec.mixture", "must be a non-empty list of {name, weight, train, valid}");
  for (size_t i = 0; i < s["mixture"].size(); ++i) {
    const json& m = s["mixture"][i];
    const std::string field = "spec.mixture[" + std::to_string(i) + "]";
    BTX_ASSIGN_OR_RETURN(std::string name, StringField(m, field + ".", "name"));
    double w = 1.0;
    if (m.contains("weight")) {
      if (!m["weight"].is_number() || !(m["weight"].get<double>() > 0)) return Invalid(field + ".weight", "must be > 0");
      w = m["weight"].get<double>();
    }
    auto dom = LoadDomain(field, name, w, m, *run.tok, cfg.vocab_size, run.train.valid_tokens);
    if (!dom.ok()) return dom.status();
    run.data.push_back(std::move(*dom));
  }
  return TrainAndPublish(job, run);
}

StatusOr<int> RunMerge(Job& job) {
  const json& s = job.spec;
  MergeSpec m;
  BTX_ASSIGN_OR_RETURN(m.method, StringField(s, "spec.", "method", false, "btx"));
  BTX_ASSIGN_OR_RETURN(m.seed, StringField(s, "spec.", "seed", false, ""));
  BTX_ASSIGN_OR_RETURN(m.router_init, StringField(s, "spec.", "router_init", false, "random"));
  BTX_ASSIGN_OR_RETURN(m.top_k, IntField(s, "spec.", "top_k", false, 2));
  BTX_ASSIGN_OR_RETURN(m.num_experts, IntField(s, "spec.", "num_experts", false, 0));
  int64_t seed_value = 1234;
  BTX_ASSIGN_OR_RETURN(seed_value, IntField(s, "spec.", "random_seed", false, 1234));
  m.random_seed = static_cast<uint64_t>(seed_value);
  if (s.contains("keep_seed_expert")) {
    if (!s["keep_seed_expert"].is_boolean()) return Invalid("spec.keep_seed_expert", "must be a boolean");
    m.keep_seed_expert = s["keep_seed_expert"].get<bool>();
  }
  if (s.contains("experts")) {
    if (!s["experts"].is_array()) return Invalid("spec.experts", "must be a list of {name, model}");
    for (size_t i = 0; i < s["experts"].size(); ++i) {
      const std::string f = "spec.experts[" + std::to_string(i) + "].";
      BTX_ASSIGN_OR_RETURN(std::string name, StringField(s["experts"][i], f, "name"));
      BTX_ASSIGN_OR_RETURN(std::string dir, StringField(s["experts"][i], f, "model"));
      if (!fs::is_directory(dir)) return Invalid(f + "model", "model dir " + dir + " does not exist");
      m.experts.emplace_back(name, dir);
    }
  }
  if (!m.seed.empty() && !fs::is_directory(m.seed)) return Invalid("spec.seed", "model dir " + m.seed + " does not exist");
  // Prompts for router_init=hidden: {"data": {"<expert>": paths}} or [{name, valid|train}].
  if (s.contains("data")) {
    const json& d = s["data"];
    if (d.is_object()) {
      for (auto& [name, v] : d.items()) {
        BTX_ASSIGN_OR_RETURN(m.prompts[name], PathList(d, "spec.data." + name, v));
      }
    } else if (d.is_array()) {
      for (size_t i = 0; i < d.size(); ++i) {
        const std::string f = "spec.data[" + std::to_string(i) + "].";
        BTX_ASSIGN_OR_RETURN(std::string name, StringField(d[i], f, "name"));
        const char* key = d[i].contains("valid") ? "valid" : "train";
        if (!d[i].contains(key)) return Invalid(f + "valid", "is required");
        BTX_ASSIGN_OR_RETURN(m.prompts[name], PathList(d[i], f + key, d[i][key]));
      }
    } else {
      return Invalid("spec.data", "must be an object or a list");
    }
  }
  Status v = ValidateMergeSpec(m);
  if (!v.ok()) return v;
  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(job.output_dir));
  // The weights were hashed as they were written: the manifest does not read them again.
  FileDigests weights;
  Status st = MergeToDir(m, staged.path(), job.stop, &weights);
  if (st.code() == StatusCode::kCancelled) return kExitInterrupted;
  BTX_RETURN_IF_ERROR(st);
  BTX_RETURN_IF_ERROR(staged.Publish(weights));
  BTX_ASSIGN_OR_RETURN(ModelConfig out, LoadConfig(job.output_dir));
  json metrics = {{"num_experts", out.num_local_experts}, {"method", m.method}};
  EmitEvent(job, {{"event", "done"}, {"artifact", fs::absolute(job.output_dir).string()}, {"metrics", metrics}});
  return kExitOk;
}

StatusOr<int> RunEval(Job& job) {
  const json& s = job.spec;
  std::vector<EvalModelSpec> models;
  std::vector<EvalDomainSpec> domains;
  if (!s.contains("models") || !s["models"].is_array() || s["models"].empty())
    return Invalid("spec.models", "must be a non-empty list of {name, model} or {name, ensemble}");
  for (size_t i = 0; i < s["models"].size(); ++i) {
    const json& m = s["models"][i];
    const std::string f = "spec.models[" + std::to_string(i) + "].";
    EvalModelSpec e;
    BTX_ASSIGN_OR_RETURN(e.name, StringField(m, f, "name"));
    if (m.contains("ensemble")) {
      BTX_ASSIGN_OR_RETURN(e.dirs, PathList(m, f + "ensemble", m["ensemble"]));
    } else {
      BTX_ASSIGN_OR_RETURN(std::string dir, StringField(m, f, "model"));
      e.dirs.push_back(dir);
    }
    for (auto& d : e.dirs)
      if (!fs::is_directory(d)) return Invalid(f + (m.contains("ensemble") ? "ensemble" : "model"), "model dir " + d + " does not exist");
    if (m.contains("expert_names")) {
      if (!m["expert_names"].is_array()) return Invalid(f + "expert_names", "must be a list of strings");
      for (const auto& n : m["expert_names"]) {
        if (!n.is_string()) return Invalid(f + "expert_names", "must be a list of strings");
        e.expert_names.push_back(n.get<std::string>());
      }
    }
    models.push_back(std::move(e));
  }
  if (!s.contains("domains") || !s["domains"].is_array() || s["domains"].empty())
    return Invalid("spec.domains", "must be a non-empty list of {name, valid}");
  for (size_t i = 0; i < s["domains"].size(); ++i) {
    const std::string f = "spec.domains[" + std::to_string(i) + "].";
    EvalDomainSpec d;
    BTX_ASSIGN_OR_RETURN(d.name, StringField(s["domains"][i], f, "name"));
    if (!s["domains"][i].contains("valid")) return Invalid(f + "valid", "is required");
    BTX_ASSIGN_OR_RETURN(d.valid, PathList(s["domains"][i], f + "valid", s["domains"][i]["valid"]));
    domains.push_back(std::move(d));
  }
  EvalOptions opts;
  BTX_ASSIGN_OR_RETURN(opts.max_tokens, IntField(s, "spec.", "max_tokens", false, opts.max_tokens));
  BTX_ASSIGN_OR_RETURN(opts.seq_len, IntField(s, "spec.", "seq_len", false, opts.seq_len));
  BTX_ASSIGN_OR_RETURN(opts.top_tokens, IntField(s, "spec.", "top_tokens", false, opts.top_tokens));
  BTX_ASSIGN_OR_RETURN(opts.min_token_count, IntField(s, "spec.", "min_token_count", false, opts.min_token_count));
  if (opts.max_tokens < 1) return Invalid("spec.max_tokens", "must be >= 1");
  if (opts.seq_len < 1) return Invalid("spec.seq_len", "must be >= 1");
  if (opts.top_tokens < 0) return Invalid("spec.top_tokens", "must be >= 0");
  if (opts.min_token_count < 1) return Invalid("spec.min_token_count", "must be >= 1");
  auto result = Evaluate(models, domains, opts, job.stop);
  if (!result.ok() && result.status().code() == StatusCode::kCancelled) return kExitInterrupted;
  if (!result.ok()) return result.status();
  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(job.output_dir));
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
  EmitEvent(job, {{"event", "done"}, {"artifact", fs::absolute(job.output_dir).string()}, {"metrics", *result}});
  return kExitOk;
}

StatusOr<Job> ParseJob(const std::string& path) {
  auto text = ReadFile(path);
  if (!text.ok()) return InvalidArgument("cannot read job file " + path);
  Job job;
  try {
    job.raw = json::parse(*text);
  } catch (const std::exception& e) {
    return InvalidArgument(std::string("job file is not valid JSON: ") + e.what());
  }
  const json& j = job.raw;
  if (!j.is_object()) return InvalidArgument("job file must hold a JSON object");
  BTX_ASSIGN_OR_RETURN(job.kind, StringField(j, "", "kind"));
  BTX_ASSIGN_OR_RETURN(job.output_dir, StringField(j, "", "output_dir"));
  BTX_ASSIGN_OR_RETURN(job.checkpoint_dir, StringField(j, "", "checkpoint_dir", false, ""));
  BTX_ASSIGN_OR_RETURN(job.device, StringField(j, "", "device", false, "cpu"));
  BTX_ASSIGN_OR_RETURN(job.threads, IntField(j, "", "threads", false, 0));
  if (job.output_dir.empty() || job.output_dir[0] != '/') return Invalid("output_dir", "must be an absolute path");
  if (!job.checkpoint_dir.empty() && job.checkpoint_dir[0] != '/') return Invalid("checkpoint_dir", "must be an absolute path");
  if (job.threads < 0) return Invalid("threads", "must be >= 0");
  if (job.device != "cpu" && !job.device.starts_with("cuda")) return Invalid("device", "must be cpu or cuda[:N]");
  if (!j.contains("spec") || !j["spec"].is_object()) return Invalid("spec", "must be an object");
  job.spec = j["spec"];
  static const char* kinds[] = {"pretrain", "branch", "merge", "finetune", "eval"};
  if (std::find(std::begin(kinds), std::end(kinds), job.kind) == std::end(kinds))
    return Invalid("kind", "'" + job.kind + "' is not one of pretrain, branch, merge, finetune, eval");
  return job;
}

}  // namespace

int RunJobFile(const std::string& job_path, int progress_fd, const std::atomic<bool>* stop) {
  auto parsed = ParseJob(job_path);
  if (!parsed.ok()) {
    std::cerr << "btx-train: invalid job: " << parsed.status().message() << "\n";
    return kExitInvalidJob;
  }
  Job job = std::move(*parsed);
  job.progress_fd = progress_fd;
  job.stop = stop;
  if (job.threads > 0) at::set_num_threads(static_cast<int>(job.threads));
  // A previous attempt may have published and died before reporting: its verified output is the result.
  if (fs::exists(job.output_dir)) {
    Status v = VerifyManifest(job.output_dir);
    if (!v.ok()) {
      std::cerr << "btx-train: output_dir exists but does not verify: " << v.message() << "\n";
      return kExitFailed;
    }
    json metrics = json::object();
    if (job.kind == "eval") {
      auto text = ReadFile(job.output_dir + "/eval.json");
      if (text.ok()) metrics = json::parse(*text, nullptr, false);
    }
    EmitEvent(job, {{"event", "done"}, {"artifact", job.output_dir}, {"metrics", metrics}});
    std::cerr << "btx-train: " << job.output_dir << " already published\n";
    return kExitOk;
  }
  StatusOr<int> rc = 0;
  try {
    if (job.kind == "pretrain") rc = RunPretrain(job);
    else if (job.kind == "branch") rc = RunBranch(job);
    else if (job.kind == "merge") rc = RunMerge(job);
    else if (job.kind == "finetune") rc = RunFinetune(job);
    else rc = RunEval(job);
  } catch (const std::exception& e) {
    std::cerr << "btx-train: " << job.kind << " failed: " << e.what() << "\n";
    return kExitFailed;
  }
  if (!rc.ok()) {
    const Status& st = rc.status();
    if (st.code() == StatusCode::kInvalidArgument || st.code() == StatusCode::kNotFound) {
      std::cerr << "btx-train: invalid job: " << st.message() << "\n";
      return kExitInvalidJob;
    }
    std::cerr << "btx-train: " << job.kind << " failed: " << st.message() << "\n";
    return kExitFailed;
  }
  return *rc;
}

}  // namespace btx
