// The chat template parser: Jinja's lexer rules as transformers configures them, expressions, statements.
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <memory>

#include "chat_template_internal.h"

namespace btx::model::chat_internal {
namespace {

// ------------------------------------------------------------------------------------------- lexing

struct Tok {
  enum Kind { kName, kStr, kInt, kFloat, kOp, kEnd };
  Kind kind = kEnd;
  std::string text;
  int line = 0;
};

// Python string-literal escapes, as Jinja decodes them ("unicode-escape"); unknown escapes stay as written.
void AppendUtf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out.push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}



std::vector<Tok> LexExpr(const std::string& src, int line) {
  std::vector<Tok> out;
  size_t i = 0;
  static const char* kOps2[] = {"==", "!=", "<=", ">=", "//", "**"};
  while (i < src.size()) {
    const char c = src[i];
    if (c == '\n') { ++line; ++i; continue; }
    if (IsSpace(c)) { ++i; continue; }
    Tok t;
    t.line = line;
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < src.size() && (std::isalnum(static_cast<unsigned char>(src[j])) || src[j] == '_')) ++j;
      t.kind = Tok::kName;
      t.text = src.substr(i, j - i);
      i = j;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool flt = false;
      while (j < src.size() && (std::isdigit(static_cast<unsigned char>(src[j])) || src[j] == '_')) ++j;
      if (j + 1 < src.size() && src[j] == '.' && std::isdigit(static_cast<unsigned char>(src[j + 1]))) {
        flt = true;
        ++j;
        while (j < src.size() && std::isdigit(static_cast<unsigned char>(src[j]))) ++j;
      }
      t.kind = flt ? Tok::kFloat : Tok::kInt;
      t.text = src.substr(i, j - i);
      t.text.erase(std::remove(t.text.begin(), t.text.end(), '_'), t.text.end());
      i = j;
    } else if (c == '\'' || c == '"') {
      std::string s;
      size_t j = i + 1;
      const int start_line = line;
      for (;; ++j) {
        if (j >= src.size()) throw ParseError(start_line, "unterminated string literal");
        if (src[j] == c) break;
        if (src[j] == '\n') ++line;
        if (src[j] != '\\' || j + 1 >= src.size()) {
          s.push_back(src[j]);
          continue;
        }
        const char e = src[++j];
        auto hex = [&](int n) {
          if (j + n >= src.size()) throw ParseError(line, "truncated \\x/\\u escape in a string literal");
          uint32_t cp = 0;
          for (int k = 1; k <= n; ++k) {
            const char h = src[j + k];
            if (!std::isxdigit(static_cast<unsigned char>(h))) throw ParseError(line, "bad hex escape in a string literal");
            cp = cp * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
          }
          j += static_cast<size_t>(n);
          AppendUtf8(s, cp);
        };
        switch (e) {
          case 'n': s.push_back('\n'); break;
          case 't': s.push_back('\t'); break;
          case 'r': s.push_back('\r'); break;
          case '\\': s.push_back('\\'); break;
          case '\'': s.push_back('\''); break;
          case '"': s.push_back('"'); break;
          case 'a': s.push_back('\a'); break;
          case 'b': s.push_back('\b'); break;
          case 'f': s.push_back('\f'); break;
          case 'v': s.push_back('\v'); break;
          case '0': s.push_back('\0'); break;
          case '\n': ++line; break;  // a line continuation
          case 'x': hex(2); break;
          case 'u': hex(4); break;
          case 'U': hex(8); break;
          default: s.push_back('\\'); s.push_back(e);
        }
      }
      t.kind = Tok::kStr;
      t.text = std::move(s);
      i = j + 1;
    } else {
      t.kind = Tok::kOp;
      for (const char* op : kOps2)
        if (src.compare(i, 2, op) == 0) t.text = op;
      if (t.text.empty()) {
        if (std::string_view("+-*/%~|.,:()[]{}<>=").find(c) == std::string_view::npos)
          throw ParseError(line, std::string("unexpected character '") + c + "'");
        t.text = std::string(1, c);
      }
      i += t.text.size();
    }
    out.push_back(std::move(t));
  }
  Tok end;
  end.line = line;
  out.push_back(end);
  return out;
}


