// Internals of the chat template engine shared by its parser (chat_template_parse.cc) and its renderer
// (chat_template.cc): values with Python semantics, expressions and statements. Not a public header.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "btx/model/chat_template.h"

namespace btx::model::chat_internal {

struct Value;
using ValueList = std::vector<Value>;
using ValueDict = std::vector<std::pair<std::string, Value>>;  // insertion-ordered, as Python dicts

struct Value {
  enum Kind { kUndefined, kNone, kBool, kInt, kFloat, kStr, kList, kDict, kNamespace, kFunc };
  Kind kind = kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;                   // kStr; kUndefined: the name, for messages; kFunc: the builtin's name
  std::vector<ChatSpan> marks;     // kStr: assistant-content bytes within s
  std::shared_ptr<ValueList> list;  // kList
  std::shared_ptr<ValueDict> dict;  // kDict, kNamespace (shared: a namespace is mutated through any copy)

  static Value Undefined(std::string name) { Value v; v.s = std::move(name); return v; }
  static Value None() { Value v; v.kind = kNone; return v; }
  static Value Bool(bool x) { Value v; v.kind = kBool; v.b = x; return v; }
  static Value Int(int64_t x) { Value v; v.kind = kInt; v.i = x; return v; }
  static Value Float(double x) { Value v; v.kind = kFloat; v.f = x; return v; }
  static Value Str(std::string x, std::vector<ChatSpan> m = {}) {
    Value v; v.kind = kStr; v.s = std::move(x); v.marks = std::move(m); return v;
  }
  static Value List(ValueList l = {}) {
    Value v; v.kind = kList; v.list = std::make_shared<ValueList>(std::move(l)); return v;
  }
  static Value Dict(ValueDict d = {}, Kind k = kDict) {
    Value v; v.kind = k; v.dict = std::make_shared<ValueDict>(std::move(d)); return v;
  }
  static Value Func(std::string name) { Value v; v.kind = kFunc; v.s = std::move(name); return v; }

  const Value* Find(const std::string& key) const {
    for (const auto& [k, v] : *dict)
      if (k == key) return &v;
    return nullptr;
  }
};

// The error a render stops with; converted to a Status at the top.

inline bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
inline const std::vector<std::string> kFilters = {"trim", "length", "count", "tojson", "upper", "lower", "default", "d",
                                           "first", "last", "string", "int", "float", "join", "replace", "capitalize",
                                           "title", "list", "items", "safe", "reverse", "abs", "select", "reject",
                                           "selectattr", "rejectattr", "map"};
inline const std::vector<std::string> kTests = {"defined", "undefined", "none", "string", "mapping", "iterable", "sequence",
                                         "number", "integer", "float", "boolean", "true", "false", "even", "odd",
                                         "divisibleby", "equalto", "eq", "sameas", "in"};

inline bool Contains(const std::vector<std::string>& v, const std::string& s) { return std::find(v.begin(), v.end(), s) != v.end(); }

// A template the engine refuses or cannot read; `line` is the template's.
class ParseError {
 public:
  ParseError(int line, std::string m) : line(line), message(std::move(m)) {}
  int line;
  std::string message;
};

struct Expr;
using ExprP = std::shared_ptr<const Expr>;
struct Expr {
  enum Kind { kLit, kVar, kAttr, kItem, kSlice, kCall, kFilter, kTest, kNeg, kPos, kNot, kAnd, kOr, kBin, kCond, kList, kDict };
  Kind kind = kLit;
  int line = 0;
  Value lit;
  std::string name;  // kVar, kAttr, kFilter, kTest, kBin (the operator)
  bool negated = false;  // kTest: `is not`
  std::vector<ExprP> args;  // operands; kCall/kFilter/kTest: [subject, positional...]; kSlice: [obj, a, b, c] (null = absent)
  std::vector<std::pair<std::string, ExprP>> kwargs;  // kCall/kFilter; kDict: keys in `args`, values here
};


// The statement tree of a parsed template. Throws ParseError.
std::shared_ptr<ChatTemplate::Node> ParseTemplate(std::string_view source, bool* has_generation);

}  // namespace btx::model::chat_internal

namespace btx::model {
struct ChatTemplate::Node {
  enum Kind { kBlock, kText, kOut, kIf, kFor, kSet, kGeneration, kBreak, kContinue };
  Kind kind = kBlock;
  int line = 0;
  std::string text;                                         // kText
  chat_internal::ExprP expr;                                               // kOut, kSet (value), kFor (iterable)
  std::vector<std::pair<chat_internal::ExprP, std::shared_ptr<Node>>> branches;  // kIf: (condition, body); a null condition is else
  std::vector<std::string> targets;                         // kFor: loop variables; kSet: [name] or [name, attr]
  chat_internal::ExprP filter;                                             // kFor: `if` clause
  std::vector<std::shared_ptr<Node>> body;                  // kBlock, kGeneration: children; kFor: [body, else]
};

}  // namespace btx::model
