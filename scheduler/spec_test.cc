#include "btx/scheduler/spec.h"

#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "btx/common/strings.h"
#include "btx/contract/job.h"
#include "btx/rpc_status.h"
#include "btx/scheduler/plan.h"
#include "btx/v1/types.pb.h"
#include "convert.h"

namespace btx::scheduler {
namespace {
using json = nlohmann::json;
namespace v1 = btx::v1;

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
  // The shared sections are the contract's structs written back: every default is the trainer's.
  contract::FieldErrors errors;
  contract::Reader r(errors);
  EXPECT_EQ((*spec)["train"], contract::ToJson(contract::ParseTrain(
                                  r, json{{"batch_tokens", 2048}, {"seq_len", 128}, {"lr", 3e-4}}, "train")));
  EXPECT_EQ((*spec)["seed"]["init"], contract::ToJson(contract::ModelInit{}));
  EXPECT_EQ((*spec)["experts"][1]["data"], json({{"train", {"/d/math"}}}));
  EXPECT_TRUE(errors.empty()) << contract::Describe(errors);
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
      // What btx-train would refuse is refused at submit, under the pipeline's field names.
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\ntrain: {lr: 0}", "train.lr"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\ntrain: {seq_len: 64, batch_tokens: 128, grad_accum: 4}",
       "train.grad_accum"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nfinetune: {steps: 0}", "finetune.steps"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nfinetune: {mixture: {a: 0}}", "finetune.mixture.a"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nfinetune: {freeze: [router]}", "finetune.freeze[0]"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nresources: {gpus_per_job: 65}", "resources.gpus_per_job"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nresources: {ranks_per_job: 0}", "resources.ranks_per_job"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nevaluate: {baselines: [seed, upcycle, upcycle]}",
       "evaluate.baselines[2]"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\nresources: {gpus_per_job: 2, ranks_per_job: 4}",
       "resources.ranks_per_job"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\ntokenizer: {type: sentencepiece, vocab_size: 512}",
       "tokenizer"},
      {"name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\ntokenizer: {sentencepiece: /t.model, vocab_size: 9}",
       "tokenizer.vocab_size"},
      {"name: x\nseed: {init: {preset: tiny, vocab_size: 300}, pretrain: {data: {train: /p}}}\nexperts: [{name: a, data: {train: [/x]}}]\n"
       "tokenizer: {type: sentencepiece, vocab_size: 512}",
       "seed.init.vocab_size"},
      {"name: x\nseed: {init: {hidden_size: 96, num_attention_heads: 5}, pretrain: {data: {train: /p}}}\n"
       "experts: [{name: a, data: {train: [/x]}}]",
       "seed.init.num_attention_heads"},
      {"name: x\nseed: {model: {$artifact: pretrain}}\nexperts: [{name: a, data: {train: [/x]}}]", "seed.model"},
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
           s += Cat("a", i, ": &a", i, " [");
           for (int k = 0; k < 10; ++k) s += Cat(k ? ", *a" : "*a", i - 1);
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

// Looser operator limits than the contract's are not looser than the contract: such a spec is refused
// at the pipeline's own field, never as a planned job the trainer would refuse.
TEST(Spec, OperatorLimitsOnlyTightenTheContracts) {
  SpecLimits loose;
  loose.max_steps = int64_t{1} << 40;
  loose.max_data_paths = 1 << 20;
  loose.max_experts = 1 << 20;
  auto r = ParseSpec("name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}, steps: 2000000000}]", loose);
  ASSERT_FALSE(r.ok());
  auto v = FieldViolationsOf(ToGrpcStatus(r.status()));
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].field, "experts[0].steps");
  std::string experts = "[";
  for (int i = 0; i < 1001; ++i) experts += Cat(i ? ", " : "", "{name: e", i, ", data: {train: /x}}");
  r = ParseSpec(Cat("name: x\nseed: {model: /m}\nexperts: ", experts, "]"), loose);
  ASSERT_FALSE(r.ok());
  v = FieldViolationsOf(ToGrpcStatus(r.status()));
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].field, "experts");
  // 1000 experts with every baseline but BTM's output ensemble (at most 64 models): each planned job
  // still parses.
  experts = "[";
  for (int i = 0; i < 1000; ++i) experts += Cat(i ? ", " : "", "{name: e", i, ", data: {train: /x}}");
  const std::string many = Cat("name: x\nseed: {model: /m}\nexperts: ", experts, "]\nmerge: {keep_seed_expert: true}\n");
  v = FieldViolationsOf(ToGrpcStatus(ParseSpec(many + "evaluate: {baselines: [seed, btm]}", loose).status()));
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].field, "evaluate.baselines[1]");
  auto ok = ParseSpec(many + "evaluate: {baselines: [seed, experts, upcycle]}", loose);
  ASSERT_TRUE(ok.ok()) << ok.status();
  auto jobs = PlanJobs(*ok);
  EXPECT_TRUE(jobs.ok()) << jobs.status();
}

