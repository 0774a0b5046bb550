#include "text.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>

namespace btx::metrics::text {
namespace {

TEST(FormatDouble, SpellsSpecialValuesAsPrometheus) {
  EXPECT_EQ(FormatDouble(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatDouble(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatDouble(std::numeric_limits<double>::quiet_NaN()), "NaN");
}

TEST(FormatDouble, UsesShortestForm) {
  EXPECT_EQ(FormatDouble(0), "0");
  EXPECT_EQ(FormatDouble(1), "1");
  EXPECT_EQ(FormatDouble(-2.5), "-2.5");
  EXPECT_EQ(FormatDouble(0.1), "0.1");
  EXPECT_EQ(FormatDouble(0.005), "0.005");
  EXPECT_EQ(FormatDouble(1e-9), "1e-09");
  EXPECT_EQ(FormatDouble(1e21), "1e+21");
  EXPECT_EQ(FormatDouble(1700000000.25), "1700000000.25");
}

TEST(FormatDouble, RoundTripsThroughStrtod) {
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<std::uint64_t> bits;
  int checked = 0;
  while (checked < 10000) {
    double v;
    const std::uint64_t b = bits(rng);
    std::memcpy(&v, &b, sizeof v);
    if (!std::isfinite(v)) continue;
    const std::string s = FormatDouble(v);
    EXPECT_EQ(std::strtod(s.c_str(), nullptr), v) << s;
    ++checked;
  }
  for (double v : {std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::max(),
                   std::numeric_limits<double>::min(), 0.1 + 0.2}) {
    EXPECT_EQ(std::strtod(FormatDouble(v).c_str(), nullptr), v);
  }
}

TEST(Escaping, LabelValuesEscapeBackslashQuoteNewline) {
  std::string out;
  AppendEscapedLabelValue(out, "a\\b\"c\nd\te");
  EXPECT_EQ(out, "a\\\\b\\\"c\\nd\te");
}

TEST(Escaping, HelpEscapesBackslashAndNewlineButNotQuotes) {
  std::string out;
  AppendEscapedHelp(out, "say \"hi\"\\\n");
  EXPECT_EQ(out, "say \"hi\"\\\\\\n");
}

TEST(SanitizeUtf8, KeepsValidText) {
  const std::string s = "plain \xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80";  // é € 😀
  EXPECT_EQ(SanitizeUtf8(s), s);
}

TEST(SanitizeUtf8, ReplacesMalformedSequences) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(SanitizeUtf8("a\xFF" "b"), "a" + r + "b");
  EXPECT_EQ(SanitizeUtf8("\xC0\xAF"), r + r);              // overlong '/'
  EXPECT_EQ(SanitizeUtf8("\xED\xA0\x80"), r + r + r);      // surrogate U+D800
  EXPECT_EQ(SanitizeUtf8("\xF4\x90\x80\x80"), r + r + r + r);  // above U+10FFFF
  EXPECT_EQ(SanitizeUtf8("x\xE2\x82"), "x" + r + r);       // truncated
}

TEST(Names, MetricNames) {
  EXPECT_TRUE(IsValidMetricName("btx_jobs"));
  EXPECT_TRUE(IsValidMetricName("job:rate5m"));
  EXPECT_TRUE(IsValidMetricName("_x9"));
  EXPECT_FALSE(IsValidMetricName(""));
  EXPECT_FALSE(IsValidMetricName("9x"));
  EXPECT_FALSE(IsValidMetricName("btx-jobs"));
  EXPECT_FALSE(IsValidMetricName("btx jobs"));
  EXPECT_FALSE(IsValidMetricName("btx_jöbs"));
}

TEST(Names, LabelNames) {
  EXPECT_TRUE(IsValidLabelName("pipeline"));
  EXPECT_TRUE(IsValidLabelName("_a1"));
  EXPECT_FALSE(IsValidLabelName(""));
  EXPECT_FALSE(IsValidLabelName("a:b"));
  EXPECT_FALSE(IsValidLabelName("1a"));
  EXPECT_FALSE(IsValidLabelName("a-b"));
}

}  // namespace
}  // namespace btx::metrics::text
