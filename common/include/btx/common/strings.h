// String building that accepts std::string_view. Debian's Abseil is built without
// std::string_view aliasing, so absl::StrCat does not take std::string_view arguments.
#pragma once

#include <cctype>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "absl/strings/string_view.h"

namespace btx {
namespace strings_internal {
inline void Append(std::string& s, std::string_view v) { s.append(v); }
inline void Append(std::string& s, const char* v) { s.append(v); }
inline void Append(std::string& s, const std::string& v) { s.append(v); }
inline void Append(std::string& s, absl::string_view v) { s.append(v.data(), v.size()); }
inline void Append(std::string& s, char c) { s.push_back(c); }
template <typename T>
  requires(std::is_arithmetic_v<T> && !std::is_same_v<T, char>)
void Append(std::string& s, T v) {
  if constexpr (std::is_same_v<T, bool>) {
    s.append(v ? "true" : "false");
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    int n = std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
    s.append(buf, n);
  } else {
    s.append(std::to_string(v));
  }
}
}  // namespace strings_internal

template <typename... Args>
std::string Cat(const Args&... args) {
  std::string s;
  (strings_internal::Append(s, args), ...);
  return s;
}

// Splits on a character; keeps empty pieces unless skip_empty.
inline std::vector<std::string> Split(std::string_view s, char sep, bool skip_empty = false) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t pos = s.find(sep, start);
    std::string_view piece = s.substr(start, pos == std::string_view::npos ? std::string_view::npos : pos - start);
    if (!(skip_empty && piece.empty())) out.emplace_back(piece);
    if (pos == std::string_view::npos) break;
    start = pos + 1;
  }
  return out;
}

// The canonical 8-4-4-4-12 hex form PostgreSQL prints for uuid columns.
inline bool IsUuid(std::string_view s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return false;
    } else if (!std::isxdigit(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  return true;
}

}  // namespace btx