TEST(Spec, OversizedSpecRejected) {
  std::string big(2 << 20, '#');
  auto v = Violations(big);
  EXPECT_TRUE(HasViolation(v, "spec"));
}

// seed.init takes Hugging Face config names, as btx-train's config.json does; the names of other tools
// are refused with the one to use instead of being ignored.
TEST(Spec, SeedInitTakesHuggingFaceNames) {
  const std::string base = "name: x\nexperts: [{name: a, data: {train: [/x]}}]\nseed:\n  pretrain: {data: {train: /p}}\n";
  auto v = Violations(base + "  init: {preset: tiny, num_layers: 4, hidden_size: 96}\n");
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].field, "seed.init.num_layers");
  EXPECT_NE(v[0].description.find("did you mean num_hidden_layers?"), std::string::npos) << v[0].description;

  auto spec = ParseSpec(base + "  init: {preset: tiny, num_hidden_layers: 4, hidden_size: 96, tie_word_embeddings: true}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ((*spec)["seed"]["init"]["num_hidden_layers"], 4);
  EXPECT_EQ((*spec)["seed"]["init"]["num_attention_heads"], 4);  // the preset's, resolved at submit
  auto jobs = PlanJobs(*spec);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  ASSERT_EQ((*jobs)[0].name, "pretrain");
  const json pretrain = json::parse((*jobs)[0].spec_json);
  EXPECT_EQ(pretrain["init"]["num_hidden_layers"], 4);
  EXPECT_EQ(pretrain["init"]["hidden_size"], 96);
  EXPECT_EQ(pretrain["init"]["tie_word_embeddings"], true);
}

// Both tokenizer forms that name a file are accepted (btxctl writes {sentencepiece: PATH} after
// making the path absolute); a tokenizer is trained only for a seed trained here.
TEST(Spec, TokenizerFormsAreTheContracts) {
  const std::string base = "name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\n";
  for (const std::string t : {"tokenizer: /t/sp.model", "tokenizer: {sentencepiece: /t/sp.model}"}) {
    auto spec = ParseSpec(base + t);
    ASSERT_TRUE(spec.ok()) << t << ": " << spec.status();
    EXPECT_EQ((*spec)["tokenizer"], json({{"sentencepiece", "/t/sp.model"}})) << t;
  }
  for (const std::string t : {"tokenizer: byte", "tokenizer: {type: byte}", ""}) {
    auto spec = ParseSpec(base + t);
    ASSERT_TRUE(spec.ok()) << t << ": " << spec.status();
    EXPECT_EQ((*spec)["tokenizer"], "byte") << t;
  }
  auto trained = ParseSpec(
      "name: x\nseed: {init: {preset: tiny}, pretrain: {data: {train: /p}}}\nexperts: [{name: a, data: {train: [/x]}}]\n"
      "tokenizer: {type: sentencepiece, vocab_size: 512}");
  ASSERT_TRUE(trained.ok()) << trained.status();
  EXPECT_EQ((*trained)["tokenizer"], json({{"type", "sentencepiece"}, {"vocab_size", 512}}));
}

