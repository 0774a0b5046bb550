#include "btx/scheduler/plan.h"

#include <algorithm>
#include <functional>

#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/contract/job.h"
#include "btx/rpc_status.h"

namespace btx::scheduler {
using json = nlohmann::json;
namespace {

using contract::JobKind;

json Artifact(const std::string& job) { return {{"$artifact", job}}; }

// Collects the jobs of one pipeline and checks each one's spec with the trainer's parser as it is added.
class Planner {
 public:
  Planner(int gpus, int ranks, int nodes, int attempts) : gpus_(gpus), ranks_(ranks), nodes_(nodes), attempts_(attempts) {}

  void Add(const std::string& name, JobKind kind, const json& spec, std::vector<std::string> deps, int priority) {
    // Every artifact a job reads must come from a dependency, or it cannot be resolved at lease time.
    std::function<void(const json&)> collect = [&](const json& v) {
      if (contract::IsArtifactRef(v) && v["$artifact"].is_string()) {
        deps.push_back(v["$artifact"].get<std::string>());
      } else if (v.is_structured()) {
        for (const auto& child : v) collect(child);
      }
    };
    collect(spec);
    std::sort(deps.begin(), deps.end());
    deps.erase(std::unique(deps.begin(), deps.end()), deps.end());

    contract::FieldErrors errors;
    contract::Reader reader(errors, /*allow_artifact_refs=*/true);
    (void)contract::ParseJobSpec(reader, kind, spec, "spec");
    for (const auto& e : errors) violations_.push_back({Cat("jobs[", name, "].", e.path), e.message});

    // Only training is data parallel: merge and eval run as one rank, on one device when GPUs are used.
    const bool ranked = kind == JobKind::kPretrain || kind == JobKind::kBranch || kind == JobKind::kFinetune;
    jobs_.push_back({.name = name,
                     .kind = std::string(contract::JobKindName(kind)),
                     .spec_json = spec.dump(),
                     .depends_on = std::move(deps),
                     .max_attempts = attempts_,
                     .gpus = ranked ? gpus_ : std::min(gpus_, 1),
                     .ranks = ranked ? ranks_ : 1,
                     .priority = priority,
                     .nodes = ranked ? nodes_ : 1});
  }

  absl::StatusOr<std::vector<storage::NewJob>> Finish() && {
    if (!violations_.empty()) return InvalidFields(violations_);
    return std::move(jobs_);
  }

