#include "btx/scheduler/yaml.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string_view>

#include "btx/common/strings.h"

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

}  // namespace btx::scheduler