// Training jobs run as a rank group (one rank per GPU, or ranks_per_job CPU ranks); merge and eval
// run as one rank, on one device when the pipeline uses GPUs.
TEST(Plan, RanksGoToTrainingJobsWhileMergeAndEvalRunAsOne) {
  const std::string base = "name: x\nseed: {init: {preset: tiny}, pretrain: {data: {train: /p}, steps: 2}}\n"
                           "experts: [{name: a, data: {train: [/x]}}]\n";
  struct Case {
    std::string resources;
    int train_gpus, train_ranks, other_gpus;
  };
  for (const Case& c : {Case{"resources: {gpus_per_job: 4}\n", 4, 4, 1}, Case{"resources: {ranks_per_job: 3}\n", 0, 3, 0},
                        Case{"resources: {gpus_per_job: 2, ranks_per_job: 2}\n", 2, 2, 1}, Case{"", 0, 1, 0}}) {
    auto spec = ParseSpec(base + c.resources);
    ASSERT_TRUE(spec.ok()) << c.resources << spec.status();
    EXPECT_EQ((*spec)["resources"]["ranks_per_job"], c.train_ranks) << c.resources;
    auto jobs = PlanJobs(*spec);
    ASSERT_TRUE(jobs.ok()) << jobs.status();
    std::set<std::string> kinds;
    for (const auto& j : *jobs) {
      kinds.insert(j.kind);
      const bool training = j.kind == "pretrain" || j.kind == "branch" || j.kind == "finetune";
      EXPECT_EQ(j.gpus, training ? c.train_gpus : c.other_gpus) << c.resources << j.name;
      EXPECT_EQ(j.ranks, training ? c.train_ranks : 1) << c.resources << j.name;
    }
    EXPECT_EQ(kinds, (std::set<std::string>{"pretrain", "branch", "merge", "finetune", "eval"})) << c.resources;
  }
  auto v = Violations(base + "resources: {gpus_per_job: 2, ranks_per_job: 3}");
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].field, "resources.ranks_per_job");
  EXPECT_NE(v[0].description.find("one rank per GPU"), std::string::npos) << v[0].description;
}

// nodes_per_job makes each training job a gang of that many workers; merge and eval stay on one.
TEST(Plan, NodesPerJobMakesTrainingJobsGangs) {
  const std::string base = "name: x\nseed: {init: {preset: tiny}, pretrain: {data: {train: /p}, steps: 2}}\n"
                           "experts: [{name: a, data: {train: [/x]}}]\n";
  auto spec = ParseSpec(base + "resources: {nodes_per_job: 3, ranks_per_job: 2}\n");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ((*spec)["resources"]["nodes_per_job"], 3);
  auto jobs = PlanJobs(*spec);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  for (const auto& j : *jobs) {
    const bool training = j.kind == "pretrain" || j.kind == "branch" || j.kind == "finetune";
    EXPECT_EQ(j.nodes, training ? 3 : 1) << j.name;
    EXPECT_EQ(j.ranks, training ? 2 : 1) << j.name;
  }
  // A stored spec from before gangs plans one node.
  json old = *spec;
  old["resources"].erase("nodes_per_job");
  auto old_jobs = PlanJobs(old);
  ASSERT_TRUE(old_jobs.ok()) << old_jobs.status();
  for (const auto& j : *old_jobs) EXPECT_EQ(j.nodes, 1) << j.name;

  for (const char* bad : {"resources: {nodes_per_job: 0}", "resources: {nodes_per_job: 513}",
                          "resources: {nodes_per_job: 100, gpus_per_job: 64}", "resources: {nodes_per_job: two}"}) {
    auto v = Violations(base + bad);
    ASSERT_EQ(v.size(), 1u) << bad;
    EXPECT_EQ(v[0].field, "resources.nodes_per_job") << bad;
  }
  auto v = Violations(base + "resources: {nodes_per_job: 100, gpus_per_job: 64}");
  EXPECT_NE(v[0].description.find("at most 64 with 64 ranks per node"), std::string::npos) << v[0].description;
}

TEST(Plan, TinyBtxDag) {
  auto spec = ParseSpec(kTiny);
  ASSERT_TRUE(spec.ok());
  auto jobs = PlanJobs(*spec);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  std::map<std::string, storage::NewJob> by_name;
  for (const auto& j : *jobs) by_name[j.name] = j;
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
  auto up_jobs = PlanJobs(*up);
  ASSERT_TRUE(up_jobs.ok()) << up_jobs.status();
  for (const auto& j : *up_jobs) EXPECT_NE(j.kind, "branch") << j.name;
}

