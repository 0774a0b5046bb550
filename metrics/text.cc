#include "text.h"

#include <charconv>
#include <cmath>

namespace btx::metrics::text {
namespace {

bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// Length of the well-formed UTF-8 sequence at the start of `s`, or 0 if there is none
// (Unicode 15, table 3-7).
std::size_t Utf8SequenceLength(std::string_view s) {
  const auto b = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  const auto in = [](unsigned char c, unsigned lo, unsigned hi) { return c >= lo && c <= hi; };
  const unsigned char c0 = b(0);
  if (c0 < 0x80) return 1;
  if (in(c0, 0xC2, 0xDF)) return s.size() >= 2 && in(b(1), 0x80, 0xBF) ? 2 : 0;
  if (in(c0, 0xE0, 0xEF)) {
    if (s.size() < 3) return 0;
    const unsigned lo = c0 == 0xE0 ? 0xA0 : 0x80;  // no overlongs
    const unsigned hi = c0 == 0xED ? 0x9F : 0xBF;  // no surrogates
    return in(b(1), lo, hi) && in(b(2), 0x80, 0xBF) ? 3 : 0;
  }
  if (in(c0, 0xF0, 0xF4)) {
    if (s.size() < 4) return 0;
    const unsigned lo = c0 == 0xF0 ? 0x90 : 0x80;  // no overlongs
    const unsigned hi = c0 == 0xF4 ? 0x8F : 0xBF;  // nothing above U+10FFFF
    return in(b(1), lo, hi) && in(b(2), 0x80, 0xBF) && in(b(3), 0x80, 0xBF) ? 4 : 0;
  }
  return 0;
}

}  // namespace

bool IsValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (!(IsAlpha(c) || c == '_' || c == ':' || (i > 0 && IsDigit(c)))) return false;
  }
  return true;
}

bool IsValidLabelName(std::string_view name) {
  if (name.empty()) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (!(IsAlpha(c) || c == '_' || (i > 0 && IsDigit(c)))) return false;
  }
  return true;
}

void AppendDouble(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
  } else {
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof buf, v);  // shortest round-trip form
    out.append(buf, r.ptr);
  }
}

std::string FormatDouble(double v) {
  std::string s;
  AppendDouble(s, v);
  return s;
}

void AppendEscapedLabelValue(std::string& out, std::string_view v) {
  for (const char c : v) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      default: out += c;
    }
  }
}

void AppendEscapedHelp(std::string& out, std::string_view v) {
  for (const char c : v) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default: out += c;
    }
  }
}

std::string SanitizeUtf8(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  while (!v.empty()) {
    const std::size_t n = Utf8SequenceLength(v);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      v.remove_prefix(1);
    } else {
      out.append(v.substr(0, n));
      v.remove_prefix(n);
    }
  }
  return out;
}

}  // namespace btx::metrics::text