 private:
  int gpus_, ranks_, nodes_, attempts_;
  std::vector<storage::NewJob> jobs_;
  std::vector<FieldViolation> violations_;
};

}  // namespace

absl::StatusOr<std::vector<storage::NewJob>> PlanJobs(const json& spec) {
  const json& res = spec["resources"];
  // A stored spec from before rank groups (or gangs) has no ranks_per_job (nodes_per_job): one.
  Planner plan(res["gpus_per_job"].get<int>(), res.value("ranks_per_job", 1), res.value("nodes_per_job", 1),
               res["max_attempts"].get<int>());
  const json& train = spec["train"];
  json seed_ref;
  std::vector<std::string> seed_deps;
  const bool from_scratch = spec["seed"].contains("init");
  if (from_scratch) {
    const json& pre = spec["seed"]["pretrain"];
    plan.Add("pretrain", JobKind::kPretrain,
             {{"init", spec["seed"]["init"]}, {"tokenizer", spec["tokenizer"]}, {"data", pre["data"]}, {"train", train},
              {"steps", pre["steps"]}},
             {}, 0);
    seed_ref = Artifact("pretrain");
    seed_deps = {"pretrain"};
  } else {
    seed_ref = spec["seed"]["model"];
  }
  const std::string method = spec["merge"]["method"];
  const json& ft = spec["finetune"];
  std::vector<std::string> branches;
  // Per domain: the trained expert, the eval domain, the finetune mixture entry, the router prompts.
  json experts = json::array(), domains = json::array(), mixture = json::array(), prompts = json::array();
  for (const auto& e : spec["experts"]) {
    const std::string name = e["name"];
    const json& data = e["data"];
    // Validation falls back on the training data, as the trainer's does.
    const json valid = data.contains("valid") ? data["valid"] : data["train"];
    domains.push_back({{"name", name}, {"valid", valid}});
    mixture.push_back({{"name", name}, {"weight", ft["mixture"].value(name, 1.0)}, {"train", data["train"]}, {"valid", valid}});
    for (const char* k : {"format", "text_field"})  // the finetune reads the expert's data as its branch did
      if (data.contains(k)) mixture.back()[k] = data[k];
    prompts.push_back({{"name", name}, {"train", data["train"]}, {"valid", valid}});
    if (method == "upcycle") continue;  // upcycling copies the seed FFN: nothing to train
    json branch = {{"seed", seed_ref}, {"name", name}, {"data", data}, {"train", train}, {"steps", e["steps"]}};
    // A pretrained seed carries its tokenizer; a seed dir without one falls back on the spec's.
    if (!from_scratch) branch["tokenizer"] = spec["tokenizer"];
    plan.Add("branch/" + name, JobKind::kBranch, branch, seed_deps, 1);
    branches.push_back("branch/" + name);
    experts.push_back({{"name", name}, {"model", Artifact("branch/" + name)}});
  }
  auto merge_spec = [&](const std::string& m, const json& ex) {
    return json{{"method", m},
                {"seed", seed_ref},
                {"experts", ex},
                {"keep_seed_expert", spec["merge"]["keep_seed_expert"]},
                {"router_init", spec["merge"]["router_init"]},
                {"top_k", ft["top_k"]},
                {"data", prompts}};
  };
  auto finetune_spec = [&](const std::string& model_job) {
    return json{{"model", Artifact(model_job)}, {"mixture", mixture},          {"train", train},
                {"steps", ft["steps"]},        {"top_k", ft["top_k"]},        {"freeze", ft["freeze"]},
                {"load_balance", ft["load_balance"]}, {"z_loss", ft["z_loss"]}, {"router", ft["router"]}};
  };
  json upcycle_experts = json::array();
  for (const auto& d : domains) upcycle_experts.push_back({{"name", d["name"]}, {"model", seed_ref}});
  plan.Add("merge", JobKind::kMerge, merge_spec(method, method == "upcycle" ? upcycle_experts : experts),
           method == "upcycle" ? seed_deps : branches, 2);

  json eval_models = json::array();
  if (method == "btm") {
    eval_models.push_back({{"name", "btm"}, {"model", Artifact("merge")}});
  } else {
    plan.Add("finetune", JobKind::kFinetune, finetune_spec("merge"), {"merge"}, 3);
    eval_models.push_back({{"name", method}, {"model", Artifact("finetune")}});
  }
  for (const auto& b : spec["evaluate"]["baselines"]) {
    const std::string base = b;
    if (base == "seed") {
      eval_models.push_back({{"name", "seed"}, {"model", seed_ref}});
    } else if (base == "experts") {
      for (const auto& ex : experts) {
        eval_models.push_back({{"name", "expert/" + ex["name"].get<std::string>()}, {"model", ex["model"]}});
      }
    } else if (base == "btm" && !branches.empty()) {
      // BTM in both of its forms: the parameter average and the output ensemble of the experts.
      if (method != "btm") {
        plan.Add("baseline/btm", JobKind::kMerge, merge_spec("btm", experts), branches, 2);
        eval_models.push_back({{"name", "btm"}, {"model", Artifact("baseline/btm")}});
      }
      json members = json::array();
      for (const auto& ex : experts) members.push_back(ex["model"]);
      eval_models.push_back({{"name", "ensemble"}, {"ensemble", members}});
    } else if (base == "upcycle" && method != "upcycle") {
      // Matched finetune steps: the upcycled MoE gets the same router finetune as the BTX model.
      plan.Add("baseline/upcycle", JobKind::kMerge, merge_spec("upcycle", upcycle_experts), seed_deps, 2);
      plan.Add("baseline/upcycle-finetune", JobKind::kFinetune, finetune_spec("baseline/upcycle"), {"baseline/upcycle"}, 3);
      eval_models.push_back({{"name", "upcycle"}, {"model", Artifact("baseline/upcycle-finetune")}});
    }
  }
  // The eval's dependencies are exactly the models it reads (Add collects them).
  plan.Add("eval", JobKind::kEval,
           {{"models", eval_models}, {"domains", domains}, {"max_tokens", spec["evaluate"]["max_tokens"]},
            {"seq_len", train["seq_len"]}},
           {}, 4);
  return std::move(plan).Finish();
}

absl::StatusOr<json> ResolveArtifacts(const json& spec, const std::map<std::string, std::string>& parents) {
  if (spec.is_object()) {
    if (spec.size() == 1 && spec.contains("$artifact")) {
      if (!spec["$artifact"].is_string()) {
        return absl::FailedPreconditionError(Cat("job argument {\"$artifact\": ", spec["$artifact"].dump(),
                                                 "} does not name a parent job"));
      }
      const std::string& parent = spec["$artifact"].get_ref<const std::string&>();
      auto it = parents.find(parent);
      if (it == parents.end() || it->second.empty()) {
        return absl::FailedPreconditionError(
            Cat("job argument refers to '", parent, "', which is not a finished parent job"));
      }
      auto path = FileUriToPath(it->second);
      if (!path.ok()) {
        return absl::FailedPreconditionError(
            Cat("the artifact of parent job '", parent, "' (", it->second, ") is unusable: ", path.status().message()));
      }
      return json(*path);
    }
    json out = json::object();
    for (const auto& [k, v] : spec.items()) {
      auto r = ResolveArtifacts(v, parents);
      if (!r.ok()) return r.status();
      out[k] = *std::move(r);
    }
    return out;
  }
  if (spec.is_array()) {
    json out = json::array();
    for (const auto& v : spec) {
      auto r = ResolveArtifacts(v, parents);
      if (!r.ok()) return r.status();
      out.push_back(*std::move(r));
    }
    return out;
  }
  return spec;
}

}  // namespace btx::scheduler
