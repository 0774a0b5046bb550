#include "btx/contract/fields.h"

#include <algorithm>
#include <sstream>

namespace btx::contract {
using json = nlohmann::json;
namespace {

std::string NumText(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// At most ~80 bytes of the offending value, never cut inside a UTF-8 character.
std::string Shown(const json& value) {
  std::string shown = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (shown.size() > 80) {
    size_t cut = 77;
    while (cut > 0 && (static_cast<unsigned char>(shown[cut]) & 0xC0) == 0x80) --cut;
    shown = shown.substr(0, cut) + "...";
  }
  return shown;
}

bool Missing(const json& obj, const char* key) { return !obj.is_object() || !obj.contains(key) || obj[key].is_null(); }

std::string Alternatives(const std::vector<std::string>& allowed, const char* sep) {
  std::string out;
  for (const auto& a : allowed) out += (out.empty() ? "" : sep) + a;
  return out;
}

}  // namespace

std::string JoinPath(std::string_view base, std::string_view key) {
  std::string out(base);
  if (!out.empty()) out += '.';
  out += key;
  return out;
}

std::string IndexPath(std::string_view base, size_t index) {
  return std::string(base) + "[" + std::to_string(index) + "]";
}

std::string Describe(const FieldErrors& errors) {
  std::string out;
  for (const auto& e : errors) out += (out.empty() ? "" : "; ") + (e.path.empty() ? "" : e.path + ": ") + e.message;
  return out;
}

bool IsArtifactRef(const json& v) { return v.is_object() && v.size() == 1 && v.contains("$artifact"); }

void Reader::Fail(const std::string& path, const json& value, const std::string& expected) {
  errors_.push_back({path, "got " + Shown(value) + "; expected " + expected});
}

void Reader::FailMissing(const std::string& path, const std::string& expected) {
  errors_.push_back({path, "missing; expected " + expected});
}

bool Reader::Object(const std::string& path, const json& v, const std::vector<std::string>& allowed,
                    const std::vector<std::pair<std::string, std::string>>& hints) {
  if (!v.is_object()) {
    if (v.is_null()) FailMissing(path, "a mapping");
    else Fail(path, v, "a mapping");
    return false;
  }
  for (const auto& [k, _] : v.items()) {
    if (std::find(allowed.begin(), allowed.end(), k) != allowed.end()) continue;
    std::string message = "unknown field";
    for (const auto& [wrong, right] : hints) {
      if (wrong == k) message += "; did you mean " + right + "?";
    }
    errors_.push_back({JoinPath(path, k), message + "; expected one of: " + Alternatives(allowed, ", ")});
  }
  return true;
}

int64_t Reader::Int(const json& obj, const std::string& path, const char* key, int64_t def, int64_t lo, int64_t hi) {
  if (Missing(obj, key)) return def;
  const json& v = obj[key];
  if (v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
    const auto i = v.get<int64_t>();
    if (i >= lo && i <= hi) return i;
  }
  Fail(JoinPath(path, key), v, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return def;
}

double Reader::Num(const json& obj, const std::string& path, const char* key, double def, Range range) {
  if (Missing(obj, key)) return def;
  const json& v = obj[key];
  if (v.is_number()) {
    const double d = v.get<double>();
    const bool above = range.lo_open ? d > range.lo : d >= range.lo;
    const bool below = range.hi_open ? d < range.hi : d <= range.hi;
    if (above && below) return d;
  }
  Fail(JoinPath(path, key), v,
       std::string("a number in ") + (range.lo_open ? "(" : "[") + NumText(range.lo) + ", " + NumText(range.hi) +
           (range.hi_open ? ")" : "]"));
  return def;
}

bool Reader::Bool(const json& obj, const std::string& path, const char* key, bool def) {
  if (Missing(obj, key)) return def;
  if (obj[key].is_boolean()) return obj[key].get<bool>();
  Fail(JoinPath(path, key), obj[key], "true or false");
  return def;
}

std::string Reader::Enum(const json& obj, const std::string& path, const char* key, const std::string& def,
                         const std::vector<std::string>& allowed) {
  if (Missing(obj, key)) return def;
  const json& v = obj[key];
  if (v.is_string() && std::find(allowed.begin(), allowed.end(), v.get<std::string>()) != allowed.end()) {
    return v.get<std::string>();
  }
  Fail(JoinPath(path, key), v, "one of " + Alternatives(allowed, " | "));
  return def;
}

std::string Reader::String(const json& obj, const std::string& path, const char* key, size_t max_len) {
  const json v = Missing(obj, key) ? json() : obj[key];
  if (v.is_string() && !v.get<std::string>().empty() && v.get<std::string>().size() <= max_len &&
      v.get<std::string>().find('\0') == std::string::npos) {
    return v.get<std::string>();
  }
  const std::string expected = "a non-empty string of at most " + std::to_string(max_len) + " bytes";
  if (v.is_null()) FailMissing(JoinPath(path, key), expected);
  else Fail(JoinPath(path, key), v, expected);
  return "";
}

std::string Reader::Name(const json& obj, const std::string& path, const char* key) {
  const json v = Missing(obj, key) ? json() : obj[key];
  auto safe = [](const std::string& s) {
    return !s.empty() && s.size() <= 64 && s != "." && s != ".." && std::all_of(s.begin(), s.end(), [](char c) {
      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    });
  };
  if (v.is_string() && safe(v.get<std::string>())) return v.get<std::string>();
  const std::string expected = "a name of 1-64 characters from [A-Za-z0-9._-]";
  if (v.is_null()) FailMissing(JoinPath(path, key), expected);
  else Fail(JoinPath(path, key), v, expected);
  return "";
}

std::string Reader::Path(const json& v, const std::string& path) {
  if (allow_refs_ && IsArtifactRef(v)) {
    if (v["$artifact"].is_string()) return v.dump();
    Fail(path, v, "{\"$artifact\": <parent job name>}");
    return "";
  }
  if (v.is_string() && !v.get<std::string>().empty() && v.get<std::string>().size() <= 4096 &&
      v.get<std::string>().find('\0') == std::string::npos) {
    return v.get<std::string>();
  }
  if (v.is_null()) FailMissing(path, "a path");
  else Fail(path, v, "a non-empty path of at most 4096 bytes");
  return "";
}

std::string Reader::PathField(const json& obj, const std::string& path, const char* key, bool required) {
  if (Missing(obj, key)) {
    if (required) FailMissing(JoinPath(path, key), "a path");
    return "";
  }
  return Path(obj[key], JoinPath(path, key));
}

std::vector<std::string> Reader::Paths(const json& v, const std::string& path, size_t max_paths) {
  std::vector<std::string> out;
  if (v.is_string() || (allow_refs_ && IsArtifactRef(v))) {
    out.push_back(Path(v, path));
    return out;
  }
  const std::string expected = "a path or a list of 1.." + std::to_string(max_paths) + " paths";
  if (!v.is_array() || v.empty() || v.size() > max_paths) {
    if (v.is_null()) FailMissing(path, expected);
    else Fail(path, v, expected);
    return out;
  }
  for (size_t i = 0; i < v.size(); ++i) out.push_back(Path(v[i], IndexPath(path, i)));
  return out;
}

std::vector<std::string> Reader::EnumList(const json& obj, const std::string& path, const char* key,
                                          const std::vector<std::string>& allowed) {
  std::vector<std::string> out;
  if (Missing(obj, key)) return out;
  const json& v = obj[key];
  const std::string field = JoinPath(path, key);
  if (!v.is_array()) {
    Fail(field, v, "a list of " + Alternatives(allowed, " | "));
    return out;
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i].is_string() && std::find(allowed.begin(), allowed.end(), v[i].get<std::string>()) != allowed.end()) {
      out.push_back(v[i].get<std::string>());
    } else {
      Fail(IndexPath(field, i), v[i], Alternatives(allowed, " | "));
    }
  }
  return out;
}

}  // namespace btx::contract