// Representative pipelines: every kind of seed, tokenizer, merge method and baseline.
std::vector<std::pair<std::string, std::string>> RepresentativeSpecs() {
  std::vector<std::pair<std::string, std::string>> specs = {{"tiny", kTiny}};
  const std::string experts =
      "experts:\n  - {name: code, data: {train: /d/code, valid: /d/code-valid}, steps: 3}\n"
      "  - {name: math, data: {train: [/d/math, /d/math2]}, steps: 4}\n";
  const std::string all = "evaluate: {baselines: [seed, experts, btm, upcycle], max_tokens: 1024}\n";
  for (const std::string method : {"btx", "upcycle", "btm"}) {
    specs.emplace_back(method + " from a model dir",
                       "name: m\nseed: {model: /models/seed}\ntokenizer: {sentencepiece: /t/sp.model}\n" + experts +
                           "merge: {method: " + method + "}\n" + all);
    specs.emplace_back(method + " from scratch, seed kept, hidden-state router",
                       "name: s\nseed: {init: {preset: small, num_hidden_layers: 2}, pretrain: {data: {train: /d/all}, steps: 5}}\n"
                       "tokenizer: {type: sentencepiece, vocab_size: 300}\n" + experts +
                           "merge: {method: " + method + ", keep_seed_expert: true, router_init: hidden}\n"
                           "finetune: {top_k: 3, steps: 2, mixture: {code: 2}, freeze: [embeddings, norms], router: sparsemixer}\n"
                           "train: {threads: 1, checkpoint_every: 0, batch_tokens: 512, seq_len: 64}\n" + all +
                           "resources: {gpus_per_job: 1, max_attempts: 5}\n");
  }
  // The specs the e2e, TLS and chaos suites submit, and the README's example.
  specs.emplace_back("e2e", R"(
name: e2e-tiny
seed: {init: {preset: tiny}, pretrain: {data: {train: [/d/code/train.txt, /d/math/train.txt]}, steps: 6}}
experts:
  - {name: code, data: {train: /d/code/train.txt, valid: /d/code/valid.txt}, steps: 8}
  - {name: math, data: {train: /d/math/train.txt, valid: /d/math/valid.txt}, steps: 8}
train: {batch_tokens: 512, seq_len: 64, lr: 3e-3, warmup: 2, checkpoint_every: 4, log_every: 1, valid_tokens: 2048}
merge: {method: btx, keep_seed_expert: true, router_init: random}
finetune: {top_k: 2, steps: 4}
evaluate: {baselines: [seed, experts], max_tokens: 2048}
)");
  specs.emplace_back("tls", R"(
name: tls-tiny
seed: {init: {preset: tiny}, pretrain: {data: {train: [/d/code/train.txt]}, steps: 2}}
experts: [{name: code, data: {train: /d/code/train.txt, valid: /d/code/valid.txt}, steps: 1}]
train: {batch_tokens: 256, seq_len: 32, lr: 3e-3, warmup: 1, checkpoint_every: 10, log_every: 1, valid_tokens: 512}
merge: {method: upcycle}
finetune: {top_k: 1, steps: 1}
evaluate: {baselines: [], max_tokens: 512}
)");
  std::ifstream example(BTX_EXAMPLES_DIR "/tiny-btx.yaml");
  std::stringstream text;
  text << example.rdbuf();
  EXPECT_FALSE(text.str().empty());
  specs.emplace_back("examples/tiny-btx.yaml", text.str());
  return specs;
}

std::set<std::string> Keys(const json& obj) {
  std::set<std::string> out;
  for (const auto& [k, _] : obj.items()) out.insert(k);
  return out;
}

// Submit checks every planned job with btx-train's parser (PlanJobs fails otherwise); this checks it
// independently, and that the planner writes only what each kind reads.
TEST(Plan, EveryPlannedJobParsesWithTheTrainersParser) {
  for (const auto& [what, text] : RepresentativeSpecs()) {
    SCOPED_TRACE(what);
    auto spec = ParseSpec(text);
    ASSERT_TRUE(spec.ok()) << spec.status();
    // What is stored reads back as itself (Retry and the fuzz target rely on it).
    auto again = ParseSpec(spec->dump());
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(*again, *spec);
    auto jobs = PlanJobs(*spec);
    ASSERT_TRUE(jobs.ok()) << jobs.status();
    std::set<std::string> kinds;
    for (const auto& j : *jobs) {
      SCOPED_TRACE(j.name);
      const contract::JobKindInfo* kind = contract::FindJobKind(j.kind);
      ASSERT_NE(kind, nullptr) << j.kind;
      kinds.insert(j.kind);
      const json job = json::parse(j.spec_json);
      contract::FieldErrors errors;
      contract::Reader r(errors, /*allow_artifact_refs=*/true);
      (void)contract::ParseJobSpec(r, kind->kind, job, "spec");
      EXPECT_TRUE(errors.empty()) << contract::Describe(errors) << "\n" << job.dump(2);
      // A parent's output is always a dependency, so that it is there to resolve at lease time.
      std::map<std::string, std::string> parents;
      for (const auto& d : j.depends_on) parents[d] = "file:///art/" + d;
      EXPECT_TRUE(ResolveArtifacts(job, parents).ok());

      if (job.contains("train")) {
        EXPECT_EQ(job["train"], (*spec)["train"]);
      }
      if (kind->kind == contract::JobKind::kEval) {
        EXPECT_EQ(Keys(job), (std::set<std::string>{"models", "domains", "max_tokens", "seq_len"}));
        for (const auto& d : job["domains"]) EXPECT_EQ(Keys(d), (std::set<std::string>{"name", "valid"}));
      } else if (kind->kind == contract::JobKind::kMerge) {
        for (const auto& d : job["data"]) EXPECT_EQ(Keys(d), (std::set<std::string>{"name", "train", "valid"}));
      } else if (kind->kind == contract::JobKind::kFinetune) {
        for (const auto& m : job["mixture"]) EXPECT_EQ(Keys(m), (std::set<std::string>{"name", "weight", "train", "valid"}));
      } else if (kind->kind == contract::JobKind::kBranch) {
        // A pretrained seed carries its tokenizer; only a seed dir may lack one.
        EXPECT_EQ(job.contains("tokenizer"), (*spec)["seed"].contains("model"));
        if (job.contains("tokenizer")) {
          EXPECT_EQ(job["tokenizer"], (*spec)["tokenizer"]);
        }
      }
    }
    EXPECT_TRUE(kinds.count("merge") && kinds.count("eval"));
  }
}

