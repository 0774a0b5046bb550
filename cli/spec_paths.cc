#include "spec_paths.h"

#include <filesystem>

#include "btx/common/strings.h"
#include "btx/scheduler/yaml.h"

namespace btx::cli {
using json = nlohmann::json;
namespace {

class Rewriter {
 public:
  Rewriter(const PathContext& ctx, RewrittenSpec& out) : ctx_(ctx), out_(out) {}

  void One(json& v, const std::string& field) {
    if (!v.is_string()) return;
    const std::string before = v.get<std::string>();
    const std::string after = AbsolutizePath(before, ctx_);
    if (after != before) {
      v = after;
      out_.rewritten.push_back(field);
    }
    if (!after.empty() && after.find("://") == std::string::npos) out_.paths.emplace_back(field, after);
  }
  void OneOrList(json& v, const std::string& field) {
    if (v.is_array()) {
      for (size_t i = 0; i < v.size(); ++i) One(v[i], Cat(field, "[", i, "]"));
    } else {
      One(v, field);
    }
  }
  void Data(json& owner, const std::string& field) {
    if (!owner.is_object() || !owner.contains("data") || !owner["data"].is_object()) return;
    for (const char* key : {"train", "valid"}) {
      if (owner["data"].contains(key)) OneOrList(owner["data"][key], Cat(field, ".data.", key));
    }
  }

 private:
  const PathContext& ctx_;
  RewrittenSpec& out_;
};

}  // namespace

std::string AbsolutizePath(const std::string& path, const PathContext& ctx) {
  if (path.empty() || path.front() == '/' || path.find("://") != std::string::npos) return path;
  if (!ctx.home.empty() && (path == "~" || path.rfind("~/", 0) == 0)) {
    return std::filesystem::path(ctx.home + path.substr(1)).lexically_normal().string();
  }
  std::string out = (std::filesystem::path(ctx.cwd) / path).lexically_normal().string();
  // "dir/" normalises to "dir/"; keep it, a trailing slash is harmless and says "directory".
  return out;
}

RewrittenSpec AbsolutizeSpecPaths(const std::string& text, const PathContext& ctx) {
  RewrittenSpec out;
  // The scheduler's own parser: the same typing, and the same limits on hostile input.
  auto parsed = scheduler::YamlToJson(text);
  if (!parsed.ok() || !parsed->is_object()) {
    out.text = text;
    return out;
  }
  json spec = *std::move(parsed);
  Rewriter r(ctx, out);
  if (spec.contains("seed") && spec["seed"].is_object()) {
    json& seed = spec["seed"];
    if (seed.contains("model")) r.One(seed["model"], "seed.model");
    if (seed.contains("pretrain")) r.Data(seed["pretrain"], "seed.pretrain");
  }
  if (spec.contains("tokenizer")) {
    // The two forms of contract::ParseTokenizer that name a file; "byte" and {type: ...} name none.
    json& t = spec["tokenizer"];
    if (t.is_string() && t.get<std::string>() != "byte") r.One(t, "tokenizer");
    if (t.is_object() && t.contains("sentencepiece")) r.One(t["sentencepiece"], "tokenizer.sentencepiece");
  }
  if (spec.contains("experts") && spec["experts"].is_array()) {
    for (size_t i = 0; i < spec["experts"].size(); ++i) r.Data(spec["experts"][i], Cat("experts[", i, "]"));
  }
  out.parsed = true;
  out.text = spec.dump();
  out.spec = std::move(spec);
  return out;
}

}  // namespace btx::cli
