// The chat template engine: Jinja semantics (expected strings are what jinja2 3.1 renders with transformers'
// settings), the assistant spans it traces, and the constructs it refuses. tests/python/chat_hf.py checks the
// families' real templates against transformers itself.
#include "btx/model/chat_template.h"

#include <gtest/gtest.h>

namespace btx::model {
namespace {
using json = nlohmann::ordered_json;

const json kTwo = json::parse(R"([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])");

std::string Render(const std::string& tmpl, const json& messages = kTwo, ChatVariables vars = {}) {
  auto t = ChatTemplate::Parse(tmpl);
  EXPECT_TRUE(t.ok()) << t.status().message();
  if (!t.ok()) return "<parse error>";
  auto r = t->Render(messages, vars);
  EXPECT_TRUE(r.ok()) << r.status().message();
  return r.ok() ? r->text : "<render error>";
}

std::vector<std::string> Pieces(const std::string& text, const std::vector<ChatSpan>& spans) {
  std::vector<std::string> out;
  for (const auto& s : spans) out.push_back(text.substr(s.begin, s.end - s.begin));
  return out;
}

TEST(ChatTemplate, WhitespaceControlAsTransformersConfiguresJinja) {
  // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one, `-` all whitespace
  // on its side, and the template's last newline goes.
  EXPECT_EQ(Render("{% for m in messages %}\n  {% if m.role == 'user' %}\n    U:{{ m.content }}\n  {%- else %}\n"
                   "    A:{{ m.content }}\n  {% endif %}\n{% endfor %}\n"),
            "    U:hi    A:yo\n");
  EXPECT_EQ(Render("a  {# comment #}\n  b {{- ' c' }}  \n"), "a    b c  ");
}

TEST(ChatTemplate, NamespacesLoopsSlicesAndFilters) {
  EXPECT_EQ(Render("{% set ns = namespace(n=0, s='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                   "{% set ns.s = ns.s ~ loop.index ~ m.role[0] %}{% endfor %}{{ ns.n }}|{{ ns.s }}|"
                   "{{ messages[1:] | length }}|{{ messages[-1].content | upper }}|{{ (messages | first).role }}"),
            "2|1u2a|1|YO|user");
  EXPECT_EQ(Render("{{ '  pad  ' | trim }}|{{ 'a,b,,c'.split(',') | join('+') }}|{{ 'Hello' if messages | length > 1 "
                   "else 'Bye' }}|{{ x | default('dflt') }}|{{ 'abc'[::-1] }}|{{ messages | selectattr('role', "
                   "'equalto', 'user') | map(attribute='content') | join(';') }}|{% for k, v in {'p': 1, 'q': 2} | "
                   "items %}{{ k }}={{ v }}{% if not loop.last %},{% endif %}{% endfor %}"),
            "pad|a+b++c|Hello|dflt|cba|hi|p=1,q=2");
  // A `set` inside a loop stays in the loop (why templates use namespace()).
  EXPECT_EQ(Render("{% set x = 1 %}{% for m in messages %}{% set x = 2 %}{% endfor %}{{ x }}"), "1");
  EXPECT_EQ(Render("{% for m in messages if m.role == 'assistant' %}{{ loop.length }}{{ m.content }}{% endfor %}"), "1yo");
  EXPECT_EQ(Render("{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}"
                   "{{ i }}{% endfor %}"),
            "02");
}

TEST(ChatTemplate, ValuesPrintAndSerialiseAsPython) {
  EXPECT_EQ(Render("{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true], 'b': 'x\"y'} | tojson(indent=2) }}|"
                   "{{ [1, 'a'] }}|{{ 7 // 2 }},{{ -7 // 2 }},{{ 7 % 3 }},{{ 1 / 4 }}"),
            "{\"role\": \"user\", \"content\": \"hi\"}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n"
            "  \"b\": \"x\\\"y\"\n}|[1, 'a']|3,-4,1,0.25");
  EXPECT_EQ(Render("{{ x is defined }}{{ none is none }}{{ 'a' is string }}{{ messages is iterable }}"
                   "{{ messages[0] is mapping }}{{ 3 is odd }}{{ 4 is divisibleby 2 }}{{ 'u' in 'user' }}"
                   "{{ 'role' in messages[0] }}{{ 1 not in [2] }}"),
            "FalseTrueTrueTrueTrueTrueTrueTrueTrueTrue");
  EXPECT_EQ(Render("{{ '\\u00e9\\n' }}{{ \"tab\\there\" }}"), "\xc3\xa9\ntab\there");
}

TEST(ChatTemplate, TracesAssistantContentThroughConcatenationSetAndTrim) {
  // Llama 3's template: the content is trimmed, concatenated into `content`, prefixed with bos in a branch.
  const std::string llama3 =
      "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
      "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
      "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}";
  const json conv = json::parse(R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "  4  "}, {"role": "user", "content": "Ünïcode?"},
      {"role": "assistant", "content": "Ja — 🐈\n"}])");
  auto t = ChatTemplate::Parse(llama3);
  ASSERT_TRUE(t.ok()) << t.status().message();
  ChatVariables vars;
  vars.bos_token = "<|begin_of_text|>";
  vars.eos_token = "<|eot_id|>";
  auto r = t->Render(conv, vars);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nÜnïcode?<|eot_id|><|start_header_id|>assistant"
            "<|end_header_id|>\n\nJa — 🐈<|eot_id|>");
  EXPECT_EQ(Pieces(r->text, r->assistant_content), (std::vector<std::string>{"4", "Ja — 🐈"}));
  // The loss also covers the end-of-turn token that follows each answer.
  EXPECT_EQ(Pieces(r->text, LossSpans(*r, *t, vars.eos_token)),
            (std::vector<std::string>{"4<|eot_id|>", "Ja — 🐈<|eot_id|>"}));
}

