// Chat templates (tokenizer_config.json's `chat_template`): a Jinja subset, rendered as transformers'
// apply_chat_template renders it (trim_blocks, lstrip_blocks, Python semantics for values), with the byte
// ranges that came from assistant messages tracked so the loss can be put on them alone. No LibTorch.
//
// Supported: {{ }}, {# #}, whitespace control (-), {% if/elif/else %}, {% for x in xs [if c] %} with
// loop.index/index0/first/last/length/revindex/revindex0, {% break/continue %}, {% set x = ... %},
// {% set ns.attr = ... %}, {% generation %}; literals, lists, dicts, slicing, `+ - * / // % ~`, comparisons,
// `in`, `and/or/not`, `a if c else b`; tests defined/undefined/none/string/mapping/iterable/sequence/number/
// integer/boolean/true/false/even/odd/divisibleby/equalto; filters trim/length/count/tojson/upper/lower/
// default/first/last/string/int/float/abs/join/replace/capitalize/title/list/items/safe/reverse/select/reject/
// selectattr/rejectattr/map(attribute=); string methods (strip, split, startswith...) and dict methods (items, get...);
// raise_exception, namespace, range, dict. Everything else (macros, includes, call blocks, other filters...)
// is refused at parse time naming the construct and its line. strftime_now is deliberately undefined, so
// Llama 3.2's date falls back to its fixed default and a rendering never depends on the clock.
#pragma once

#include <cstddef>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

struct ChatSpan {
  size_t begin = 0, end = 0;  // byte offsets into ChatRendering::text, end exclusive
  bool operator==(const ChatSpan&) const = default;
};

struct ChatRendering {
  std::string text;
  // Where the assistant messages' content strings landed in `text` (traced through +, ~, set and trim).
  std::vector<ChatSpan> assistant_content;
  // Output of {% generation %} blocks (transformers' return_assistant_tokens_mask), when the template has any.
  std::vector<ChatSpan> generation;
};

struct ChatVariables {
  std::string bos_token, eos_token;
  bool add_generation_prompt = false;
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();  // further variables, e.g. {"date_string": "26 Jul 2024"}
};

class ChatTemplate {
 public:
  // `origin` prefixes errors, e.g. "seed/tokenizer_config.json chat_template".
  static StatusOr<ChatTemplate> Parse(std::string_view source, const std::string& origin = "chat template");
  // messages: the JSON list as transformers takes it (ordered: tojson keeps the keys' order, as Python does).
  // raise_exception() and type errors come back as InvalidArgument with the template's message.
  StatusOr<ChatRendering> Render(const nlohmann::ordered_json& messages, const ChatVariables& vars) const;
  bool has_generation() const { return has_generation_; }

  struct Node;

 private:
  std::shared_ptr<const Node> root_;
  std::string origin_;
  bool has_generation_ = false;
};

// The byte ranges that carry the loss: the {% generation %} blocks when the template has them (what transformers
// marks), else each assistant content span extended over the end-of-turn marker that directly follows it
// (eos_token, <|eot_id|>, <|im_end|>, <end_of_turn>, </s>, <|end|>, <|endoftext|>).
std::vector<ChatSpan> LossSpans(const ChatRendering& r, const ChatTemplate& t, const std::string& eos_token);

// ChatML, for tokenizers that carry no chat template (the byte tokenizer): SmolLM2's without its default system.
inline constexpr std::string_view kChatMlTemplate =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

}  // namespace btx::model