class ExprParser {
 public:
  explicit ExprParser(std::vector<Tok> toks) : t_(std::move(toks)) {}

  ExprP Expression() { return Cond(); }
  ExprP ExpressionNoCond() { return Or(); }
  const Tok& Peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  bool AtEnd() const { return Peek().kind == Tok::kEnd; }
  bool IsOp(const char* op, size_t k = 0) const { return Peek(k).kind == Tok::kOp && Peek(k).text == op; }
  bool IsName(const char* n, size_t k = 0) const { return Peek(k).kind == Tok::kName && Peek(k).text == n; }
  Tok Next() { return t_[std::min(p_++, t_.size() - 1)]; }
  void Expect(const char* op) {
    if (!IsOp(op)) Fail("expected '" + std::string(op) + "'");
    ++p_;
  }
  std::string ExpectName() {
    if (Peek().kind != Tok::kName) Fail("expected a name");
    return Next().text;
  }
  [[noreturn]] void Fail(const std::string& why) const {
    const Tok& t = Peek();
    throw ParseError(t.line, why + (t.kind == Tok::kEnd ? " at the end of the tag" : ", got '" + t.text + "'"));
  }
  void ExpectEnd() {
    if (!AtEnd()) Fail("expected the end of the tag");
  }

 private:
  std::shared_ptr<Expr> Make(Expr::Kind k, int line) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  ExprP Cond() {
    ExprP a = Or();
    while (IsName("if")) {
      const int line = Next().line;
      auto e = Make(Expr::kCond, line);
      ExprP c = Or();
      ExprP b;
      if (IsName("else")) {
        ++p_;
        b = Cond();
      } else {
        auto u = Make(Expr::kLit, line);  // Jinja: `a if c` is undefined when c is false
        b = u;
      }
      e->args = {a, c, b};
      a = e;
    }
    return a;
  }
  ExprP Or() {
    ExprP a = And();
    while (IsName("or")) {
      auto e = Make(Expr::kOr, Next().line);
      e->args = {a, And()};
      a = e;
    }
    return a;
  }
  ExprP And() {
    ExprP a = Not();
    while (IsName("and")) {
      auto e = Make(Expr::kAnd, Next().line);
      e->args = {a, Not()};
      a = e;
    }
    return a;
  }
  ExprP Not() {
    if (IsName("not")) {
      auto e = Make(Expr::kNot, Next().line);
      e->args = {Not()};
      return e;
    }
    return Compare();
  }
  ExprP Compare() {
    ExprP a = Math1();
    for (;;) {
      std::string op;
      const int line = Peek().line;
      if (Peek().kind == Tok::kOp && (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
                                      Peek().text == ">" || Peek().text == "<=" || Peek().text == ">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        ++p_;
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        p_ += 2;
        op = "not in";
      } else {
        return a;
      }
      auto e = Make(Expr::kBin, line);
      e->name = op;
      e->args = {a, Math1()};
      a = e;
    }
  }
  ExprP Math1() {
    ExprP a = Concat();
    while (IsOp("+") || IsOp("-")) {
      auto e = Make(Expr::kBin, Peek().line);
      e->name = Next().text;
      e->args = {a, Concat()};
      a = e;
    }
    return a;
  }
  ExprP Concat() {
    ExprP a = Math2();
    while (IsOp("~")) {
      auto e = Make(Expr::kBin, Next().line);
      e->name = "~";
      e->args = {a, Math2()};
      a = e;
    }
    return a;
  }
  ExprP Math2() {
    ExprP a = Pow();
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      auto e = Make(Expr::kBin, Peek().line);
      e->name = Next().text;
      e->args = {a, Pow()};
      a = e;
    }
    return a;
  }
  ExprP Pow() {
    ExprP a = Unary(true);
    while (IsOp("**")) {
      auto e = Make(Expr::kBin, Next().line);
      e->name = "**";
      e->args = {a, Unary(true)};
      a = e;
    }
    return a;
  }
  ExprP Unary(bool with_filter) {
    ExprP node;
    if (IsOp("-") || IsOp("+")) {
      auto e = Make(IsOp("-") ? Expr::kNeg : Expr::kPos, Peek().line);
      ++p_;
      e->args = {Unary(false)};
      node = e;
    } else {
      node = Postfix(Primary());
    }
    return with_filter ? FilterExpr(node) : node;
  }
  void CallArgs(Expr& e) {
    Expect("(");
    while (!IsOp(")")) {
      if (Peek().kind == Tok::kName && IsOp("=", 1)) {
        std::string k = Next().text;
        ++p_;
        e.kwargs.emplace_back(std::move(k), Expression());
      } else {
        if (IsOp("*") || IsOp("**")) Fail("*args / **kwargs in calls are not supported");
        e.args.push_back(Expression());
      }
      if (!IsOp(")")) Expect(",");
    }
    ++p_;
  }
  ExprP Primary() {
    const Tok t = Next();
    switch (t.kind) {
      case Tok::kStr: {
        std::string s = t.text;
        while (Peek().kind == Tok::kStr) s += Next().text;  // adjacent literals concatenate, as in Python
        auto e = Make(Expr::kLit, t.line);
        e->lit = Value::Str(std::move(s));
        return e;
      }
      case Tok::kInt: {
        auto e = Make(Expr::kLit, t.line);
        int64_t v = 0;
        auto [q, ec] = std::from_chars(t.text.data(), t.text.data() + t.text.size(), v);
        if (ec != std::errc()) throw ParseError(t.line, "integer literal " + t.text + " out of range");
        e->lit = Value::Int(v);
        return e;
      }
      case Tok::kFloat: {
        auto e = Make(Expr::kLit, t.line);
        e->lit = Value::Float(std::strtod(t.text.c_str(), nullptr));
        return e;
      }
      case Tok::kName: {
        auto e = Make(Expr::kLit, t.line);
        if (t.text == "true" || t.text == "True") e->lit = Value::Bool(true);
        else if (t.text == "false" || t.text == "False") e->lit = Value::Bool(false);
        else if (t.text == "none" || t.text == "None") e->lit = Value::None();
        else {
          e->kind = Expr::kVar;
          e->name = t.text;
        }
        return e;
      }
      case Tok::kOp:
        if (t.text == "(") {
          ExprP inner = Expression();
          if (IsOp(",")) Fail("tuples are not supported");
          Expect(")");
          return inner;
        }
        if (t.text == "[") {
          auto e = Make(Expr::kList, t.line);
          while (!IsOp("]")) {
            e->args.push_back(Expression());
            if (!IsOp("]")) Expect(",");
          }
          ++p_;
          return e;
        }
        if (t.text == "{") {
          auto e = Make(Expr::kDict, t.line);
          while (!IsOp("}")) {
            e->args.push_back(Expression());
            Expect(":");
            e->kwargs.emplace_back("", Expression());
            if (!IsOp("}")) Expect(",");
          }
          ++p_;
          return e;
        }
        --p_;
        Fail("unexpected operator");
      case Tok::kEnd:
        --p_;
        Fail("expected an expression");
    }
    Fail("expected an expression");
  }
  ExprP Postfix(ExprP node) {
    for (;;) {
      if (IsOp(".")) {
        const int line = Next().line;
        auto e = Make(Expr::kAttr, line);
        if (Peek().kind == Tok::kInt) {  // foo.0 is foo[0] in Jinja
          e->kind = Expr::kItem;
          auto idx = Make(Expr::kLit, line);
          idx->lit = Value::Int(std::stoll(Next().text));
          e->args = {node, idx};
        } else {
          e->name = ExpectName();
          e->args = {node};
        }
        node = e;
      } else if (IsOp("[")) {
        const int line = Next().line;
        ExprP parts[3];
        int colons = 0;
        while (!IsOp("]")) {
          if (IsOp(":")) {
            if (++colons > 2) Fail("a slice has at most two ':'");
            ++p_;
            continue;
          }
          if (parts[colons]) Fail("expected ':' or ']'");
          parts[colons] = Expression();
        }
        ++p_;
        auto e = Make(colons ? Expr::kSlice : Expr::kItem, line);
        if (colons) e->args = {node, parts[0], parts[1], parts[2]};
        else {
          if (!parts[0]) Fail("empty subscript");
          e->args = {node, parts[0]};
        }
        node = e;
      } else if (IsOp("(")) {
        auto e = Make(Expr::kCall, Peek().line);
        e->args = {node};
        CallArgs(*e);
        node = e;
      } else {
        return node;
      }
    }
  }
  ExprP FilterExpr(ExprP node) {
    for (;;) {
      if (IsOp("|")) {
        const int line = Next().line;
        auto e = Make(Expr::kFilter, line);
        e->name = ExpectName();
        if (!Contains(kFilters, e->name)) throw ParseError(line, "filter '" + e->name + "' is not supported");
        e->args = {node};
        if (IsOp("(")) CallArgs(*e);
        node = e;
      } else if (IsName("is")) {
        const int line = Next().line;
        auto e = Make(Expr::kTest, line);
        if (IsName("not")) {
          ++p_;
          e->negated = true;
        }
        // `none`, `true`, `false` are names of tests here, not literals.
        e->name = ExpectName();
        if (!Contains(kTests, e->name)) throw ParseError(line, "test '" + e->name + "' is not supported");
        e->args = {node};
        if (IsOp("(")) {
          CallArgs(*e);
        } else if (Peek().kind == Tok::kStr || Peek().kind == Tok::kInt || Peek().kind == Tok::kFloat ||
                   (Peek().kind == Tok::kName && !IsName("and") && !IsName("or") && !IsName("else") &&
                    !IsName("if") && !IsName("in") && !IsName("not") && !IsName("is"))) {
          e->args.push_back(Postfix(Primary()));  // `is divisibleby 3`, `is equalto 'x'`
        }
        node = e;
      } else {
        return node;
      }
    }
  }

