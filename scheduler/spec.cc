#include "btx/scheduler/spec.h"

#include <yaml-cpp/yaml.h>

#include <set>
#include <string_view>

#include "btx/common/strings.h"
#include "btx/common/uri.h"
#include "btx/rpc_status.h"

namespace btx::scheduler {
using json = nlohmann::json;
namespace {

// Length of the longest well-formed UTF-8 prefix (no overlongs, surrogates or code points above
// U+10FFFF). yaml-cpp passes any bytes through, but every spec string ends up in a JSON dump and in
// protobuf string fields, which both reject anything else.
size_t ValidUtf8Prefix(std::string_view s) {
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return i;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n;
  }
  return i;
}

// yaml-cpp's error messages quote single bytes of the input, e.g. after a backslash.
std::string ToValidUtf8(std::string_view s) {
  std::string out;
  while (!s.empty()) {
    const size_t n = ValidUtf8Prefix(s);
    out.append(s.substr(0, n));
    if (n < s.size()) out += '?';
    s.remove_prefix(std::min(n + 1, s.size()));
  }
  return out;
}

// Hand-written rather than std::regex: libstdc++'s regex recurses once per character, and a 50 kB
// scalar overflowed the stack.
size_t Digits(std::string_view s, size_t i) {
  size_t j = i;
  while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
  return j - i;
}
size_t SignLength(std::string_view s) { return !s.empty() && (s[0] == '-' || s[0] == '+') ? 1 : 0; }
// [-+]?[0-9]+
bool IsIntScalar(std::string_view s) {
  const size_t i = SignLength(s);
  return i < s.size() && Digits(s, i) == s.size() - i;
}
// [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
bool IsFloatScalar(std::string_view s) {
  size_t i = SignLength(s);
  const size_t whole = Digits(s, i);
  i += whole;
  if (i < s.size() && s[i] == '.') {
    const size_t frac = Digits(s, i + 1);
    if (whole == 0 && frac == 0) return false;
    i += 1 + frac;
  } else if (whole == 0) {
    return false;
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    const size_t j = i + 1 + SignLength(s.substr(i + 1));
    const size_t exponent = Digits(s, j);
    if (exponent == 0) return false;
    i = j + exponent;
  }
  return i == s.size();
}

// Aliases share nodes in yaml-cpp but are copied here, so a few lines of nested aliases ("billion
// laughs") would expand to gigabytes. `budget` bounds the expansion: each node costs one unit plus
// the bytes of its scalar or key.
void Spend(size_t& budget, size_t cost) {
  if (cost > budget) throw std::runtime_error("spec expands (through YAML aliases) beyond the size limit");
  budget -= cost;
}
std::string CheckedUtf8(std::string s) {
  if (ValidUtf8Prefix(s) != s.size()) {
    // yaml-cpp decodes the escapes \N and \_ to single bytes, not to UTF-8.
    throw std::runtime_error(Cat("a string decodes to invalid UTF-8 at byte ", ValidUtf8Prefix(s),
                                 " (for U+0085 and U+00A0 write \\u0085 and \\u00a0, not \\N and \\_)"));
  }
  return s;
}

// yaml-cpp keeps scalars untyped; apply YAML 1.2 core-schema typing, except for quoted scalars.
json ToJson(const YAML::Node& node, size_t& budget, int depth = 0) {
  if (depth > 32) throw std::runtime_error("nesting deeper than 32 levels");
  Spend(budget, 1);
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return nullptr;
    case YAML::NodeType::Sequence: {
      json arr = json::array();
      for (const auto& item : node) arr.push_back(ToJson(item, budget, depth + 1));
      return arr;
    }
    case YAML::NodeType::Map: {
      json obj = json::object();
      for (const auto& kv : node) {
        std::string key = CheckedUtf8(kv.first.as<std::string>());
        Spend(budget, key.size());
        if (obj.contains(key)) throw std::runtime_error("duplicate key '" + key + "'");
        obj[key] = ToJson(kv.second, budget, depth + 1);
      }
      return obj;
    }
    case YAML::NodeType::Scalar: {
      const std::string& s = node.Scalar();
      Spend(budget, s.size());
      if (node.Tag() == "!") return CheckedUtf8(s);  // quoted
      if (s == "true" || s == "True") return true;
      if (s == "false" || s == "False") return false;
      if (s == "null" || s == "~" || s.empty()) return nullptr;
      if (IsIntScalar(s)) {
        try {
          return std::stoll(s);
        } catch (...) {
          return s;
        }
      }
      if (IsFloatScalar(s)) return std::stod(s);
      return CheckedUtf8(s);
    }
  }
  return nullptr;
}

