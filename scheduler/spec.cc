#include "btx/scheduler/spec.h"

#include <algorithm>
#include <set>
#include <vector>

#include "btx/common/strings.h"
#include "btx/contract/fields.h"
#include "btx/contract/specs.h"
#include "btx/rpc_status.h"

namespace btx::scheduler {
using json = nlohmann::json;
namespace {

// The most experts a pipeline can have within the contract's lists: the eval job lists each expert
// and up to five other models, and its parser takes at most 1024.
constexpr int kContractMaxExperts = static_cast<int>(contract::kMaxListEntries) - 24;

// Ranks (processes) of one job: one worker runs them all, and c10d's Gloo group over loopback is meant
// for a machine's worth of them.
constexpr int64_t kMaxRanks = 64;
constexpr int64_t kMaxNodes = 512;
// btx-train's bound on BTX_WORLD_SIZE (model/distributed.cc).
constexpr int64_t kMaxWorldSize = 4096;

// An operator's limits only ever tighten the contract's: a looser one would let through jobs that
// btx-train refuses.
SpecLimits Effective(const SpecLimits& limits) {
  SpecLimits out = limits;
  out.max_steps = std::min<int64_t>(limits.max_steps, contract::kMaxSteps);
  out.max_data_paths = static_cast<int>(std::min<int64_t>(limits.max_data_paths, static_cast<int64_t>(contract::kMaxPaths)));
  out.max_experts = std::min(limits.max_experts, kContractMaxExperts);
  return out;
}

const json& Field(const json& obj, const char* key) {
  static const json kNull;
  return obj.is_object() && obj.contains(key) ? obj[key] : kNull;
}

void FailValue(contract::Reader& r, const std::string& path, const json& v, const std::string& expected) {
  if (v.is_null()) {
    r.FailMissing(path, expected);
  } else {
    r.Fail(path, v, expected);
  }
}

absl::Status Violations(const contract::FieldErrors& errors) {
  std::vector<FieldViolation> out;
  out.reserve(errors.size());
  for (const auto& e : errors) out.push_back({e.path, e.message});
  return InvalidFields(out);
}

// `seed`: an existing model directory, or a Llama trained from scratch first (the pretrain job).
json ReadSeed(contract::Reader& r, const json& in, const SpecLimits& limits, contract::ModelInit* init_out) {
  const json& seed = Field(in, "seed");
  if (seed.is_null()) {
    r.FailMissing("seed", "{model: <dir>} or {init: {preset: ...}, pretrain: {data: ..., steps: N}}");
    return json::object();
  }
  if (!r.Object("seed", seed, {"model", "init", "pretrain"})) return json::object();
  const bool has_model = seed.contains("model"), has_init = seed.contains("init");
  if (has_model == has_init) {
    r.Fail("seed", seed, "exactly one of seed.model or seed.init");
    return json::object();
  }
  if (has_model) {
    if (seed.contains("pretrain")) r.Fail("seed.pretrain", seed["pretrain"], "no pretrain with seed.model");
    return {{"model", r.PathField(seed, "seed", "model", true)}};
  }
  *init_out = contract::ParseModelInit(r, seed["init"], "seed.init");
  contract::DataSpec data;
  int64_t steps = 400;
  const json& pre = Field(seed, "pretrain");
  if (pre.is_null()) {
    r.FailMissing("seed.pretrain", "a mapping with data and steps (seed.init needs pretraining)");
  } else if (r.Object("seed.pretrain", pre, {"data", "steps"})) {
    data = contract::ParseData(r, Field(pre, "data"), "seed.pretrain.data", static_cast<size_t>(limits.max_data_paths));
    steps = r.Int(pre, "seed.pretrain", "steps", steps, 1, limits.max_steps);
  }
  return {{"init", contract::ToJson(*init_out)}, {"pretrain", {{"data", contract::ToJson(data)}, {"steps", steps}}}};
}

}  // namespace

absl::StatusOr<json> ParseSpec(const std::string& text, const SpecLimits& operator_limits) {
  const SpecLimits limits = Effective(operator_limits);
  auto parsed = YamlToJson(text, limits.max_spec_bytes);
  if (!parsed.ok()) return InvalidFields({{"spec", std::string(parsed.status().message())}});
  const json in = *std::move(parsed);
  contract::FieldErrors errors;
  contract::Reader r(errors);
  if (!r.Object("", in, {"name", "seed", "tokenizer", "experts", "train", "merge", "finetune", "evaluate", "resources"})) {
    return Violations(errors);
  }
  json out = json::object();
  out["name"] = r.Name(in, "", "name");

  contract::ModelInit init;
  out["seed"] = ReadSeed(r, in, limits, &init);
  const bool from_scratch = out["seed"].contains("init");
  // Only a seed trained here can train its tokenizer; a seed dir's own tokenizer wins over this one.
  const contract::TokenizerSpec tokenizer =
      contract::ParseTokenizer(r, Field(in, "tokenizer"), "tokenizer", /*allow_train=*/from_scratch);
  out["tokenizer"] = contract::ToJson(tokenizer);
  // The pretrain job's rule (contract::ParsePretrain), said here in the pipeline's terms.
  if (from_scratch && tokenizer.kind == contract::TokenizerSpec::Kind::kTrainSentencePiece && init.vocab_size > 0 &&
      init.vocab_size < tokenizer.vocab_size) {
    r.Fail("seed.init.vocab_size", init.vocab_size,
           Cat("0 (the tokenizer's) or at least tokenizer.vocab_size (", tokenizer.vocab_size, ")"));
  }

  std::vector<std::string> expert_names;
  json experts_out = json::array();
  const json& experts = Field(in, "experts");
  if (!experts.is_array() || experts.empty() || experts.size() > static_cast<size_t>(limits.max_experts)) {
    FailValue(r, "experts", experts, Cat("a list of 1..", limits.max_experts, " experts {name, data, steps}"));
  } else {
    std::set<std::string> seen;
    for (size_t i = 0; i < experts.size(); ++i) {
      const std::string path = contract::IndexPath("experts", i);
      const json& e = experts[i];
      if (!r.Object(path, e, {"name", "data", "steps"})) continue;
      const std::string name = r.Name(e, path, "name");
      if (!name.empty() && !seen.insert(name).second) {
        r.Fail(path + ".name", e["name"], "a name not used by another expert");
      } else if (!name.empty()) {
        expert_names.push_back(name);
      }
      const contract::DataSpec data =
          contract::ParseData(r, Field(e, "data"), path + ".data", static_cast<size_t>(limits.max_data_paths));
      const int64_t steps = r.Int(e, path, "steps", 300, 1, limits.max_steps);
      experts_out.push_back({{"name", name}, {"data", contract::ToJson(data)}, {"steps", steps}});
    }
  }
  out["experts"] = std::move(experts_out);

  // Every default of the hyper-parameters is the contract's: the stored spec shows what jobs get.
  out["train"] = contract::ToJson(contract::ParseTrain(r, Field(in, "train"), "train"));

  std::string method = "btx", router_init = "random";
  bool keep_seed_expert = false;
  if (const json& m = Field(in, "merge"); !m.is_null() && r.Object("merge", m, {"method", "keep_seed_expert", "router_init"})) {
    method = r.Enum(m, "merge", "method", method, {"btx", "upcycle", "btm"});
    keep_seed_expert = r.Bool(m, "merge", "keep_seed_expert", keep_seed_expert);
    router_init = r.Enum(m, "merge", "router_init", router_init, {"random", "hidden"});
  }
  out["merge"] = {{"method", method}, {"keep_seed_expert", keep_seed_expert}, {"router_init", router_init}};

  // The merged MoE's experts: one per domain, plus the seed's FFN when kept.
  const int64_t num_experts = std::max<int64_t>(static_cast<int64_t>(expert_names.size()) + (keep_seed_expert ? 1 : 0), 1);
  json finetune = {{"top_k", std::min<int64_t>(2, num_experts)}, {"steps", 200}, {"mixture", json::object()},
                   {"freeze", json::array()}, {"load_balance", 0.01}, {"z_loss", 0.001}, {"router", "softmax_topk"}};
  for (const auto& n : expert_names) finetune["mixture"][n] = 1.0;
  if (const json& f = Field(in, "finetune");
      !f.is_null() && r.Object("finetune", f, {"top_k", "steps", "mixture", "freeze", "load_balance", "z_loss", "router"})) {
    finetune["top_k"] = r.Int(f, "finetune", "top_k", finetune["top_k"].get<int64_t>(), 1, num_experts);
    finetune["steps"] = r.Int(f, "finetune", "steps", 200, 1, limits.max_steps);
    finetune["load_balance"] = r.Num(f, "finetune", "load_balance", 0.01, {0, 100});
    finetune["z_loss"] = r.Num(f, "finetune", "z_loss", 0.001, {0, 100});
    finetune["router"] = r.Enum(f, "finetune", "router", "softmax_topk", {"softmax_topk", "sparsemixer"});
    finetune["freeze"] = r.EnumList(f, "finetune", "freeze", contract::kFreezeGroups);
    // Per expert name, its domain's weight in the router finetune (1 unless given).
    if (const json& mix = Field(f, "mixture"); !mix.is_null() && r.Object("finetune.mixture", mix, expert_names)) {
      for (const auto& [name, _] : mix.items()) {
        if (!finetune["mixture"].contains(name)) continue;
        finetune["mixture"][name] = r.Num(mix, "finetune.mixture", name.c_str(), 1.0, {0, 1e6, true, false});
      }
    }
  }
  out["finetune"] = std::move(finetune);

  json evaluate = {{"baselines", {"seed", "experts"}}, {"max_tokens", 65536}};
  if (const json& e = Field(in, "evaluate"); !e.is_null() && r.Object("evaluate", e, {"baselines", "max_tokens"})) {
    if (!Field(e, "baselines").is_null()) {
      evaluate["baselines"] = r.EnumList(e, "evaluate", "baselines", {"seed", "experts", "btm", "upcycle"});
      // Each baseline is one job of the plan (baseline/<name>): named twice, it would be planned twice.
      for (size_t i = 0; i < evaluate["baselines"].size(); ++i) {
        for (size_t j = 0; j < i; ++j) {
          if (evaluate["baselines"][j] != evaluate["baselines"][i]) continue;
          r.Fail(contract::IndexPath("evaluate.baselines", i), evaluate["baselines"][i],
                 Cat("each baseline once (it is evaluate.baselines[", j, "] already)"));
          break;
        }
      }
      for (size_t i = 0; i < evaluate["baselines"].size(); ++i) {
        if (evaluate["baselines"][i] == "btm" && method != "upcycle" && expert_names.size() > contract::kMaxEnsemble) {
          r.Fail(contract::IndexPath("evaluate.baselines", i), "btm",
                 Cat("at most ", contract::kMaxEnsemble, " experts for btm (its output ensemble's limit), not ",
                     expert_names.size()));
        }
      }
    }
    evaluate["max_tokens"] = r.Int(e, "evaluate", "max_tokens", 65536, 1, int64_t{1} << 40);
  }
  out["evaluate"] = std::move(evaluate);

  // Training jobs run as a rank group: gpus_per_job ranks of one GPU each, or (CPU) ranks_per_job CPU
  // ranks; merge and eval run as one rank (docs/architecture.md, "Resources").
  // A training job may also span nodes_per_job workers (a gang), each running that rank group: its
  // world is nodes x ranks (docs/reliability.md, "Gangs").
  int64_t gpus = 0, ranks = 1, attempts = 3, nodes = 1;
  if (const json& res = Field(in, "resources");
      !res.is_null() && r.Object("resources", res, {"gpus_per_job", "ranks_per_job", "nodes_per_job", "max_attempts"})) {
    gpus = r.Int(res, "resources", "gpus_per_job", 0, 0, kMaxRanks);
    ranks = r.Int(res, "resources", "ranks_per_job", 1, 1, kMaxRanks);
    nodes = r.Int(res, "resources", "nodes_per_job", 1, 1, kMaxNodes);
    // Said twice it could disagree: a GPU job's ranks are its GPUs, one device per rank.
    if (gpus > 0 && res.contains("ranks_per_job") && ranks != gpus) {
      r.Fail("resources.ranks_per_job", res["ranks_per_job"],
             Cat("none, or gpus_per_job (", gpus, "): a GPU job runs one rank per GPU"));
    }
    attempts = r.Int(res, "resources", "max_attempts", attempts, 1, limits.max_attempts);
  }
  if (gpus > 0) ranks = gpus;
  if (nodes * ranks > kMaxWorldSize) {
    r.Fail("resources.nodes_per_job", Field(in, "resources")["nodes_per_job"],
           Cat("at most ", kMaxWorldSize / ranks, " with ", ranks, " ranks per node: a job's world (nodes x ranks) is at most ",
               kMaxWorldSize));
  }
  out["resources"] = {{"gpus_per_job", gpus}, {"ranks_per_job", ranks}, {"nodes_per_job", nodes}, {"max_attempts", attempts}};

  if (!r.ok()) return Violations(errors);
  return out;
}

}  // namespace btx::scheduler
