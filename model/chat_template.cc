#include "btx/model/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>

#include "chat_template_internal.h"

namespace btx::model {
namespace {
using namespace chat_internal;  // NOLINT: this file is the engine's other half

struct RenderError {
  std::string message;
  int line = 0;
};
[[noreturn]] void Throw(int line, std::string message) { throw RenderError{std::move(message), line}; }

const char* TypeName(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "undefined";
    case Value::kNone: return "none";
    case Value::kBool: return "bool";
    case Value::kInt: return "int";
    case Value::kFloat: return "float";
    case Value::kStr: return "string";
    case Value::kList: return "list";
    case Value::kDict: return "dict";
    case Value::kNamespace: return "namespace";
    case Value::kFunc: return "function";
  }
  return "?";
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: case Value::kNone: return false;
    case Value::kBool: return v.b;
    case Value::kInt: return v.i != 0;
    case Value::kFloat: return v.f != 0;
    case Value::kStr: return !v.s.empty();
    case Value::kList: return !v.list->empty();
    case Value::kDict: return !v.dict->empty();
    case Value::kNamespace: case Value::kFunc: return true;
  }
  return false;
}

Value FromJson(const nlohmann::ordered_json& j) {
  using value_t = nlohmann::ordered_json::value_t;
  switch (j.type()) {
    case value_t::null: return Value::None();
    case value_t::boolean: return Value::Bool(j.get<bool>());
    case value_t::number_integer: return Value::Int(j.get<int64_t>());
    case value_t::number_unsigned: return Value::Int(static_cast<int64_t>(j.get<uint64_t>()));
    case value_t::number_float: return Value::Float(j.get<double>());
    case value_t::string: return Value::Str(j.get<std::string>());
    case value_t::array: {
      ValueList l;
      for (const auto& e : j) l.push_back(FromJson(e));
      return Value::List(std::move(l));
    }
    case value_t::object: {
      ValueDict d;
      for (auto it = j.begin(); it != j.end(); ++it) d.emplace_back(it.key(), FromJson(it.value()));
      return Value::Dict(std::move(d));
    }
    default: return Value::None();
  }
}

// Python's repr of a float (shortest round trip, always with a '.', 'e', or inf/nan spelled as json.dumps does).
std::string FloatRepr(double f) {
  if (std::isnan(f)) return "NaN";
  if (std::isinf(f)) return f > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto [p, ec] = std::to_chars(buf, buf + sizeof buf, f);
  std::string s(buf, p);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  // Python writes 1e+16 and 1e-05: exponents have at least two digits.
  if (auto e = s.find('e'); e != std::string::npos) {
    std::string mant = s.substr(0, e), exp = s.substr(e + 1);
    std::string sign = "+";
    if (!exp.empty() && (exp[0] == '-' || exp[0] == '+')) {
      sign = exp.substr(0, 1);
      exp = exp.substr(1);
    }
    if (exp.size() < 2) exp = "0" + exp;
    s = mant + "e" + sign + exp;
  }
  return s;
}

// json.dumps(x, ensure_ascii=False) string escaping.
void JsonString(std::string& out, const std::string& s) {
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
}

// transformers' tojson: json.dumps(x, ensure_ascii=False, indent=indent), Python's separators.
void ToJsonText(std::string& out, const Value& v, int indent, int depth, int line) {
  auto newline = [&](int d) {
    out.push_back('\n');
    out.append(static_cast<size_t>(indent * d), ' ');
  };
  switch (v.kind) {
    case Value::kNone: out += "null"; return;
    case Value::kBool: out += v.b ? "true" : "false"; return;
    case Value::kInt: out += std::to_string(v.i); return;
    case Value::kFloat: out += FloatRepr(v.f); return;
    case Value::kStr: JsonString(out, v.s); return;
    case Value::kList: {
      if (v.list->empty()) { out += "[]"; return; }
      out.push_back('[');
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) newline(depth + 1);
        ToJsonText(out, (*v.list)[k], indent, depth + 1, line);
      }
      if (indent >= 0) newline(depth);
      out.push_back(']');
      return;
    }
    case Value::kDict: case Value::kNamespace: {
      if (v.dict->empty()) { out += "{}"; return; }
      out.push_back('{');
      bool first = true;
      for (const auto& [k, e] : *v.dict) {
        if (!first) out += indent >= 0 ? "," : ", ";
        first = false;
        if (indent >= 0) newline(depth + 1);
        JsonString(out, k);
        out += ": ";
        ToJsonText(out, e, indent, depth + 1, line);
      }
      if (indent >= 0) newline(depth);
      out.push_back('}');
      return;
    }
    case Value::kUndefined: Throw(line, "tojson of undefined '" + v.s + "'");
    case Value::kFunc: Throw(line, "tojson of a function");
  }
}

std::string Repr(const Value& v);
std::string StrRepr(const std::string& s) {
  const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    if (c == q || c == '\\') out.push_back('\\'), out.push_back(c);
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else out.push_back(c);
  }
  out.push_back(q);
  return out;
}

// str(v) as Python prints it ({{ v }}, |string, ~).
std::string ToText(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "";
    case Value::kNone: return "None";
    case Value::kBool: return v.b ? "True" : "False";
    case Value::kInt: return std::to_string(v.i);
    case Value::kFloat: {
      std::string s = FloatRepr(v.f);
      return s == "Infinity" ? "inf" : s == "-Infinity" ? "-inf" : s == "NaN" ? "nan" : s;
    }
    case Value::kStr: return v.s;
    default: return Repr(v);
  }
}