class Checker {
 public:
  std::vector<FieldViolation> violations;

  void Fail(const std::string& path, const json& value, const std::string& expected) {
    std::string shown = value.is_null() ? "missing" : value.dump();
    if (shown.size() > 80) {
      size_t cut = 77;  // not inside a multi-byte character, which would make the message invalid UTF-8
      while (cut > 0 && (static_cast<unsigned char>(shown[cut]) & 0xC0) == 0x80) --cut;
      shown = shown.substr(0, cut) + "...";
    }
    violations.push_back({path, Cat("got ", shown, "; expected ", expected)});
  }
  bool Object(const std::string& path, const json& v, const std::set<std::string>& allowed) {
    if (!v.is_object()) {
      Fail(path, v, "a mapping");
      return false;
    }
    for (const auto& [k, _] : v.items()) {
      if (!allowed.count(k)) {
        std::string names;
        for (const auto& a : allowed) names += (names.empty() ? "" : ", ") + a;
        violations.push_back({Join(path, k), Cat("unknown field; expected one of: ", names)});
      }
    }
    return true;
  }
  static std::string Join(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

  int64_t Int(json& obj, const std::string& path, const std::string& key, int64_t def, int64_t lo, int64_t hi) {
    if (!obj.contains(key) || obj[key].is_null()) return obj[key] = def, def;
    const json& v = obj[key];
    if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi) {
      Fail(Join(path, key), v, Cat("an integer in [", lo, ", ", hi, "]"));
      return def;
    }
    return v.get<int64_t>();
  }
  double Num(json& obj, const std::string& path, const std::string& key, double def, double lo, double hi) {
    if (!obj.contains(key) || obj[key].is_null()) return obj[key] = def, def;
    const json& v = obj[key];
    if (!v.is_number() || v.get<double>() < lo || v.get<double>() > hi) {
      Fail(Join(path, key), v, Cat("a number in [", lo, ", ", hi, "]"));
      return def;
    }
    return v.get<double>();
  }
  bool Bool(json& obj, const std::string& path, const std::string& key, bool def) {
    if (!obj.contains(key) || obj[key].is_null()) return obj[key] = def, def;
    if (!obj[key].is_boolean()) {
      Fail(Join(path, key), obj[key], "true or false");
      return def;
    }
    return obj[key].get<bool>();
  }
  std::string Enum(json& obj, const std::string& path, const std::string& key, const std::string& def,
                   const std::vector<std::string>& allowed) {
    if (!obj.contains(key) || obj[key].is_null()) return obj[key] = def, def;
    const json& v = obj[key];
    if (v.is_string() && std::find(allowed.begin(), allowed.end(), v.get<std::string>()) != allowed.end()) {
      return v.get<std::string>();
    }
    std::string names;
    for (const auto& a : allowed) names += (names.empty() ? "" : " | ") + a;
    Fail(Join(path, key), v, "one of " + names);
    return def;
  }
  std::string Name(json& obj, const std::string& path, const std::string& key) {
    const json v = obj.contains(key) ? obj[key] : json();
    if (!v.is_string() || !IsSafeComponent(v.get<std::string>()) || v.get<std::string>().size() > 64) {
      Fail(Join(path, key), v, "a name of 1-64 characters from [A-Za-z0-9._-]");
      return "";
    }
    return v.get<std::string>();
  }
  // A single path is shorthand for a list of one; it is normalised in place.
  void Paths(json& v, const std::string& path, bool required, int max) {
    if (v.is_null() && !required) return;
    if (v.is_string()) v = json::array({v});
    if (!v.is_array() || (required && v.empty()) || static_cast<int>(v.size()) > max) {
      Fail(path, v, Cat("a list of 1..", max, " paths"));
      return;
    }
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string p = Cat(path, "[", i, "]");
      if (!v[i].is_string() || v[i].get<std::string>().empty() || v[i].get<std::string>().size() > 4096 ||
          v[i].get<std::string>().find('\0') != std::string::npos) {
        Fail(p, v[i], "a non-empty path string");
      }
    }
  }
  void Data(json& obj, const std::string& path, const SpecLimits& limits) {
    if (!obj.contains("data")) return Fail(Join(path, "data"), json(), "a mapping with train (and optionally valid)");
    json& d = obj["data"];
    if (!Object(Join(path, "data"), d, {"train", "valid"})) return;
    json none;
    Paths(d.contains("train") ? d["train"] : none, Join(path, "data.train"), true, limits.max_data_paths);
    Paths(d.contains("valid") ? d["valid"] : none, Join(path, "data.valid"), false, limits.max_data_paths);
  }
};

