// UTF-8 for protobuf string fields. proto3 string fields must hold valid UTF-8: one invalid byte in a
// message makes the receiver reject all of it. Whatever the services put in such a field from bytes
// they do not control (a child's output, file names, an error message quoting them) goes through here.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace btx {

// Well-formed UTF-8 as Unicode defines it (no overlong forms, surrogates or code points above U+10FFFF).
bool IsValidUtf8(std::string_view s);

// `s` with every ill-formed sequence replaced by U+FFFD, one per maximal subpart (Unicode 15, §3.9, "U+FFFD
// substitution of maximal subparts", as the WHATWG decoder does). Valid input comes back unchanged.
std::string SanitizeUtf8(std::string_view s);
// The same, in place, without copying valid input.
void SanitizeUtf8InPlace(std::string& s);

// The longest prefix of `s` of at most `max_bytes` bytes that does not end inside a multi-byte character:
// a prefix of valid UTF-8 cut here is valid UTF-8.
std::string_view Utf8Prefix(std::string_view s, size_t max_bytes);

}  // namespace btx
