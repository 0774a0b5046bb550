#include "btx/contract/inputs.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <set>
#include <system_error>

#include "btx/contract/files.h"

namespace btx::contract {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool IsUserPath(const std::string& p) {
  // An artifact reference reaches here as its JSON text (Reader::Path keeps it that way).
  return !p.empty() && p.front() != '{' && p.find("://") == std::string::npos;
}

void Add(std::vector<Input>& out, std::string field, const std::string& path, InputKind kind) {
  if (IsUserPath(path)) out.push_back({std::move(field), path, kind});
}

void AddData(std::vector<Input>& out, const std::string& base, const DataSpec& d) {
  for (size_t i = 0; i < d.train.size(); ++i) Add(out, IndexPath(JoinPath(base, "train"), i), d.train[i], InputKind::kData);
  for (size_t i = 0; i < d.valid.size(); ++i) Add(out, IndexPath(JoinPath(base, "valid"), i), d.valid[i], InputKind::kData);
}

void AddTokenizer(std::vector<Input>& out, const std::string& field, const TokenizerSpec& t) {
  if (t.kind == TokenizerSpec::Kind::kSentencePiece) Add(out, field, t.path, InputKind::kTokenizer);
}

// A JSON object from a small file, or why not.
std::optional<std::string> SmallJsonObject(const std::string& path, size_t max_bytes, json& out) {
  auto text = ReadFile(path, max_bytes);
  if (!text.ok()) return std::string(text.status().message());
  out = json::parse(*text, nullptr, false);
  if (out.is_discarded() || !out.is_object()) return path + " is not a JSON object";
  return std::nullopt;
}

std::optional<std::string> CheckModelDir(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "expected a model directory (config.json and *.safetensors), found a file";
  json config;
  if (!fs::exists(dir + "/config.json", ec)) return "has no config.json: not a model directory";
  if (auto why = SmallJsonObject(dir + "/config.json", size_t{1} << 20, config)) return "config.json: " + *why;
  if (!config.contains("model_type") || !config["model_type"].is_string()) {
    return "config.json has no model_type (a Hugging Face config names its family)";
  }
  if (fs::exists(dir + "/model.safetensors", ec)) return std::nullopt;
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (!fs::exists(index_path, ec)) {
    return "has no weights: expected model.safetensors or model.safetensors.index.json (PyTorch .bin files are not read; "
           "convert with transformers' save_pretrained(safe_serialization=True))";
  }
  json index;
  if (auto why = SmallJsonObject(index_path, size_t{64} << 20, index)) return "model.safetensors.index.json: " + *why;
  if (!index.contains("weight_map") || !index["weight_map"].is_object() || index["weight_map"].empty()) {
    return "model.safetensors.index.json has no weight_map";
  }
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string()) return "model.safetensors.index.json: weight_map[\"" + name + "\"] is not a file name";
    shards.insert(file.get<std::string>());
  }
  for (const auto& s : shards) {
    if (s.find('/') != std::string::npos || s == "..") return "model.safetensors.index.json names '" + s + "' outside the directory";
    if (!fs::is_regular_file(dir + "/" + s, ec)) return "model.safetensors.index.json names shard " + s + ", which is missing";
  }
  return std::nullopt;
}

std::optional<std::string> CheckRegularReadable(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return "not a regular file";
  // Opening (not reading) is enough to learn about permissions without paying for a large file.
  auto text = ReadFile(path, 1);
  if (!text.ok() && text.status().code() != StatusCode::kInvalidArgument) return std::string(text.status().message());
  return std::nullopt;
}

std::optional<std::string> CheckData(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    // A directory is walked for files at run time; one without any would train on nothing.
    for (auto it = fs::recursive_directory_iterator(path, fs::directory_options::skip_permission_denied, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (it->is_regular_file(ec)) return std::nullopt;
    }
    if (ec) return "cannot list the directory: " + ec.message();
    return "the directory holds no files";
  }
  return CheckRegularReadable(path);
}