void CheckTrain(Checker& c, json& spec) {
  if (!spec.contains("train")) spec["train"] = json::object();
  json& t = spec["train"];
  if (!c.Object("train", t, {"batch_tokens", "seq_len", "lr", "min_lr_ratio", "warmup", "schedule", "weight_decay",
                             "grad_clip", "grad_accum", "seed", "checkpoint_every", "threads", "log_every",
                             "valid_tokens", "keep_checkpoints"})) {
    return;
  }
  int64_t seq_len = c.Int(t, "train", "seq_len", 256, 8, 131072);
  int64_t batch = c.Int(t, "train", "batch_tokens", 8192, 8, int64_t{1} << 26);
  if (batch % std::max<int64_t>(seq_len, 1) != 0) c.Fail("train.batch_tokens", t["batch_tokens"], "a multiple of train.seq_len");
  c.Num(t, "train", "lr", 3e-4, 0, 10);
  c.Num(t, "train", "min_lr_ratio", 0.1, 0, 1);
  c.Int(t, "train", "warmup", 30, 0, 10'000'000);
  c.Enum(t, "train", "schedule", "cosine", {"cosine", "linear", "constant"});
  c.Num(t, "train", "weight_decay", 0.1, 0, 10);
  c.Num(t, "train", "grad_clip", 1.0, 0, 1e6);
  c.Int(t, "train", "grad_accum", 1, 1, 1024);
  c.Int(t, "train", "seed", 1234, 0, int64_t{1} << 62);
  c.Int(t, "train", "checkpoint_every", 50, 1, 10'000'000);
  c.Int(t, "train", "threads", 0, 0, 1024);
  c.Int(t, "train", "log_every", 10, 1, 10'000'000);
  c.Int(t, "train", "valid_tokens", 65536, 1, int64_t{1} << 40);
  c.Int(t, "train", "keep_checkpoints", 2, 1, 1000);
}

}  // namespace

absl::StatusOr<json> YamlToJson(const std::string& text, size_t max_bytes) {
  if (text.size() > max_bytes) {
    return absl::InvalidArgumentError(Cat("got ", text.size(), " bytes; expected at most ", max_bytes));
  }
  if (const size_t valid = ValidUtf8Prefix(text); valid != text.size()) {
    return absl::InvalidArgumentError(Cat("got invalid UTF-8 at byte ", valid, "; expected UTF-8 text"));
  }
  try {
    size_t budget = 2 * max_bytes;  // no document without aliases expands to more
    return ToJson(YAML::Load(text), budget);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(Cat("not valid YAML/JSON at line ", e.mark.line + 1, ", column ",
                                          e.mark.column + 1, ": ", ToValidUtf8(e.msg)));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(Cat("not valid YAML/JSON: ", ToValidUtf8(e.what())));
  }
}