  std::vector<Tok> t_;
  size_t p_ = 0;
};

using Node = ChatTemplate::Node;
using NodeP = std::shared_ptr<Node>;


struct RawTag {
  enum Kind { kText, kExpr, kStmt } kind = kText;
  std::string content;
  int line = 1;
};

// Splits the source into text and tags, applying whitespace control as transformers configures Jinja
// (trim_blocks, lstrip_blocks, one trailing newline dropped, newlines normalised to \n), following the rules
// of Jinja's lexer: lstrip applies to a block or comment tag with only spaces before it on its line, where a
// line starts after a newline in the text or after a tag whose own match ended with a newline.
std::vector<RawTag> Split(std::string_view in) {
  std::string src;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '\r') {
      src.push_back('\n');
      if (i + 1 < in.size() && in[i + 1] == '\n') ++i;
    } else {
      src.push_back(in[i]);
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();

  auto newlines = [](std::string_view s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); };
  std::vector<RawTag> out;
  int line = 1;
  size_t i = 0;
  bool line_starting = true;
  for (;;) {
    size_t open = i;
    while (open + 1 < src.size() && !(src[open] == '{' && (src[open + 1] == '{' || src[open + 1] == '%' || src[open + 1] == '#')))
      ++open;
    if (open + 1 >= src.size()) {
      if (i < src.size()) out.push_back({RawTag::kText, src.substr(i), line});
      break;
    }
    std::string text = src.substr(i, open - i);
    const int text_line = line;
    const int tag_line = line + newlines(text);
    const char kind = src[open + 1];
    const char sign = open + 2 < src.size() && (src[open + 2] == '-' || src[open + 2] == '+') ? src[open + 2] : 0;
    if (sign == '-') {
      while (!text.empty() && IsSpace(text.back())) text.pop_back();
    } else if (sign != '+' && kind != '{') {
      const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
      if ((l_pos > 0 || line_starting) && text.size() > l_pos &&
          std::all_of(text.begin() + static_cast<std::ptrdiff_t>(l_pos), text.end(), [](char c) { return IsSpace(c); }))
        text.erase(l_pos);
    }
    if (!text.empty()) out.push_back({RawTag::kText, text, text_line});

    const char* close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    size_t j = open + 2;
    char quote = 0;
    for (; j + 1 < src.size(); ++j) {
      if (kind == '#') {
        if (src.compare(j, 2, close) == 0) break;
        continue;
      }
      if (quote) {
        if (src[j] == '\\') ++j;
        else if (src[j] == quote) quote = 0;
      } else if (src[j] == '\'' || src[j] == '"') {
        quote = src[j];
      } else if (src.compare(j, 2, close) == 0) {
        break;
      }
    }
    if (j + 1 >= src.size()) throw ParseError(tag_line, std::string("unclosed '{") + kind + "' (no '" + close + "')");
    const size_t body_begin = open + 2 + (sign ? 1 : 0);
    size_t body_end = j;
    const char rsign = body_end > body_begin && (src[body_end - 1] == '-' || src[body_end - 1] == '+') ? src[body_end - 1] : 0;
    if (rsign) --body_end;
    const std::string body = src.substr(body_begin, body_end - body_begin);
    if (kind != '#') out.push_back({kind == '{' ? RawTag::kExpr : RawTag::kStmt, body, tag_line});
    line = tag_line + newlines(std::string_view(src).substr(open, j + 2 - open));
    i = j + 2;
    const size_t consumed_from = i;
    if (rsign == '-') {
      while (i < src.size() && IsSpace(src[i])) ++i;
    } else if (rsign != '+' && kind != '{' && i < src.size() && src[i] == '\n') {
      ++i;  // trim_blocks
    }
    line += newlines(std::string_view(src).substr(consumed_from, i - consumed_from));
    line_starting = i > consumed_from && src[i - 1] == '\n';
  }
  return out;
}