std::optional<std::string> CheckTokenizer(const std::string& path) {
  if (auto why = CheckRegularReadable(path)) return why;
  std::error_code ec;
  if (fs::file_size(path, ec) == 0) return "the tokenizer file is empty";
  return std::nullopt;
}

}  // namespace

std::vector<Input> InputsOf(const JobSpec& spec) {
  std::vector<Input> out;
  std::visit(
      [&](const auto& s) {
        using T = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<T, PretrainSpec>) {
          AddTokenizer(out, "tokenizer", s.tokenizer);
          AddData(out, "data", s.data);
        } else if constexpr (std::is_same_v<T, BranchSpec>) {
          Add(out, "seed", s.seed, InputKind::kModelDir);
          if (s.tokenizer) AddTokenizer(out, "tokenizer", *s.tokenizer);
          AddData(out, "data", s.data);
        } else if constexpr (std::is_same_v<T, MergeSpec>) {
          if (!s.seed.empty()) Add(out, "seed", s.seed, InputKind::kModelDir);
          for (size_t i = 0; i < s.experts.size(); ++i) {
            Add(out, JoinPath(IndexPath("experts", i), "model"), s.experts[i].second, InputKind::kModelDir);
          }
          for (const auto& [name, paths] : s.prompts) {
            for (size_t i = 0; i < paths.size(); ++i) Add(out, IndexPath("prompts." + name, i), paths[i], InputKind::kData);
          }
        } else if constexpr (std::is_same_v<T, FinetuneSpec>) {
          Add(out, "model", s.model, InputKind::kModelDir);
          if (s.tokenizer) AddTokenizer(out, "tokenizer", *s.tokenizer);
          for (size_t i = 0; i < s.mixture.size(); ++i) AddData(out, IndexPath("mixture", i), s.mixture[i].data);
        } else if constexpr (std::is_same_v<T, EvalSpec>) {
          for (size_t m = 0; m < s.models.size(); ++m) {
            for (size_t i = 0; i < s.models[m].dirs.size(); ++i) {
              Add(out, IndexPath(JoinPath(IndexPath("models", m), "dirs"), i), s.models[m].dirs[i], InputKind::kModelDir);
            }
          }
          for (size_t d = 0; d < s.domains.size(); ++d) {
            for (size_t i = 0; i < s.domains[d].valid.size(); ++i) {
              Add(out, IndexPath(JoinPath(IndexPath("domains", d), "valid"), i), s.domains[d].valid[i], InputKind::kData);
            }
          }
        }
      },
      spec);
  return out;
}

std::optional<std::string> CheckInput(const Input& input) {
  std::error_code ec;
  const auto st = fs::status(input.path, ec);
  if (ec || !fs::exists(st)) return std::nullopt;
  switch (input.kind) {
    case InputKind::kModelDir:
      return CheckModelDir(input.path);
    case InputKind::kTokenizer:
      return CheckTokenizer(input.path);
    case InputKind::kData:
      return CheckData(input.path);
  }
  return std::nullopt;
}

std::optional<std::string> CheckUnderRoots(const std::string& path, const std::vector<std::string>& roots) {
  if (roots.empty()) return std::nullopt;
  const fs::path p(path);
  if (!p.is_absolute()) return "expected an absolute path under the data roots";
  auto under = [&](const fs::path& candidate) {
    for (const auto& root : roots) {
      const fs::path rel = candidate.lexically_relative(fs::path(root));
      if (!rel.empty() && *rel.begin() != "..") return true;
    }
    return false;
  };
  std::string list;
  for (const auto& r : roots) list += (list.empty() ? "" : ", ") + r;
  const fs::path normal = p.lexically_normal();
  if (!under(normal)) return "outside the data roots (" + list + ")";
  // A symlink under a root may lead out of it: what counts is where reading it would go.
  std::error_code ec;
  const fs::path resolved = fs::weakly_canonical(normal, ec);
  if (!ec && !under(resolved)) return "resolves to " + resolved.string() + ", outside the data roots (" + list + ")";
  return std::nullopt;
}

}  // namespace btx::contract