absl::StatusOr<json> ParseSpec(const std::string& text, const SpecLimits& limits) {
  auto parsed = YamlToJson(text, limits.max_spec_bytes);
  if (!parsed.ok()) return InvalidFields({{"spec", std::string(parsed.status().message())}});
  json spec = *std::move(parsed);
  Checker c;
  if (!c.Object("", spec, {"name", "seed", "tokenizer", "experts", "train", "merge", "finetune", "evaluate", "resources"})) {
    return InvalidFields(c.violations);
  }
  c.Name(spec, "", "name");

  // seed: an existing model directory, or a model trained from scratch first.
  if (!spec.contains("seed")) {
    c.Fail("seed", json(), "{model: <dir>} or {init: {preset: ...}, pretrain: {...}}");
  } else if (c.Object("seed", spec["seed"], {"model", "init", "pretrain"})) {
    json& s = spec["seed"];
    const bool has_model = s.contains("model"), has_init = s.contains("init");
    if (has_model == has_init) {
      c.Fail("seed", s, "exactly one of seed.model or seed.init");
    } else if (has_model) {
      if (!s["model"].is_string() || s["model"].get<std::string>().empty()) c.Fail("seed.model", s["model"], "a model directory path");
      if (s.contains("pretrain")) c.Fail("seed.pretrain", s["pretrain"], "no pretrain with seed.model");
    } else {
      if (c.Object("seed.init", s["init"], {"preset", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                            "num_kv_heads", "vocab_size", "max_seq_len", "tie_embeddings"})) {
        c.Enum(s["init"], "seed.init", "preset", "tiny", {"tiny", "small"});
      }
      if (!s.contains("pretrain")) {
        c.Fail("seed.pretrain", json(), "a mapping with data and steps (seed.init needs pretraining)");
      } else if (c.Object("seed.pretrain", s["pretrain"], {"data", "steps"})) {
        c.Data(s["pretrain"], "seed.pretrain", limits);
        c.Int(s["pretrain"], "seed.pretrain", "steps", 400, 1, limits.max_steps);
      }
    }
  }
  if (!spec.contains("tokenizer")) spec["tokenizer"] = "byte";
  if (!spec["tokenizer"].is_string() || spec["tokenizer"].get<std::string>().empty()) {
    c.Fail("tokenizer", spec["tokenizer"], "\"byte\" or a sentencepiece model path");
  }

  std::set<std::string> expert_names;
  if (!spec.contains("experts") || !spec["experts"].is_array() || spec["experts"].empty() ||
      static_cast<int>(spec["experts"].size()) > limits.max_experts) {
    c.Fail("experts", spec.contains("experts") ? spec["experts"] : json(), Cat("a list of 1..", limits.max_experts, " experts"));
  } else {
    for (size_t i = 0; i < spec["experts"].size(); ++i) {
      const std::string path = Cat("experts[", i, "]");
      json& e = spec["experts"][i];
      if (!c.Object(path, e, {"name", "data", "steps"})) continue;
      std::string name = c.Name(e, path, "name");
      if (!name.empty() && !expert_names.insert(name).second) c.Fail(path + ".name", e["name"], "a name not used by another expert");
      c.Data(e, path, limits);
      c.Int(e, path, "steps", 300, 1, limits.max_steps);
    }
  }
  CheckTrain(c, spec);

  if (!spec.contains("merge")) spec["merge"] = json::object();
  std::string method = "btx";
  bool keep_seed_expert = false;  // from the checker: merge may be a non-mapping or hold a non-boolean
  if (c.Object("merge", spec["merge"], {"method", "keep_seed_expert", "router_init"})) {
    method = c.Enum(spec["merge"], "merge", "method", "btx", {"btx", "upcycle", "btm"});
    keep_seed_expert = c.Bool(spec["merge"], "merge", "keep_seed_expert", false);
    c.Enum(spec["merge"], "merge", "router_init", "random", {"random", "hidden"});
  }
  const int64_t num_experts = static_cast<int64_t>(expert_names.size()) + (keep_seed_expert ? 1 : 0);
  if (!spec.contains("finetune")) spec["finetune"] = json::object();
  if (c.Object("finetune", spec["finetune"], {"top_k", "steps", "mixture", "freeze", "load_balance", "z_loss", "router"})) {
    json& f = spec["finetune"];
    c.Int(f, "finetune", "top_k", std::min<int64_t>(2, std::max<int64_t>(num_experts, 1)), 1, std::max<int64_t>(num_experts, 1));
    c.Int(f, "finetune", "steps", 200, 0, limits.max_steps);
    c.Num(f, "finetune", "load_balance", 0.01, 0, 100);
    c.Num(f, "finetune", "z_loss", 0.001, 0, 100);
    c.Enum(f, "finetune", "router", "softmax_topk", {"softmax_topk", "sparsemixer"});
    if (!f.contains("freeze")) f["freeze"] = json::array();
    if (!f["freeze"].is_array()) {
      c.Fail("finetune.freeze", f["freeze"], "a list of experts | attention | embeddings | all_but_router");
    } else {
      for (size_t i = 0; i < f["freeze"].size(); ++i) {
        const json& v = f["freeze"][i];
        static const std::set<std::string> kFreeze = {"experts", "attention", "embeddings", "all_but_router"};
        if (!v.is_string() || !kFreeze.count(v.get<std::string>())) {
          c.Fail(Cat("finetune.freeze[", i, "]"), v, "experts | attention | embeddings | all_but_router");
        }
      }
    }
    if (!f.contains("mixture")) {
      f["mixture"] = json::object();
      for (const auto& n : expert_names) f["mixture"][n] = 1.0;
    } else if (c.Object("finetune.mixture", f["mixture"], expert_names)) {
      for (auto& [k, v] : f["mixture"].items()) {
        if (!v.is_number() || v.get<double>() < 0) c.Fail("finetune.mixture." + k, v, "a weight >= 0");
      }
    }
  }
  if (!spec.contains("evaluate")) spec["evaluate"] = json::object();
  if (c.Object("evaluate", spec["evaluate"], {"baselines", "max_tokens"})) {
    json& e = spec["evaluate"];
    c.Int(e, "evaluate", "max_tokens", 65536, 1, int64_t{1} << 40);
    if (!e.contains("baselines")) e["baselines"] = json::array({"seed", "experts"});
    if (!e["baselines"].is_array()) {
      c.Fail("evaluate.baselines", e["baselines"], "a list of seed | experts | btm | upcycle");
    } else {
      for (size_t i = 0; i < e["baselines"].size(); ++i) {
        const json& v = e["baselines"][i];
        static const std::set<std::string> kBaselines = {"seed", "experts", "btm", "upcycle"};
        if (!v.is_string() || !kBaselines.count(v.get<std::string>())) {
          c.Fail(Cat("evaluate.baselines[", i, "]"), v, "seed | experts | btm | upcycle");
        }
      }
    }
  }
  if (!spec.contains("resources")) spec["resources"] = json::object();
  if (c.Object("resources", spec["resources"], {"gpus_per_job", "max_attempts"})) {
    c.Int(spec["resources"], "resources", "gpus_per_job", 0, 0, 64);
    c.Int(spec["resources"], "resources", "max_attempts", 3, 1, limits.max_attempts);
  }
  if (!c.violations.empty()) return InvalidFields(c.violations);
  return spec;
}