TEST(Plan, TrainThreadsReachEveryTrainingJob) {
  auto spec = ParseSpec(std::string(kTiny) + "\n");
  ASSERT_TRUE(spec.ok());
  (*spec)["train"]["threads"] = 3;
  auto jobs = PlanJobs(*spec);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  int training = 0;
  for (const auto& j : *jobs) {
    const json s = json::parse(j.spec_json);
    if (j.kind == "pretrain" || j.kind == "branch" || j.kind == "finetune") {
      ++training;
      EXPECT_EQ(s["train"]["threads"], 3) << j.name;
    }
  }
  EXPECT_EQ(training, 1 + 2 + 2);  // pretrain, two branches, two finetunes
  // Through the text too: the stored spec keeps it.
  auto text = ParseSpec("name: x\nseed: {model: /m}\nexperts: [{name: a, data: {train: [/x]}}]\ntrain: {threads: 2}");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ((*text)["train"]["threads"], 2);
  auto branch = json::parse((*PlanJobs(*text))[0].spec_json);
  EXPECT_EQ(branch["train"]["threads"], 2);
}

// A planned job the contract refuses is reported under the job's name (a hand-edited spec stands in
// for a planner bug: ParseSpec itself never lets one through).
TEST(Plan, AJobTheContractRefusesIsNamedWithItsField) {
  auto spec = ParseSpec(kTiny);
  ASSERT_TRUE(spec.ok());
  (*spec)["train"]["lr"] = 0;
  (*spec)["finetune"]["freeze"] = json::array({"everything"});
  auto jobs = PlanJobs(*spec);
  ASSERT_FALSE(jobs.ok());
  EXPECT_EQ(jobs.status().code(), absl::StatusCode::kInvalidArgument);
  std::set<std::string> fields;
  for (const auto& v : FieldViolationsOf(ToGrpcStatus(jobs.status()))) fields.insert(v.field);
  EXPECT_TRUE(fields.count("jobs[pretrain].spec.train.lr"));
  EXPECT_TRUE(fields.count("jobs[branch/code].spec.train.lr"));
  EXPECT_TRUE(fields.count("jobs[finetune].spec.freeze[0]"));
  EXPECT_FALSE(fields.count("jobs[eval].spec.train.lr"));
}

TEST(JobKinds, ContractTableAndApiAgree) {
  for (const auto& k : contract::JobKinds()) {
    const int number = static_cast<int>(k.kind);
    ASSERT_TRUE(v1::JobKind_IsValid(number)) << k.name;
    std::string api = v1::JobKind_Name(static_cast<v1::JobKind>(number)).substr(9);
    for (char& c : api) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    EXPECT_EQ(api, k.name);
    EXPECT_EQ(JobKindFromString(std::string(k.name)), number);
  }
  // Every kind of the API (but UNSPECIFIED) is in the contract's table.
  const auto* d = v1::JobKind_descriptor();
  for (int i = 0; i < d->value_count(); ++i) {
    if (d->value(i)->number() == 0) continue;
    EXPECT_NE(contract::FindJobKind(d->value(i)->number()), nullptr) << d->value(i)->name();
  }
  EXPECT_EQ(JobKindFromString("nonsense"), v1::JOB_KIND_UNSPECIFIED);
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