TEST(ChatTemplate, GenerationBlocksAreTheLossSpansWhenPresent) {
  const std::string tmpl =
      "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{% generation %}"
      "{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{ m.content + '<|im_end|>\n' }}{% endif %}"
      "{% endfor %}";
  auto t = ChatTemplate::Parse(tmpl);
  ASSERT_TRUE(t.ok()) << t.status().message();
  EXPECT_TRUE(t->has_generation());
  auto r = t->Render(kTwo, {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(Pieces(r->text, LossSpans(*r, *t, "")), (std::vector<std::string>{"yo<|im_end|>"}));
}

TEST(ChatTemplate, RaiseExceptionAndTypeErrorsNameTheLine) {
  auto t = ChatTemplate::Parse("{% if messages[0].role != 'system' %}\n{{ raise_exception('System first!') }}\n{% endif %}",
                               "seed/tokenizer_config.json chat_template");
  ASSERT_TRUE(t.ok());
  auto r = t->Render(kTwo, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "seed/tokenizer_config.json chat_template line 2: raise_exception: System first!");

  t = ChatTemplate::Parse("{{ 'a' + 1 }}");
  ASSERT_TRUE(t.ok());
  r = t->Render(kTwo, {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("cannot add string and int"), std::string::npos) << r.status().message();

  t = ChatTemplate::Parse("{{ nothing.here }}");
  ASSERT_TRUE(t.ok());
  r = t->Render(kTwo, {});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'nothing' is undefined"), std::string::npos) << r.status().message();
}

TEST(ChatTemplate, RefusesWhatItDoesNotImplementByName) {
  const std::pair<std::string, std::string> cases[] = {
      {"{% macro m() %}x{% endmacro %}", "line 1: {% macro %} is not supported"},
      {"ok\n{{ messages | wordcount }}", "line 2: filter 'wordcount' is not supported"},
      {"{% if x is callable %}{% endif %}", "test 'callable' is not supported"},
      {"{% include 'other.jinja' %}", "{% include %} is not supported"},
      {"{% set x %}block{% endset %}", "block assignment) is not supported"},
      {"{% for m in messages %}", "{% for %} without {% endfor %}"},
      {"{{ 'unterminated }}", "unclosed '{{'"},
      {"{{ 1 + }}", "expected an expression at the end of the tag"},
      {"{% frobnicate %}", "unknown statement {% frobnicate %}"},
  };
  for (const auto& [tmpl, want] : cases) {
    auto t = ChatTemplate::Parse(tmpl);
    ASSERT_FALSE(t.ok()) << tmpl;
    EXPECT_NE(t.status().message().find(want), std::string::npos) << tmpl << " -> " << t.status().message();
  }
}

TEST(ChatTemplate, ChatMlDefaultRendersEveryRole) {
  const json conv = json::parse(R"([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
      {"role": "assistant", "content": "A"}])");
  auto t = ChatTemplate::Parse(kChatMlTemplate);
  ASSERT_TRUE(t.ok());
  auto r = t->Render(conv, {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->text, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n");
  EXPECT_EQ(Pieces(r->text, LossSpans(*r, *t, "")), (std::vector<std::string>{"A<|im_end|>"}));
}

}  // namespace
}  // namespace btx::model
