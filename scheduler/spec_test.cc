#include "btx/scheduler/spec.h"

#include <map>

#include <gtest/gtest.h>

#include "btx/rpc_status.h"

namespace btx::scheduler {
namespace {
using json = nlohmann::json;

const char* kTiny = R"(
name: tiny-btx
seed: {init: {preset: tiny}, pretrain: {data: {train: [/d/prose]}, steps: 40}}
experts:
  - {name: code,  data: {train: [/d/code], valid: [/d/code-valid]}, steps: 30}
  - {name: math,  data: {train: [/d/math]}, steps: 30}
train: {batch_tokens: 2048, seq_len: 128, lr: 3e-4}
merge: {method: btx, keep_seed_expert: false}
finetune: {top_k: 2, steps: 20}
evaluate: {baselines: [seed, experts, btm, upcycle]}
)";

// Submits the spec through gRPC's error mapping, so the test sees what a client sees.
std::vector<FieldViolation> Violations(const std::string& text) {
  auto r = ParseSpec(text);
  EXPECT_FALSE(r.ok()) << "spec unexpectedly valid: " << text;
  if (r.ok()) return {};
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  return FieldViolationsOf(ToGrpcStatus(r.status()));
}

bool HasViolation(const std::vector<FieldViolation>& v, const std::string& field) {
  for (const auto& f : v)
    if (f.field == field) return true;
  return false;
}

TEST(Spec, ParsesAndFillsDefaults) {
  auto spec = ParseSpec(kTiny);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ((*spec)["train"]["lr"], 3e-4);
  EXPECT_EQ((*spec)["train"]["warmup"], 30);
  EXPECT_EQ((*spec)["resources"]["max_attempts"], 3);
  EXPECT_EQ((*spec)["finetune"]["mixture"]["code"], 1.0);
  EXPECT_EQ((*spec)["tokenizer"], "byte");
}

TEST(Spec, JsonIsAccepted) {
  auto yaml = ParseSpec(kTiny);
  auto again = ParseSpec(yaml->dump());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *yaml);
}

TEST(Spec, ErrorsNameFieldValueAndExpectation) {
  auto v = Violations(R"(
name: "bad name!"
seed: {model: /m}
experts: [{name: code, data: {train: [/x]}, steps: -5}]
train: {lr: fast, colour: blue}
)");
  ASSERT_TRUE(HasViolation(v, "name"));
  ASSERT_TRUE(HasViolation(v, "experts[0].steps"));
  ASSERT_TRUE(HasViolation(v, "train.lr"));
  ASSERT_TRUE(HasViolation(v, "train.colour"));
  for (const auto& f : v) {
    if (f.field == "experts[0].steps") {
      EXPECT_NE(f.description.find("-5"), std::string::npos) << f.description;
      EXPECT_NE(f.description.find("expected an integer"), std::string::npos) << f.description;
    }
  }
}

TEST(Spec, TableOfMalformedSpecs) {
  std::string e_acute_60;
  for (int i = 0; i < 60; ++i) e_acute_60 += "\xc3\xa9";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"name: x\nexperts: [{name: a, data: {train: [/x]}}]", "seed"},
      {"name: x\nseed: {model: /m}", "experts"},
      {"name: x\nseed: {model: /m}\nexperts: []", "experts"},
      {"name: x\nseed: {model: /m, init: {preset: tiny}}\nexperts: [{name: a, data: {train: [/x]}}]", "seed"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}, {name: a, data: {train: [/y]}}]", "experts[1].name"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: ../etc, data: {train: [/x]}}]", "experts[0].name"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: []}}]", "experts[0].data.train"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nmerge: {method: average}", "merge.method"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nfinetune: {top_k: 3}", "finetune.top_k"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nfinetune: {mixture: {b: 1}}", "finetune.mixture.b"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nresources: {max_attempts: 0}", "resources.max_attempts"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\ntrain: {seq_len: 100, batch_tokens: 1050}", "train.batch_tokens"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nevaluate: {baselines: [oracle]}", "evaluate.baselines[0]"},
      {"[1, 2", "spec"},
      {"name: x\nname: y", "spec"},
      {"just a string", ""},
      // From fuzzing (tests/fuzz, docs/reliability.md): each threw, crashed, hung or lost its rich error.
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nmerge: 5", "merge"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nmerge: {keep_seed_expert: yes}",
       "merge.keep_seed_expert"},
      {"\x06\xff\xffname: x\nname: y\n", "spec"},               // invalid UTF-8 in a key
      {"name: x\nseed: {model: /m}\ntokenizer: \"\\N\"", "spec"},  // yaml-cpp decodes \N to one byte
      {"name: x\ntokenizer: \"\\\xc3\xa9\"", "spec"},          // its error message quotes half of an é
      {"name: \"x" + e_acute_60 + "\"", "name"},               // the value shown was cut inside an é
      {"name: " + std::string(100'000, '1'), "name"},             // std::regex overflowed the stack
      {[] {  // nested aliases ("billion laughs"): 10^9 nodes once expanded
         std::string s = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
         for (int i = 1; i < 9; ++i) {
           s += "a" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
           for (int k = 0; k < 10; ++k) s += (k ? ", *a" : "*a") + std::to_string(i - 1);
           s += "]\n";
         }
         return s;
       }(),
       "spec"},
  };
  for (const auto& [text, field] : cases) {
    auto v = Violations(text);
    ASSERT_FALSE(v.empty()) << text;
    EXPECT_TRUE(HasViolation(v, field)) << "expected a violation at '" << field << "' for:\n" << text << "\ngot: " << v[0].field
                                        << ": " << v[0].description;
  }
}