std::vector<storage::NewJob> PlanJobs(const json& spec) {
  std::vector<storage::NewJob> jobs;
  const int gpus = spec["resources"]["gpus_per_job"].get<int>();
  const int attempts = spec["resources"]["max_attempts"].get<int>();
  auto add = [&](std::string name, std::string kind, json job_spec, std::vector<std::string> deps, int priority) {
    // Every artifact a job reads must come from a dependency, or it cannot be resolved at lease time.
    std::function<void(const json&)> collect = [&](const json& v) {
      if (v.is_object() && v.size() == 1 && v.contains("$artifact")) {
        deps.push_back(v["$artifact"].get<std::string>());
      } else if (v.is_structured()) {
        for (const auto& child : v) collect(child);
      }
    };
    collect(job_spec);
    std::sort(deps.begin(), deps.end());
    deps.erase(std::unique(deps.begin(), deps.end()), deps.end());
    jobs.push_back({std::move(name), std::move(kind), job_spec.dump(), std::move(deps), attempts, gpus, priority});
  };
  const json& train = spec["train"];
  const std::string tokenizer = spec["tokenizer"];
  json seed_ref;
  std::vector<std::string> seed_deps;
  if (spec["seed"].contains("init")) {
    const json& pre = spec["seed"]["pretrain"];
    add("pretrain", "pretrain",
        {{"init", spec["seed"]["init"]}, {"tokenizer", tokenizer}, {"data", pre["data"]}, {"train", train}, {"steps", pre["steps"]}},
        {}, 0);
    seed_ref = {{"$artifact", "pretrain"}};
    seed_deps = {"pretrain"};
  } else {
    seed_ref = spec["seed"]["model"];
  }
  const std::string method = spec["merge"]["method"];
  std::vector<std::string> branches;
  json experts = json::array(), domains = json::array();
  for (const auto& e : spec["experts"]) {
    const std::string name = e["name"];
    domains.push_back({{"name", name}, {"valid", e["data"].value("valid", e["data"]["train"])}, {"train", e["data"]["train"]}});
    if (method == "upcycle") continue;  // upcycling copies the seed FFN: nothing to train
    add("branch/" + name, "branch",
        {{"seed", seed_ref}, {"name", name}, {"tokenizer", tokenizer}, {"data", e["data"]}, {"train", train}, {"steps", e["steps"]}},
        seed_deps, 1);
    branches.push_back("branch/" + name);
    experts.push_back({{"name", name}, {"model", {{"$artifact", "branch/" + name}}}});
  }
  const json& ft = spec["finetune"];
  json mixture = json::array();
  for (const auto& d : domains) {
    mixture.push_back({{"name", d["name"]}, {"weight", ft["mixture"].value(d["name"].get<std::string>(), 1.0)},
                       {"train", d["train"]}, {"valid", d["valid"]}});
  }
  auto merge_spec = [&](const std::string& m, const json& ex) {
    return json{{"method", m}, {"seed", seed_ref}, {"experts", ex}, {"keep_seed_expert", spec["merge"]["keep_seed_expert"]},
                {"router_init", spec["merge"]["router_init"]}, {"top_k", ft["top_k"]}, {"data", mixture}};
  };
  auto finetune_spec = [&](const std::string& model_job) {
    return json{{"model", {{"$artifact", model_job}}}, {"mixture", mixture}, {"train", train}, {"steps", ft["steps"]},
                {"top_k", ft["top_k"]}, {"freeze", ft["freeze"]}, {"load_balance", ft["load_balance"]},
                {"z_loss", ft["z_loss"]}, {"router", ft["router"]}};
  };
  std::vector<std::string> merge_deps = method == "upcycle" ? seed_deps : branches;
  json upcycle_experts = json::array();
  for (const auto& d : domains) upcycle_experts.push_back({{"name", d["name"]}, {"model", seed_ref}});
  add("merge", "merge", merge_spec(method, method == "upcycle" ? upcycle_experts : experts), merge_deps, 2);
  json eval_models = json::array();
  std::vector<std::string> eval_deps;
  if (method == "btm") {
    eval_models.push_back({{"name", "btm"}, {"model", {{"$artifact", "merge"}}}});
    eval_deps.push_back("merge");
  } else {
    add("finetune", "finetune", finetune_spec("merge"), {"merge"}, 3);
    eval_models.push_back({{"name", method}, {"model", {{"$artifact", "finetune"}}}});
    eval_deps.push_back("finetune");
  }
  for (const auto& b : spec["evaluate"]["baselines"]) {
    const std::string base = b;
    if (base == "seed") {
      eval_models.push_back({{"name", "seed"}, {"model", seed_ref}});
      eval_deps.insert(eval_deps.end(), seed_deps.begin(), seed_deps.end());
    } else if (base == "experts") {
      for (const auto& ex : experts) eval_models.push_back({{"name", "expert/" + ex["name"].get<std::string>()}, {"model", ex["model"]}});
      eval_deps.insert(eval_deps.end(), branches.begin(), branches.end());
    } else if (base == "btm" && !branches.empty()) {
      // BTM in both of its forms: the parameter average and the output ensemble of the experts.
      if (method != "btm") {
        add("baseline/btm", "merge", merge_spec("btm", experts), branches, 2);
        eval_models.push_back({{"name", "btm"}, {"model", {{"$artifact", "baseline/btm"}}}});
        eval_deps.push_back("baseline/btm");
      }
      json members = json::array();
      for (const auto& ex : experts) members.push_back(ex["model"]);
      eval_models.push_back({{"name", "ensemble"}, {"ensemble", members}});
      eval_deps.insert(eval_deps.end(), branches.begin(), branches.end());
    } else if (base == "upcycle" && method != "upcycle") {
      // Matched finetune steps: the upcycled MoE gets the same router finetune as the BTX model.
      add("baseline/upcycle", "merge", merge_spec("upcycle", upcycle_experts), seed_deps, 2);
      add("baseline/upcycle-finetune", "finetune", finetune_spec("baseline/upcycle"), {"baseline/upcycle"}, 3);
      eval_models.push_back({{"name", "upcycle"}, {"model", {{"$artifact", "baseline/upcycle-finetune"}}}});
      eval_deps.push_back("baseline/upcycle-finetune");
    }
  }
  std::sort(eval_deps.begin(), eval_deps.end());
  eval_deps.erase(std::unique(eval_deps.begin(), eval_deps.end()), eval_deps.end());
  add("eval", "eval",
      {{"models", eval_models}, {"domains", domains}, {"tokenizer", tokenizer}, {"top_k", ft["top_k"]},
       {"max_tokens", spec["evaluate"]["max_tokens"]}, {"seq_len", train["seq_len"]}},
      eval_deps, 4);
  return jobs;
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