std::string Repr(const Value& v) {
  switch (v.kind) {
    case Value::kStr: return StrRepr(v.s);
    case Value::kList: {
      std::string s = "[";
      for (size_t k = 0; k < v.list->size(); ++k) s += (k ? ", " : "") + Repr((*v.list)[k]);
      return s + "]";
    }
    case Value::kDict: {
      std::string s = "{";
      bool first = true;
      for (const auto& [k, e] : *v.dict) {
        s += (first ? "" : ", ") + StrRepr(k) + ": " + Repr(e);
        first = false;
      }
      return s + "}";
    }
    case Value::kNamespace: return "<Namespace>";
    case Value::kFunc: return "<function " + v.s + ">";
    default: return ToText(v);
  }
}

// A string value and its marks, the marks kept when the value is printed or concatenated.
Value AsStr(const Value& v) { return v.kind == Value::kStr ? v : Value::Str(ToText(v)); }

Value Concat(const Value& a, const Value& b) {
  Value out = Value::Str(a.s + b.s, a.marks);
  for (ChatSpan m : b.marks) out.marks.push_back({m.begin + a.s.size(), m.end + a.s.size()});
  return out;
}


// s[l, r), marks clipped to it.
Value Substr(const Value& v, size_t l, size_t r) {
  Value out = Value::Str(v.s.substr(l, r - l));
  for (ChatSpan m : v.marks) {
    const size_t b = std::max(m.begin, l), e = std::min(m.end, r);
    if (b < e) out.marks.push_back({b - l, e - l});
  }
  return out;
}

Value Strip(const Value& v, bool left, bool right, const std::optional<std::string>& chars = std::nullopt) {
  auto strip = [&](char c) { return chars ? chars->find(c) != std::string::npos : IsSpace(c); };
  size_t l = 0, r = v.s.size();
  while (left && l < r && strip(v.s[l])) ++l;
  while (right && r > l && strip(v.s[r - 1])) --r;
  return Substr(v, l, r);
}

bool Equal(const Value& a, const Value& b) {
  const bool an = a.kind == Value::kInt || a.kind == Value::kFloat || a.kind == Value::kBool;
  const bool bn = b.kind == Value::kInt || b.kind == Value::kFloat || b.kind == Value::kBool;
  if (an && bn) {
    auto num = [](const Value& v) { return v.kind == Value::kFloat ? v.f : v.kind == Value::kInt ? double(v.i) : double(v.b); };
    if (a.kind != Value::kFloat && b.kind != Value::kFloat) {
      auto inum = [](const Value& v) { return v.kind == Value::kInt ? v.i : int64_t(v.b); };
      return inum(a) == inum(b);
    }
    return num(a) == num(b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::kUndefined: case Value::kNone: return true;
    case Value::kStr: case Value::kFunc: return a.s == b.s;
    case Value::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, e] : *a.dict) {
        const Value* o = b.Find(k);
        if (!o || !Equal(e, *o)) return false;
      }
      return true;
    case Value::kNamespace: return a.dict == b.dict;
    default: return false;
  }
}

using Node = ChatTemplate::Node;

// ------------------------------------------------------------------------------------------ render