const std::vector<std::string> kRefused = {"macro", "call", "filter", "include", "import", "from", "extends", "block",
                                           "raw", "with", "autoescape", "do", "print"};

class StmtParser {
 public:
  explicit StmtParser(std::vector<RawTag> tags) : tags_(std::move(tags)) {}

  NodeP Parse(bool* has_generation) {
    has_generation_ = has_generation;
    auto root = std::make_shared<Node>();
    std::string end = ParseBlock(*root, {});
    if (!end.empty()) throw ParseError(tags_[pos_ - 1].line, "unexpected {% " + end + " %}");
    return root;
  }

 private:
  // Parses children until one of `ends` (returned, with its parser positioned after the keyword), or the end.
  std::string ParseBlock(Node& block, const std::vector<std::string>& ends) {
    while (pos_ < tags_.size()) {
      const RawTag& tag = tags_[pos_++];
      if (tag.kind == RawTag::kText) {
        auto n = std::make_shared<Node>();
        n->kind = Node::kText;
        n->text = tag.content;
        block.body.push_back(n);
        continue;
      }
      ExprParser p(LexExpr(tag.content, tag.line));
      if (tag.kind == RawTag::kExpr) {
        auto n = std::make_shared<Node>();
        n->kind = Node::kOut;
        n->line = tag.line;
        n->expr = p.Expression();
        p.ExpectEnd();
        block.body.push_back(n);
        continue;
      }
      if (p.Peek().kind != Tok::kName) throw ParseError(tag.line, "expected a statement keyword in {% %}");
      const std::string kw = p.Next().text;
      if (Contains(ends, kw)) {
        cur_ = std::make_unique<ExprParser>(std::move(p));
        return kw;
      }
      auto n = std::make_shared<Node>();
      n->line = tag.line;
      if (kw == "if") {
        n->kind = Node::kIf;
        ExprP cond = p.Expression();
        p.ExpectEnd();
        for (;;) {
          auto body = std::make_shared<Node>();
          const std::string e = ParseBlock(*body, {"elif", "else", "endif"});
          n->branches.emplace_back(cond, body);
          if (e.empty()) throw ParseError(tag.line, "{% if %} without {% endif %}");
          if (e == "endif") {
            cur_->ExpectEnd();
            break;
          }
          if (e == "elif") {
            cond = cur_->Expression();
            cur_->ExpectEnd();
            continue;
          }
          cur_->ExpectEnd();
          auto else_body = std::make_shared<Node>();
          const std::string e2 = ParseBlock(*else_body, {"endif"});
          if (e2.empty()) throw ParseError(tag.line, "{% if %} without {% endif %}");
          cur_->ExpectEnd();
          n->branches.emplace_back(nullptr, else_body);
          break;
        }
      } else if (kw == "for") {
        n->kind = Node::kFor;
        n->targets.push_back(p.ExpectName());
        while (p.IsOp(",")) {
          p.Next();
          n->targets.push_back(p.ExpectName());
        }
        if (!p.IsName("in")) p.Fail("expected 'in'");
        p.Next();
        // The iterable stops before a loop filter: Jinja parses it without the conditional expression.
        n->expr = p.ExpressionNoCond();
        if (p.IsName("if")) {
          p.Next();
          n->filter = p.Expression();
        }
        if (p.IsName("recursive")) throw ParseError(tag.line, "{% for ... recursive %} is not supported");
        p.ExpectEnd();
        auto body = std::make_shared<Node>(), else_body = std::make_shared<Node>();
        const std::string e = ParseBlock(*body, {"else", "endfor"});
        if (e.empty()) throw ParseError(tag.line, "{% for %} without {% endfor %}");
        cur_->ExpectEnd();
        if (e == "else") {
          if (ParseBlock(*else_body, {"endfor"}).empty()) throw ParseError(tag.line, "{% for %} without {% endfor %}");
          cur_->ExpectEnd();
        }
        n->body = {body, else_body};
      } else if (kw == "set") {
        n->kind = Node::kSet;
        n->targets.push_back(p.ExpectName());
        if (p.IsOp(".")) {
          p.Next();
          n->targets.push_back(p.ExpectName());
        }
        if (p.IsOp(",")) throw ParseError(tag.line, "{% set a, b = ... %} (tuple assignment) is not supported");
        if (!p.IsOp("=")) throw ParseError(tag.line, "{% set NAME %}...{% endset %} (block assignment) is not supported");
        p.Next();
        n->expr = p.Expression();
        p.ExpectEnd();
      } else if (kw == "generation") {
        n->kind = Node::kGeneration;
        p.ExpectEnd();
        if (has_generation_) *has_generation_ = true;
        auto body = std::make_shared<Node>();
        if (ParseBlock(*body, {"endgeneration"}).empty())
          throw ParseError(tag.line, "{% generation %} without {% endgeneration %}");
        cur_->ExpectEnd();
        n->body = {body};
      } else if (kw == "break" || kw == "continue") {
        n->kind = kw == "break" ? Node::kBreak : Node::kContinue;
        p.ExpectEnd();
      } else if (Contains(kRefused, kw)) {
        throw ParseError(tag.line, "{% " + kw + " %} is not supported by btx's template engine");
      } else {
        throw ParseError(tag.line, "unknown statement {% " + kw + " %}");
      }
      block.body.push_back(n);
    }
    return "";
  }

  std::vector<RawTag> tags_;
  size_t pos_ = 0;
  std::unique_ptr<ExprParser> cur_;
  bool* has_generation_ = nullptr;
};

}  // namespace

std::shared_ptr<ChatTemplate::Node> ParseTemplate(std::string_view source, bool* has_generation) {
  StmtParser p(Split(source));
  return p.Parse(has_generation);
}

}  // namespace btx::model::chat_internal