TEST(Spec, OversizedSpecRejected) {
  std::string big(2 << 20, '#');
  auto v = Violations(big);
  EXPECT_TRUE(HasViolation(v, "spec"));
}

TEST(Plan, TinyBtxDag) {
  auto spec = ParseSpec(kTiny);
  ASSERT_TRUE(spec.ok());
  auto jobs = PlanJobs(*spec);
  std::map<std::string, storage::NewJob> by_name;
  for (const auto& j : jobs) by_name[j.name] = j;
  ASSERT_TRUE(by_name.count("pretrain"));
  ASSERT_TRUE(by_name.count("branch/code"));
  ASSERT_TRUE(by_name.count("branch/math"));
  ASSERT_TRUE(by_name.count("merge"));
  ASSERT_TRUE(by_name.count("finetune"));
  ASSERT_TRUE(by_name.count("baseline/btm"));
  ASSERT_TRUE(by_name.count("baseline/upcycle"));
  ASSERT_TRUE(by_name.count("baseline/upcycle-finetune"));
  ASSERT_TRUE(by_name.count("eval"));
  EXPECT_EQ(by_name["branch/code"].depends_on, std::vector<std::string>{"pretrain"});
  // The merge also reads the seed (keep_seed_expert, router init): it depends on it explicitly.
  EXPECT_EQ(by_name["merge"].depends_on, (std::vector<std::string>{"branch/code", "branch/math", "pretrain"}));
  EXPECT_EQ(by_name["finetune"].depends_on, std::vector<std::string>{"merge"});
  auto eval = json::parse(by_name["eval"].spec_json);
  EXPECT_EQ(eval["models"].size(), 7u);  // btx, seed, 2 experts, btm average, btm ensemble, upcycle
  EXPECT_EQ(eval["models"][5]["name"], "ensemble");
  EXPECT_EQ(eval["models"][5]["ensemble"][1]["$artifact"], "branch/math");
  EXPECT_EQ(eval["max_tokens"], 65536);
  EXPECT_EQ(eval["seq_len"], 128);
  EXPECT_EQ(json::parse(by_name["branch/math"].spec_json)["name"], "math");
  auto merge = json::parse(by_name["merge"].spec_json);
  EXPECT_EQ(merge["experts"][0]["model"]["$artifact"], "branch/code");
  // Upcycling trains no branches, BTM has no router finetune.
  auto up = ParseSpec(std::string(kTiny) + "\n");
  (*up)["merge"]["method"] = "upcycle";
  for (const auto& j : PlanJobs(*up)) EXPECT_NE(j.kind, "branch") << j.name;
}

TEST(Plan, ResolveArtifactsFillsParentPaths) {
  json s = {{"seed", {{"$artifact", "pretrain"}}}, {"list", {{{"model", {{"$artifact", "branch/a"}}}}}}};
  auto r = ResolveArtifacts(s, {{"pretrain", "file:///art/p/model"}, {"branch/a", "file:///art/a/model"}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)["seed"], "/art/p/model");
  EXPECT_EQ((*r)["list"][0]["model"], "/art/a/model");
  EXPECT_FALSE(ResolveArtifacts(s, {{"pretrain", "file:///art/p"}}).ok());
  EXPECT_FALSE(ResolveArtifacts(s, {{"pretrain", "file:///x/../etc"}, {"branch/a", "file:///a"}}).ok());
}

}  // namespace
}  // namespace btx::scheduler