struct Frame {
  std::map<std::string, Value> vars;
};

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  Renderer(std::string* out, std::vector<ChatSpan>* marks, std::vector<ChatSpan>* gen) : out_(out), marks_(marks), gen_(gen) {}
  std::vector<Frame> frames;

  Flow Run(const Node& n) {
    switch (n.kind) {
      case Node::kBlock:
        for (const auto& c : n.body) {
          Flow f = Run(*c);
          if (f != Flow::kNormal) return f;
        }
        return Flow::kNormal;
      case Node::kText: Emit(Value::Str(n.text)); return Flow::kNormal;
      case Node::kOut: Emit(AsStr(Eval(*n.expr))); return Flow::kNormal;
      case Node::kIf:
        for (const auto& [cond, body] : n.branches)
          if (!cond || Truthy(Eval(*cond))) return Run(*body);
        return Flow::kNormal;
      case Node::kSet: {
        Value v = Eval(*n.expr);
        if (n.targets.size() == 1) {
          frames.back().vars[n.targets[0]] = std::move(v);
        } else {
          Value ns = Lookup(n.targets[0]);
          if (ns.kind != Value::kNamespace)
            Throw(n.line, "{% set " + n.targets[0] + "." + n.targets[1] + " %}: " + n.targets[0] + " is not a namespace()");
          SetKey(*ns.dict, n.targets[1], std::move(v));
        }
        return Flow::kNormal;
      }
      case Node::kFor: return RunFor(n);
      case Node::kGeneration: {
        const size_t begin = out_->size();
        Flow f = Run(*n.body[0]);
        if (out_->size() > begin) gen_->push_back({begin, out_->size()});
        return f;
      }
      case Node::kBreak: return Flow::kBreak;
      case Node::kContinue: return Flow::kContinue;
    }
    return Flow::kNormal;
  }

 private:
  static void SetKey(ValueDict& d, const std::string& k, Value v) {
    for (auto& [key, val] : d)
      if (key == k) {
        val = std::move(v);
        return;
      }
    d.emplace_back(k, std::move(v));
  }

  void Emit(const Value& v) {
    for (ChatSpan m : v.marks) {
      ChatSpan s{m.begin + out_->size(), m.end + out_->size()};
      if (!marks_->empty() && marks_->back().end == s.begin) marks_->back().end = s.end;
      else marks_->push_back(s);
    }
    out_->append(v.s);
  }

  Value Lookup(const std::string& name) const {
    for (auto it = frames.rbegin(); it != frames.rend(); ++it)
      if (auto f = it->vars.find(name); f != it->vars.end()) return f->second;
    if (name == "raise_exception" || name == "namespace" || name == "range" || name == "dict") return Value::Func(name);
    return Value::Undefined(name);
  }

  std::vector<Value> Items(const Value& v, int line) {
    switch (v.kind) {
      case Value::kUndefined: return {};
      case Value::kList: return *v.list;
      case Value::kDict: {
        std::vector<Value> keys;
        for (const auto& [k, e] : *v.dict) keys.push_back(Value::Str(k));
        return keys;
      }
      case Value::kStr: {
        std::vector<Value> chars;
        for (size_t k = 0; k < v.s.size();) {
          size_t n = 1;
          const unsigned char c = static_cast<unsigned char>(v.s[k]);
          if (c >= 0xf0) n = 4;
          else if (c >= 0xe0) n = 3;
          else if (c >= 0xc0) n = 2;
          chars.push_back(Value::Str(v.s.substr(k, n)));
          k += n;
        }
        return chars;
      }
      default: Throw(line, std::string("cannot iterate over a ") + TypeName(v));
    }
  }

  Flow RunFor(const Node& n) {
    std::vector<Value> items = Items(Eval(*n.expr), n.line);
    frames.emplace_back();
    auto bind = [&](const Value& item) {
      if (n.targets.size() == 1) {
        frames.back().vars[n.targets[0]] = item;
        return;
      }
      std::vector<Value> parts = Items(item, n.line);
      if (parts.size() != n.targets.size())
        Throw(n.line, "cannot unpack " + std::to_string(parts.size()) + " values into " + std::to_string(n.targets.size()));
      for (size_t k = 0; k < parts.size(); ++k) frames.back().vars[n.targets[k]] = parts[k];
    };
    if (n.filter) {
      std::vector<Value> kept;
      for (const auto& item : items) {
        bind(item);
        if (Truthy(Eval(*n.filter))) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < len; ++k) {
      frames.back().vars.clear();
      bind(items[static_cast<size_t>(k)]);
      frames.back().vars["loop"] = Value::Dict({{"index0", Value::Int(k)},
                                                {"index", Value::Int(k + 1)},
                                                {"revindex0", Value::Int(len - k - 1)},
                                                {"revindex", Value::Int(len - k)},
                                                {"first", Value::Bool(k == 0)},
                                                {"last", Value::Bool(k == len - 1)},
                                                {"length", Value::Int(len)}});
      const Flow f = Run(*n.body[0]);
      if (f == Flow::kBreak) break;
    }
    frames.pop_back();
    if (len == 0) {
      frames.emplace_back();
      Run(*n.body[1]);
      frames.pop_back();
    }
    return Flow::kNormal;
  }

  static int64_t Index(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

  Value Subscript(const Value& obj, const Value& key, int line) {
    if (obj.kind == Value::kUndefined) Throw(line, "'" + obj.s + "' is undefined (subscripted)");
    if (obj.kind == Value::kDict || obj.kind == Value::kNamespace) {
      if (key.kind != Value::kStr) return Value::Undefined(Repr(key));
      const Value* v = obj.Find(key.s);
      return v ? *v : Value::Undefined(key.s);
    }
    if ((obj.kind == Value::kList || obj.kind == Value::kStr) && (key.kind == Value::kInt || key.kind == Value::kBool)) {
      if (obj.kind == Value::kList) {
        const int64_t n = static_cast<int64_t>(obj.list->size()), i = Index(key.kind == Value::kInt ? key.i : key.b, n);
        if (i < 0 || i >= n) return Value::Undefined("index " + std::to_string(key.i));
        return (*obj.list)[static_cast<size_t>(i)];
      }
      std::vector<Value> chars = Items(obj, line);
      const int64_t n = static_cast<int64_t>(chars.size()), i = Index(key.i, n);
      if (i < 0 || i >= n) return Value::Undefined("index " + std::to_string(key.i));
      return chars[static_cast<size_t>(i)];
    }
    if (obj.kind == Value::kNone) return Value::Undefined(Repr(key));
    return Value::Undefined(Repr(key));
  }

  Value Slice(const Expr& e) {
    Value obj = Eval(*e.args[0]);
    auto opt = [&](const ExprP& x) -> std::optional<int64_t> {
      if (!x) return std::nullopt;
      Value v = Eval(*x);
      if (v.kind == Value::kNone) return std::nullopt;
      if (v.kind != Value::kInt) Throw(e.line, "slice indices must be integers");
      return v.i;
    };
    const auto a = opt(e.args[1]), b = opt(e.args[2]), c = opt(e.args[3]);
    const int64_t step = c.value_or(1);
    if (step == 0) Throw(e.line, "slice step cannot be zero");
    std::vector<Value> items;
    if (obj.kind == Value::kList) items = *obj.list;
    else if (obj.kind == Value::kStr) items = Items(obj, e.line);
    else Throw(e.line, std::string("cannot slice a ") + TypeName(obj));
    const int64_t n = static_cast<int64_t>(items.size());
    auto clamp = [&](std::optional<int64_t> x, int64_t def) {
      if (!x) return def;
      int64_t v = *x < 0 ? *x + n : *x;
      return step > 0 ? std::clamp<int64_t>(v, 0, n) : std::clamp<int64_t>(v, -1, n - 1);
    };
    const int64_t lo = clamp(a, step > 0 ? 0 : n - 1), hi = clamp(b, step > 0 ? n : -1);
    std::vector<Value> out;
    for (int64_t k = lo; step > 0 ? k < hi : k > hi; k += step) out.push_back(items[static_cast<size_t>(k)]);
    if (obj.kind == Value::kList) return Value::List(std::move(out));
    std::string s;
    for (const auto& v : out) s += v.s;
    return Value::Str(s);
  }

  static double Num(const Value& v, int line, const char* op) {
    if (v.kind == Value::kInt) return static_cast<double>(v.i);
    if (v.kind == Value::kFloat) return v.f;
    if (v.kind == Value::kBool) return v.b;
    Throw(line, std::string("unsupported operand type for ") + op + ": " + TypeName(v));
  }

  Value Binary(const Expr& e) {
    const std::string& op = e.name;
    Value a = Eval(*e.args[0]);
    Value b = Eval(*e.args[1]);
    if (op == "==") return Value::Bool(Equal(a, b));
    if (op == "!=") return Value::Bool(!Equal(a, b));
    if (op == "in" || op == "not in") {
      bool found = false;
      if (b.kind == Value::kStr) {
        if (a.kind != Value::kStr) Throw(e.line, "'in <string>' requires a string on the left");
        found = b.s.find(a.s) != std::string::npos;
      } else if (b.kind == Value::kList) {
        for (const auto& x : *b.list) found = found || Equal(a, x);
      } else if (b.kind == Value::kDict || b.kind == Value::kNamespace) {
        found = a.kind == Value::kStr && b.Find(a.s);
      } else if (b.kind == Value::kUndefined) {
        Throw(e.line, "'" + b.s + "' is undefined (right of 'in')");
      } else {
        Throw(e.line, std::string("argument of type ") + TypeName(b) + " is not iterable");
      }
      return Value::Bool(op == "in" ? found : !found);
    }
    if (op == "~") return Concat(AsStr(a), AsStr(b));
    for (const Value* v : {&a, &b})
      if (v->kind == Value::kUndefined) Throw(e.line, "'" + v->s + "' is undefined (operand of '" + op + "')");
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c = 0;
      if (a.kind == Value::kStr && b.kind == Value::kStr) c = a.s.compare(b.s);
      else {
        const double x = Num(a, e.line, op.c_str()), y = Num(b, e.line, op.c_str());
        c = x < y ? -1 : x > y ? 1 : 0;
      }
      return Value::Bool(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
    }
    if (op == "+") {
      if (a.kind == Value::kStr && b.kind == Value::kStr) return Concat(a, b);
      if (a.kind == Value::kList && b.kind == Value::kList) {
        ValueList l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::List(std::move(l));
      }
      if (a.kind == Value::kStr || b.kind == Value::kStr)
        Throw(e.line, std::string("cannot add ") + TypeName(a) + " and " + TypeName(b) + " (use ~ to concatenate as text)");
    }
    if (op == "*" && ((a.kind == Value::kStr && b.kind == Value::kInt) || (a.kind == Value::kInt && b.kind == Value::kStr))) {
      const Value& s = a.kind == Value::kStr ? a : b;
      std::string out;
      for (int64_t k = 0; k < (a.kind == Value::kInt ? a.i : b.i); ++k) out += s.s;
      return Value::Str(out);
    }
    const bool ints = (a.kind == Value::kInt || a.kind == Value::kBool) && (b.kind == Value::kInt || b.kind == Value::kBool);
    const double x = Num(a, e.line, op.c_str()), y = Num(b, e.line, op.c_str());
    if (ints) {
      const int64_t p = a.kind == Value::kInt ? a.i : a.b, q = b.kind == Value::kInt ? b.i : b.b;
      if (op == "+") return Value::Int(p + q);
      if (op == "-") return Value::Int(p - q);
      if (op == "*") return Value::Int(p * q);
      if ((op == "//" || op == "%") && q == 0) Throw(e.line, "integer division or modulo by zero");
      if (op == "//") return Value::Int(p / q - ((p % q != 0) && ((p < 0) != (q < 0))));
      if (op == "%") return Value::Int(((p % q) + q) % q);
    }
    if (op == "+") return Value::Float(x + y);
    if (op == "-") return Value::Float(x - y);
    if (op == "*") return Value::Float(x * y);
    if (op == "**") return ints && y >= 0 ? Value::Int(static_cast<int64_t>(std::pow(x, y))) : Value::Float(std::pow(x, y));
    if (y == 0) Throw(e.line, "division by zero");
    if (op == "/") return Value::Float(x / y);
    if (op == "//") return Value::Float(std::floor(x / y));
    if (op == "%") return Value::Float(x - std::floor(x / y) * y);
    Throw(e.line, "unknown operator " + op);
  }

  std::vector<Value> Args(const Expr& e, size_t from) {
    std::vector<Value> out;
    for (size_t k = from; k < e.args.size(); ++k) out.push_back(Eval(*e.args[k]));
    return out;
  }
  std::optional<Value> Kwarg(const Expr& e, const char* name) {
    for (const auto& [k, v] : e.kwargs)
      if (k == name) return Eval(*v);
    return std::nullopt;
  }

  Value Filter(const Expr& e) {
    const std::string& f = e.name;
    Value v = Eval(*e.args[0]);
    std::vector<Value> args = Args(e, 1);
    auto arg = [&](size_t k, const char* kw) -> std::optional<Value> {
      if (k < args.size()) return args[k];
      return Kwarg(e, kw);
    };
    auto need_str = [&]() {
      if (v.kind != Value::kStr) Throw(e.line, "filter " + f + " expects a string, got " + TypeName(v));
    };
    if (f == "trim") return Strip(AsStr(v), true, true, arg(0, "chars") ? std::optional(arg(0, "chars")->s) : std::nullopt);
    if (f == "length" || f == "count") {
      if (v.kind == Value::kUndefined) return Value::Int(0);
      if (v.kind == Value::kStr) return Value::Int(static_cast<int64_t>(Items(v, e.line).size()));
      if (v.kind == Value::kList) return Value::Int(static_cast<int64_t>(v.list->size()));
      if (v.kind == Value::kDict) return Value::Int(static_cast<int64_t>(v.dict->size()));
      Throw(e.line, std::string("object of type ") + TypeName(v) + " has no length");
    }
    if (f == "tojson") {
      std::string out;
      auto indent = arg(0, "indent");
      ToJsonText(out, v, indent && indent->kind == Value::kInt ? static_cast<int>(indent->i) : -1, 0, e.line);
      return Value::Str(out);
    }
    if (f == "upper" || f == "lower") {
      std::string s = ToText(v);
      for (char& c : s) c = static_cast<char>(f == "upper" ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
      return Value::Str(s);
    }
    if (f == "capitalize" || f == "title") {
      std::string s = ToText(v);
      bool start = true;
      for (size_t k = 0; k < s.size(); ++k) {
        unsigned char c = static_cast<unsigned char>(s[k]);
        const bool alpha = std::isalpha(c);
        if (f == "capitalize") s[k] = static_cast<char>(k == 0 ? std::toupper(c) : std::tolower(c));
        else s[k] = static_cast<char>(alpha ? (start ? std::toupper(c) : std::tolower(c)) : c);
        start = !alpha;
      }
      return Value::Str(s);
    }
    if (f == "default" || f == "d") {
      const auto boolean = arg(1, "boolean");
      const bool use_default = v.kind == Value::kUndefined || (boolean && Truthy(*boolean) && !Truthy(v));
      if (!use_default) return v;
      auto def = arg(0, "default_value");
      return def ? *def : Value::Str("");
    }
    if (f == "first" || f == "last") {
      std::vector<Value> items = Items(v, e.line);
      if (items.empty()) return Value::Undefined(f + " of an empty sequence");
      return f == "first" ? items.front() : items.back();
    }
    if (f == "string" || f == "safe") return AsStr(v);
    if (f == "int") {
      if (v.kind == Value::kInt) return v;
      if (v.kind == Value::kFloat) return Value::Int(static_cast<int64_t>(v.f));
      if (v.kind == Value::kBool) return Value::Int(v.b);
      if (v.kind == Value::kStr) {
        int64_t x = 0;
        std::string s = Strip(v, true, true).s;
        auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), x);
        if (ec == std::errc() && p == s.data() + s.size()) return Value::Int(x);
      }
      auto def = arg(0, "default");
      return def ? *def : Value::Int(0);
    }
    if (f == "float") {
      if (v.kind == Value::kInt) return Value::Float(static_cast<double>(v.i));
      if (v.kind == Value::kFloat) return v;
      if (v.kind == Value::kStr) {
        char* end = nullptr;
        const double x = std::strtod(v.s.c_str(), &end);
        if (!v.s.empty() && *end == '\0') return Value::Float(x);
      }
      return Value::Float(0);
    }
    if (f == "abs") {
      if (v.kind == Value::kInt) return Value::Int(v.i < 0 ? -v.i : v.i);
      return Value::Float(std::fabs(Num(v, e.line, "abs")));
    }
    if (f == "join") {
      const auto sep = arg(0, "d");
      if (arg(1, "attribute")) Throw(e.line, "join(attribute=...) is not supported");
      Value out = Value::Str("");
      bool first = true;
      for (const auto& x : Items(v, e.line)) {
        if (!first && sep) out = Concat(out, AsStr(*sep));
        out = Concat(out, AsStr(x));
        first = false;
      }
      return out;
    }
    if (f == "replace") {
      need_str();
      if (args.size() < 2) Throw(e.line, "replace needs (old, new)");
      return StrReplace(v.s, args[0].s, args[1].s, args.size() > 2 ? args[2].i : -1);
    }
    if (f == "list") return Value::List(Items(v, e.line));
    if (f == "reverse") {
      std::vector<Value> items = Items(v, e.line);
      std::reverse(items.begin(), items.end());
      if (v.kind == Value::kStr) {
        std::string s;
        for (const auto& x : items) s += x.s;
        return Value::Str(s);
      }
      return Value::List(std::move(items));
    }
    if (f == "items") return DictItems(v, e.line);
    if (f == "select" || f == "reject" || f == "selectattr" || f == "rejectattr") {
      // select(test, args...), selectattr(attribute, test, args...): a missing test means truthiness.
      const bool attr = f.ends_with("attr"), keep = f.starts_with("select");
      if (attr && args.empty()) Throw(e.line, f + " needs an attribute name");
      const size_t t0 = attr ? 1 : 0;
      if (args.size() > t0 && args[t0].kind != Value::kStr) Throw(e.line, f + ": the test must be named by a string");
      if (args.size() > t0 && !Contains(kTests, args[t0].s)) Throw(e.line, f + ": test '" + args[t0].s + "' is not supported");
      ValueList out;
      for (const auto& item : Items(v, e.line)) {
        Value subject = item;
        if (attr) subject = item.kind == Value::kDict && item.Find(args[0].s) ? *item.Find(args[0].s) : Value::Undefined(args[0].s);
        const bool pass = args.size() > t0 ? RunTest(args[t0].s, subject, {args.begin() + t0 + 1, args.end()}, e.line)
                                           : Truthy(subject);
        if (pass == keep) out.push_back(item);
      }
      return Value::List(std::move(out));
    }
    if (f == "map") {
      const auto attribute = Kwarg(e, "attribute");
      if (!attribute || attribute->kind != Value::kStr || !args.empty())
        Throw(e.line, "only map(attribute='name') is supported");
      ValueList out;
      for (const auto& item : Items(v, e.line)) {
        const Value* x = item.kind == Value::kDict ? item.Find(attribute->s) : nullptr;
        out.push_back(x ? *x : Value::Undefined(attribute->s));
      }
      return Value::List(std::move(out));
    }
    Throw(e.line, "filter '" + f + "' is not supported");
  }

  static Value StrReplace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
    std::string out;
    size_t k = 0;
    int64_t done = 0;
    if (from.empty()) return Value::Str(s);
    for (;;) {
      size_t at = s.find(from, k);
      if (at == std::string::npos || (count >= 0 && done >= count)) break;
      out += s.substr(k, at - k) + to;
      k = at + from.size();
      ++done;
    }
    return Value::Str(out + s.substr(k));
  }

  Value DictItems(const Value& v, int line) {
    if (v.kind != Value::kDict) Throw(line, std::string("items() of a ") + TypeName(v));
    ValueList l;
    for (const auto& [k, x] : *v.dict) l.push_back(Value::List({Value::Str(k), x}));
    return Value::List(std::move(l));
  }

  bool Test(const Expr& e) { return RunTest(e.name, Eval(*e.args[0]), Args(e, 1), e.line); }

  bool RunTest(const std::string& t, const Value& v, const std::vector<Value>& args, int line) {
    Expr e;
    e.line = line;
    auto arg0 = [&]() -> const Value& {
      if (args.empty()) Throw(e.line, "test '" + t + "' needs an argument");
      return args[0];
    };
    if (t == "defined") return v.kind != Value::kUndefined;
    if (t == "undefined") return v.kind == Value::kUndefined;
    if (t == "none") return v.kind == Value::kNone;
    if (t == "string") return v.kind == Value::kStr;
    if (t == "mapping") return v.kind == Value::kDict;
    if (t == "iterable") return v.kind == Value::kList || v.kind == Value::kStr || v.kind == Value::kDict || v.kind == Value::kUndefined;
    if (t == "sequence") return v.kind == Value::kList || v.kind == Value::kStr || v.kind == Value::kDict;
    if (t == "number") return v.kind == Value::kInt || v.kind == Value::kFloat || v.kind == Value::kBool;
    if (t == "integer") return v.kind == Value::kInt;
    if (t == "float") return v.kind == Value::kFloat;
    if (t == "boolean") return v.kind == Value::kBool;
    if (t == "true") return v.kind == Value::kBool && v.b;
    if (t == "false") return v.kind == Value::kBool && !v.b;
    if (t == "even" || t == "odd") {
      if (v.kind != Value::kInt) Throw(e.line, "test '" + t + "' needs an integer");
      return (v.i % 2 == 0) == (t == "even");
    }
    if (t == "divisibleby") {
      const Value& d = arg0();
      if (v.kind != Value::kInt || d.kind != Value::kInt || d.i == 0) Throw(e.line, "divisibleby needs non-zero integers");
      return v.i % d.i == 0;
    }
    if (t == "equalto" || t == "eq") return Equal(v, arg0());
    if (t == "sameas") {
      const Value& o = arg0();
      if (v.kind != o.kind) return false;
      if (v.kind == Value::kNone || v.kind == Value::kUndefined) return true;
      if (v.kind == Value::kBool) return v.b == o.b;
      return false;
    }
    if (t == "in") {
      const Value& c = arg0();
      if (c.kind == Value::kList) {
        for (const auto& x : *c.list)
          if (Equal(v, x)) return true;
        return false;
      }
      if (c.kind == Value::kStr) return v.kind == Value::kStr && c.s.find(v.s) != std::string::npos;
      if (c.kind == Value::kDict) return v.kind == Value::kStr && c.Find(v.s);
      Throw(e.line, "test 'in' needs a sequence");
    }
    Throw(e.line, "test '" + t + "' is not supported");
  }

  Value Method(const Value& obj, const std::string& name, const Expr& call) {
    std::vector<Value> args = Args(call, 1);
    auto str_arg = [&](size_t k) -> std::optional<std::string> {
      if (k >= args.size() || args[k].kind == Value::kNone) return std::nullopt;
      if (args[k].kind != Value::kStr) Throw(call.line, name + "() takes string arguments");
      return args[k].s;
    };
    if (obj.kind == Value::kStr) {
      const std::string& s = obj.s;
      if (name == "strip") return Strip(obj, true, true, str_arg(0));
      if (name == "lstrip") return Strip(obj, true, false, str_arg(0));
      if (name == "rstrip") return Strip(obj, false, true, str_arg(0));
      if (name == "startswith" || name == "endswith") {
        const auto x = str_arg(0);
        if (!x) Throw(call.line, name + "() needs an argument");
        return Value::Bool(name == "startswith" ? s.starts_with(*x) : s.ends_with(*x));
      }
      if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
        Expr f;
        f.kind = Expr::kFilter;
        f.name = name;
        f.line = call.line;
        auto lit = std::make_shared<Expr>();
        lit->lit = obj;
        f.args = {lit};
        return Filter(f);
      }
      if (name == "replace") {
        if (args.size() < 2) Throw(call.line, "replace() needs (old, new)");
        return StrReplace(s, *str_arg(0), *str_arg(1), args.size() > 2 ? args[2].i : -1);
      }
      if (name == "split") {
        const auto sep = str_arg(0);
        const int64_t max = args.size() > 1 && args[1].kind == Value::kInt ? args[1].i : -1;
        ValueList parts;
        if (!sep) {
          size_t k = 0;
          int64_t done = 0;
          while (k < s.size()) {
            while (k < s.size() && IsSpace(s[k])) ++k;
            if (k >= s.size()) break;
            if (max >= 0 && done >= max) {
              parts.push_back(Value::Str(Strip(Value::Str(s.substr(k)), false, true).s));
              break;
            }
            size_t j = k;
            while (j < s.size() && !IsSpace(s[j])) ++j;
            parts.push_back(Value::Str(s.substr(k, j - k)));
            ++done;
            k = j;
          }
        } else {
          if (sep->empty()) Throw(call.line, "split(): empty separator");
          size_t k = 0;
          int64_t done = 0;
          for (;;) {
            size_t at = s.find(*sep, k);
            if (at == std::string::npos || (max >= 0 && done >= max)) break;
            parts.push_back(Value::Str(s.substr(k, at - k)));
            k = at + sep->size();
            ++done;
          }
          parts.push_back(Value::Str(s.substr(k)));
        }
        return Value::List(std::move(parts));
      }
    }
    if (obj.kind == Value::kDict) {
      if (name == "items") return DictItems(obj, call.line);
      if (name == "keys" || name == "values") {
        ValueList l;
        for (const auto& [k, v] : *obj.dict) l.push_back(name == "keys" ? Value::Str(k) : v);
        return Value::List(std::move(l));
      }
      if (name == "get") {
        if (args.empty() || args[0].kind != Value::kStr) Throw(call.line, "get() needs a string key");
        const Value* v = obj.Find(args[0].s);
        return v ? *v : args.size() > 1 ? args[1] : Value::None();
      }
    }
    Throw(call.line, std::string("method ") + name + "() of a " + TypeName(obj) + " is not supported");
  }

  Value Call(const Expr& e) {
    const Expr& callee = *e.args[0];
    if (callee.kind == Expr::kAttr) {
      Value obj = Eval(*callee.args[0]);
      if (obj.kind == Value::kUndefined) Throw(e.line, "'" + obj.s + "' is undefined (method " + callee.name + "())");
      if (obj.kind == Value::kStr || obj.kind == Value::kDict) return Method(obj, callee.name, e);
    }
    Value f = Eval(callee);
    if (f.kind != Value::kFunc) {
      Throw(e.line, f.kind == Value::kUndefined ? "'" + f.s + "' is undefined (called as a function)"
                                                : std::string("a ") + TypeName(f) + " is not callable");
    }
    std::vector<Value> args = Args(e, 1);
    if (f.s == "raise_exception") {
      Throw(e.line, "raise_exception: " + (args.empty() ? std::string() : ToText(args[0])));
    }
    if (f.s == "namespace" || f.s == "dict") {
      ValueDict d;
      if (!args.empty()) {
        if (args[0].kind != Value::kDict) Throw(e.line, f.s + "() takes keyword arguments or one dict");
        d = *args[0].dict;
      }
      for (const auto& [k, x] : e.kwargs) SetKey(d, k, Eval(*x));
      return Value::Dict(std::move(d), f.s == "namespace" ? Value::kNamespace : Value::kDict);
    }
    if (f.s == "range") {
      int64_t lo = 0, hi = 0, step = 1;
      for (const auto& a : args)
        if (a.kind != Value::kInt) Throw(e.line, "range() takes integers");
      if (args.size() == 1) hi = args[0].i;
      else if (args.size() >= 2) lo = args[0].i, hi = args[1].i;
      if (args.size() == 3) step = args[2].i;
      if (args.empty() || args.size() > 3 || step == 0) Throw(e.line, "range() takes 1 to 3 integers, step not 0");
      if ((hi - lo) / step > 100000) Throw(e.line, "range() over more than 100000 items");
      ValueList l;
      for (int64_t k = lo; step > 0 ? k < hi : k > hi; k += step) l.push_back(Value::Int(k));
      return Value::List(std::move(l));
    }
    Throw(e.line, "unknown function " + f.s);
  }

 public:
  Value Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::kLit: return e.lit;
      case Expr::kVar: return Lookup(e.name);
      case Expr::kAttr: {
        Value obj = Eval(*e.args[0]);
        if (obj.kind == Value::kUndefined)
          Throw(e.line, "'" + obj.s + "' is undefined (has no attribute '" + e.name + "')");
        if (obj.kind == Value::kDict || obj.kind == Value::kNamespace) {
          const Value* v = obj.Find(e.name);
          return v ? *v : Value::Undefined(e.name);
        }
        return Value::Undefined(e.name);
      }
      case Expr::kItem: return Subscript(Eval(*e.args[0]), Eval(*e.args[1]), e.line);
      case Expr::kSlice: return Slice(e);
      case Expr::kCall: return Call(e);
      case Expr::kFilter: return Filter(e);
      case Expr::kTest: return Value::Bool(Test(e) != e.negated);
      case Expr::kNeg: case Expr::kPos: {
        Value v = Eval(*e.args[0]);
        if (v.kind == Value::kInt) return Value::Int(e.kind == Expr::kNeg ? -v.i : v.i);
        if (v.kind == Value::kFloat) return Value::Float(e.kind == Expr::kNeg ? -v.f : v.f);
        Throw(e.line, std::string("bad operand type for unary -: ") + TypeName(v));
      }
      case Expr::kNot: return Value::Bool(!Truthy(Eval(*e.args[0])));
      case Expr::kAnd: {
        Value a = Eval(*e.args[0]);
        return Truthy(a) ? Eval(*e.args[1]) : a;
      }
      case Expr::kOr: {
        Value a = Eval(*e.args[0]);
        return Truthy(a) ? a : Eval(*e.args[1]);
      }
      case Expr::kBin: return Binary(e);
      case Expr::kCond: return Truthy(Eval(*e.args[1])) ? Eval(*e.args[0]) : Eval(*e.args[2]);
      case Expr::kList: return Value::List(Args(e, 0));
      case Expr::kDict: {
        ValueDict d;
        for (size_t k = 0; k < e.args.size(); ++k) {
          Value key = Eval(*e.args[k]);
          if (key.kind != Value::kStr) Throw(e.line, "dict keys must be strings");
          SetKey(d, key.s, Eval(*e.kwargs[k].second));
        }
        return Value::Dict(std::move(d));
      }
    }
    return Value::Undefined("?");
  }

 private:
  std::string* out_;
  std::vector<ChatSpan>* marks_;
  std::vector<ChatSpan>* gen_;
};

}  // namespace


StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source, const std::string& origin) {
  ChatTemplate t;
  t.origin_ = origin;
  try {
    t.root_ = ParseTemplate(source, &t.has_generation_);
  } catch (const ParseError& e) {
    return InvalidArgument(origin + " line " + std::to_string(e.line) + ": " + e.message);
  }
  return t;
}

StatusOr<ChatRendering> ChatTemplate::Render(const nlohmann::ordered_json& messages, const ChatVariables& vars) const {
  if (!messages.is_array()) return InvalidArgument("messages must be a list");
  ChatRendering r;
  Renderer run(&r.text, &r.assistant_content, &r.generation);
  run.frames.emplace_back();
  auto& globals = run.frames.back().vars;
  for (auto it = vars.extra.begin(); it != vars.extra.end(); ++it) globals[it.key()] = FromJson(it.value());
  ValueList msgs;
  for (const auto& m : messages) {
    Value v = FromJson(m);
    // The loss goes where assistant content lands: mark its bytes, the marks follow the string through the template.
    if (v.kind == Value::kDict) {
      const Value* role = v.Find("role");
      for (auto& [k, x] : *v.dict)
        if (k == "content" && x.kind == Value::kStr && role && role->kind == Value::kStr && role->s == "assistant" &&
            !x.s.empty())
          x.marks = {{0, x.s.size()}};
    }
    msgs.push_back(std::move(v));
  }
  globals["messages"] = Value::List(std::move(msgs));
  globals["bos_token"] = Value::Str(vars.bos_token);
  globals["eos_token"] = Value::Str(vars.eos_token);
  globals["add_generation_prompt"] = Value::Bool(vars.add_generation_prompt);
  try {
    run.Run(*root_);
  } catch (const RenderError& e) {
    return InvalidArgument(origin_ + " line " + std::to_string(e.line) + ": " + e.message);
  }
  return r;
}

std::vector<ChatSpan> LossSpans(const ChatRendering& r, const ChatTemplate& t, const std::string& eos_token) {
  if (t.has_generation()) return r.generation;
  std::vector<std::string> ends = {"<|eot_id|>", "<|im_end|>", "<end_of_turn>", "</s>", "<|end|>", "<|endoftext|>"};
  if (!eos_token.empty()) ends.insert(ends.begin(), eos_token);
  std::vector<ChatSpan> out;
  for (ChatSpan s : r.assistant_content) {
    for (const auto& e : ends)
      if (!e.empty() && r.text.compare(s.end, e.size(), e) == 0) {
        s.end += e.size();
        break;
      }
    if (!out.empty() && out.back().end >= s.begin) out.back().end = std::max(out.back().end, s.end);
    else out.push_back(s);
  }
  return out;
}

}  // namespace btx::model
