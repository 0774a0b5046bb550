// Strict reading of JSON objects with errors that name the field: the one way a spec is read, by the
// scheduler at submit and by btx-train from JOB.json. Unknown keys are errors that list the allowed ones;
// a missing or null field takes its default; every value is checked against its bounds.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace btx::contract {

struct FieldError {
  std::string path;     // "train.lr", "experts[1].data.train[0]"
  std::string message;  // "got 0; expected a number in (0, 10]"
};
using FieldErrors = std::vector<FieldError>;

std::string JoinPath(std::string_view base, std::string_view key);  // "train" + "lr" -> "train.lr"
std::string IndexPath(std::string_view base, size_t index);         // "experts" + 1 -> "experts[1]"
// "path: message; path: message" (for btx-train's one-line stderr message and logs).
std::string Describe(const FieldErrors& errors);

// A closed or open interval for numbers; the message says which, e.g. "a number in (0, 10]".
struct Range {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = false;
  bool hi_open = false;
};

// Pipeline specs refer to a parent job's output before it exists: {"$artifact": "<job name>"}.
bool IsArtifactRef(const nlohmann::json& v);

class Reader {
 public:
  // allow_artifact_refs: a model-directory field may hold {"$artifact": name} (submit time), or must be
  // a path (btx-train, after the scheduler resolved every reference).
  explicit Reader(FieldErrors& errors, bool allow_artifact_refs = false)
      : errors_(errors), allow_refs_(allow_artifact_refs) {}

  void Fail(const std::string& path, const nlohmann::json& value, const std::string& expected);
  void FailMissing(const std::string& path, const std::string& expected);
  // A mapping whose keys are all in `allowed`. `hints` names likely mistakes: {"num_layers", "num_hidden_layers"}.
  bool Object(const std::string& path, const nlohmann::json& v, const std::vector<std::string>& allowed,
              const std::vector<std::pair<std::string, std::string>>& hints = {});

  // obj[key], or the default when obj lacks it (or holds null). obj must have passed Object().
  int64_t Int(const nlohmann::json& obj, const std::string& path, const char* key, int64_t def, int64_t lo, int64_t hi);
  double Num(const nlohmann::json& obj, const std::string& path, const char* key, double def, Range range);
  bool Bool(const nlohmann::json& obj, const std::string& path, const char* key, bool def);
  std::string Enum(const nlohmann::json& obj, const std::string& path, const char* key, const std::string& def,
                   const std::vector<std::string>& allowed);
  // A required string of 1..max_len bytes without NUL.
  std::string String(const nlohmann::json& obj, const std::string& path, const char* key, size_t max_len = 4096);
  // A name of 1-64 characters from [A-Za-z0-9._-] (it becomes part of artifact paths and metric labels).
  std::string Name(const nlohmann::json& obj, const std::string& path, const char* key);
  // A filesystem path (or, when allowed, an artifact reference, returned as its JSON text).
  std::string Path(const nlohmann::json& v, const std::string& path);
  std::string PathField(const nlohmann::json& obj, const std::string& path, const char* key, bool required);
  // A path or a list of 1..max_paths of them.
  std::vector<std::string> Paths(const nlohmann::json& v, const std::string& path, size_t max_paths = 1024);
  // A list of strings each in `allowed`.
  std::vector<std::string> EnumList(const nlohmann::json& obj, const std::string& path, const char* key,
                                    const std::vector<std::string>& allowed);

  bool ok() const { return errors_.empty(); }
  FieldErrors& errors() { return errors_; }

 private:
  FieldErrors& errors_;
  bool allow_refs_;
};

}  // namespace btx::contract
