// Pieces of the text exposition format shared by the registry and its tests.
#pragma once

#include <string>
#include <string_view>

namespace btx::metrics::text {

bool IsValidMetricName(std::string_view name);  // [a-zA-Z_:][a-zA-Z0-9_:]*
bool IsValidLabelName(std::string_view name);   // [a-zA-Z_][a-zA-Z0-9_]*

// Shortest decimal that parses back to the same double; +Inf, -Inf and NaN as Prometheus
// spells them.
void AppendDouble(std::string& out, double v);
std::string FormatDouble(double v);

void AppendEscapedLabelValue(std::string& out, std::string_view v);  // \\, \" and \n
void AppendEscapedHelp(std::string& out, std::string_view v);        // \\ and \n

// Replaces every byte sequence that is not well-formed UTF-8 (overlongs and surrogates
// included) with U+FFFD; Prometheus refuses a whole scrape over one such label value.
std::string SanitizeUtf8(std::string_view v);

}  // namespace btx::metrics::text
