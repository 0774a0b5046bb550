// See hf_tokenizer.h. The pipeline mirrors tokenizers' Rust code (tokenizer/added_vocabulary.rs,
// pre_tokenizers/{split,byte_level,digits}.rs, models/bpe/{model,word}.rs) step for step, including its quirks,
// because the goal is identical ids rather than a "clean" BPE.
#include "hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <shared_mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace btx::model {

namespace hf_internal {
namespace {
std::atomic<size_t> g_bpe_scan_max{64};
}  // namespace
void SetBpeScanMaxForTesting(size_t max_symbols) { g_bpe_scan_max.store(max_symbols); }
}  // namespace hf_internal

namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------------------------
// UTF-8

struct Utf8Step {
  size_t len;  // bytes consumed: the character, or the maximal invalid subpart
  bool ok;
  uint32_t cp;
};

// Unicode's "maximal subpart" rule (Python's and Rust's): a lead byte and the continuation bytes that are still
// valid for it form one unit; the first byte that cannot continue it starts the next unit.
inline Utf8Step NextUtf8(const unsigned char* p, size_t n) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return {1, true, b0};
  size_t need;
  uint32_t cp;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {1, false, 0};
  }
  for (size_t k = 1; k <= need; ++k) {
    if (k >= n) return {k, false, 0};
    const unsigned char b = p[k];
    if (b < lo || b > hi) return {k, false, 0};
    lo = 0x80;
    hi = 0xBF;
    cp = (cp << 6) | (b & 0x3F);
  }
  return {need + 1, true, cp};
}

bool IsValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // Eight ASCII bytes at a time: most text is mostly ASCII.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step st = NextUtf8(p + i, n - i);
    if (!st.ok) return false;
    i += st.len;
  }
  return true;
}

void AppendUtf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The code point that ends just before `end` (s must be valid UTF-8 up to there).
uint32_t LastCodePoint(std::string_view s, size_t end, size_t* start_out) {
  size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  *start_out = b;
  return NextUtf8(reinterpret_cast<const unsigned char*>(s.data()) + b, end - b).cp;
}

// Rust's char::is_whitespace and regex's \s: the White_Space property (stable since Unicode 6.3).
constexpr bool IsWhiteSpace(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
// The same set as a PCRE2 class body, for Oniguruma's \s.
constexpr const char* kWhiteSpaceClass =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}"
    "\\x{3000}";
// Oniguruma's \w (checked against tokenizers: it takes Ⓐ, ², U+0345, ‿ but not ZWJ/ZWNJ).
constexpr const char* kOnigWordClass = "\\p{Alphabetic}\\p{M}\\p{N}\\p{Pc}";
// Rust regex's \w, which tokenizers uses for single_word added tokens.
constexpr const char* kRustWordClass = "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]";

// ---------------------------------------------------------------------------------------------------------------
// PCRE2

struct ThreadPcre {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mc = nullptr;
  pcre2_jit_stack* js = nullptr;
  ThreadPcre() {
    md = pcre2_match_data_create(1, nullptr);
    mc = pcre2_match_context_create(nullptr);
    // The default 32 KiB JIT stack is too small for long whitespace runs under backtracking alternatives.
    js = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
    if (mc == nullptr || md == nullptr) throw std::bad_alloc();
    if (js != nullptr) pcre2_jit_stack_assign(mc, nullptr, js);
    // Oniguruma stops after 10M backtracks; PCRE2's defaults are lower for the interpreter's heap, so lift them
    // rather than fail where tokenizers succeeds.
    pcre2_set_match_limit(mc, std::numeric_limits<uint32_t>::max());
    pcre2_set_heap_limit(mc, 1u << 22);  // KiB: 4 GiB
  }
  ~ThreadPcre() {
    pcre2_match_data_free(md);
    pcre2_match_context_free(mc);
    if (js != nullptr) pcre2_jit_stack_free(js);
  }
  ThreadPcre(const ThreadPcre&) = delete;
  ThreadPcre& operator=(const ThreadPcre&) = delete;
};

ThreadPcre& Tls() {
  thread_local ThreadPcre t;
  return t;
}

class Regex {
 public:
  // `origin`: the pattern as tokenizer.json gives it, for error messages.
  static StatusOr<std::shared_ptr<Regex>> Compile(const std::string& pcre_pattern, const std::string& field,
                                                  const std::string& origin = "") {
    pcre2_compile_context* cc = pcre2_compile_context_create(nullptr);
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);  // Oniguruma's '.', '^', '$' know only \n
    int err = 0;
    PCRE2_SIZE off = 0;
    // MULTILINE: in Oniguruma's Ruby syntax '^' and '$' always match at line boundaries.
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pcre_pattern.data()), pcre_pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &off, cc);
    pcre2_compile_context_free(cc);
    if (code == nullptr) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      return InvalidArgument(field + ": PCRE2 cannot compile " + json(pcre_pattern).dump() + " (translated from " +
                             json(origin.empty() ? pcre_pattern : origin).dump() +
                             "): " + reinterpret_cast<const char*>(buf) + " at offset " + std::to_string(off));
    }
    auto r = std::shared_ptr<Regex>(new Regex(code));
    r->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return r;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Leftmost match at or after `start` in `s` (lookbehinds see s before start, as Oniguruma's search does).
  bool Search(std::string_view s, size_t start, size_t* ms, size_t* me) const {
    ThreadPcre& t = Tls();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    int rc;
    if (jit_) {
      rc = pcre2_jit_match(code_, subject, s.size(), start, 0, t.md, t.mc);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, t.md, t.mc);
      }
    } else {
      rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, t.md, t.mc);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) {
      // Only resource exhaustion gets here; tokenizing the rest differently would be silent corruption.
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(rc, buf, sizeof(buf));
      throw std::runtime_error(std::string("HfTokenizer: regex match failed: ") + reinterpret_cast<const char*>(buf));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(t.md);
    *ms = ov[0];
    *me = ov[1];
    return true;
  }

  // Oniguruma's find_iter as the Rust `onig` crate drives it: an empty match right after the previous match is
  // skipped by advancing one character.
  template <typename F>
  void FindIter(std::string_view s, F&& on_match) const {
    const size_t n = s.size();
    size_t pos = 0;
    bool have_last = false;
    size_t last_end = 0;
    while (pos <= n) {
      size_t ms, me;
      if (!Search(s, pos, &ms, &me)) return;
      if (ms == me && have_last && me == last_end) {
        if (pos >= n) return;
        pos += NextUtf8(reinterpret_cast<const unsigned char*>(s.data()) + pos, n - pos).len;
        continue;
      }
      on_match(ms, me);
      have_last = true;
      last_end = me;
      pos = me;
    }
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
  bool jit_ = false;
};

// Rewrites an Oniguruma (Ruby syntax, as tokenizers compiles it) pattern into PCRE2 with the same meaning, and
// refuses constructs whose meaning differs and that are not worth translating.
StatusOr<std::string> TranslateOnigPattern(std::string_view p, const std::string& field) {
  auto refuse = [&](const std::string& what) {
    return InvalidArgument(field + ": pattern " + json(std::string(p)).dump() + " uses " + what +
                           ", whose Oniguruma meaning is not reproduced with PCRE2; not supported");
  };
  static const char* const kCategories[] = {"L",  "Lu", "Ll", "Lt", "Lm", "Lo", "M",  "Mn", "Mc", "Me", "N",  "Nd",
                                            "Nl", "No", "P",  "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S",  "Sm",
                                            "Sc", "Sk", "So", "Z",  "Zs", "Zl", "Zp", "C",  "Cc", "Cf", "Co", "Cn"};
  std::string out;
  out.reserve(p.size() * 2);
  bool in_class = false;
  size_t class_body_start = 0;  // index in p of the first character of the class body
  const size_t n = p.size();
  for (size_t i = 0; i < n; ++i) {
    const char c = p[i];
    if (c == '\\') {
      if (i + 1 >= n) return InvalidArgument(field + ": pattern ends with a backslash");
      const char e = p[++i];
      switch (e) {
        case 's':
          out += in_class ? std::string(kWhiteSpaceClass) : "[" + std::string(kWhiteSpaceClass) + "]";
          break;
        case 'S':
          if (in_class) return refuse("\\S inside a character class");
          out += "[^" + std::string(kWhiteSpaceClass) + "]";
          break;
        case 'w':
          out += in_class ? std::string(kOnigWordClass) : "[" + std::string(kOnigWordClass) + "]";
          break;
        case 'W':
          if (in_class) return refuse("\\W inside a character class");
          out += "[^" + std::string(kOnigWordClass) + "]";
          break;
        case 'h':  // Oniguruma: a hexadecimal digit; PCRE2: horizontal space
          out += in_class ? "0-9A-Fa-f" : "[0-9A-Fa-f]";
          break;
        case 'H':
          if (in_class) return refuse("\\H inside a character class");
          out += "[^0-9A-Fa-f]";
          break;
        case 'v':  // Oniguruma: vertical tab only
          out += "\\x{0B}";
          break;
        case 'u': {  // \uHHHH (PCRE2 only knows \x{...})
          if (i + 4 >= n) return refuse("a truncated \\u escape");
          const std::string hex(p.substr(i + 1, 4));
          if (hex.size() != 4 || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
            return refuse("a malformed \\u escape");
          }
          out += "\\x{" + hex + "}";
          i += 4;
          break;
        }
        case 'p':
        case 'P': {
          std::string name;
          if (i + 1 < n && p[i + 1] == '{') {
            const size_t close = p.find('}', i + 2);
            if (close == std::string_view::npos) return refuse("an unterminated \\p{");
            name = std::string(p.substr(i + 2, close - i - 2));
            i = close;
          } else if (i + 1 < n) {
            name = std::string(1, p[++i]);
          } else {
            return refuse("a bare \\p");
          }
          bool neg = false;
          std::string base = name;
          if (!base.empty() && base[0] == '^') {
            neg = true;
            base = base.substr(1);
          }
          const bool category =
              std::find_if(std::begin(kCategories), std::end(kCategories),
                           [&](const char* k) { return base == k; }) != std::end(kCategories);
          const bool script_like = !base.empty() && std::isupper(static_cast<unsigned char>(base[0])) &&
                                   base.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_") ==
                                       std::string::npos;
          if (!category && !script_like) return refuse("the property \\p{" + name + "}");
          out += '\\';
          out += e;
          out += '{';
          if (neg) out += '^';
          // Scripts: PCRE2's \p{Han} also takes Script_Extensions, Oniguruma's does not. Anything that is not a
          // script (e.g. Alphabetic, which Oniguruma knows) then fails to compile and is refused.
          if (!category) out += "sc:";
          out += base;
          out += '}';
          break;
        }
        case 'b':
          if (in_class) {
            out += "\\x{08}";
            break;
          }
          return refuse("\\b");
        case 'B':
        case 'R':
        case 'X':
        case 'K':
        case 'N':
        case 'O':
        case 'y':
        case 'Y':
        case 'G':
        case 'g':
          return refuse(std::string("\\") + e);
        default:
          out += '\\';
          out += e;
          break;
      }
      continue;
    }
    if (in_class) {
      if (c == '[') {
        if (i + 1 < n && p[i + 1] == ':') return refuse("a POSIX bracket class");
        return refuse("a nested character class");
      }
      if (c == '&' && i + 1 < n && p[i + 1] == '&') return refuse("class intersection (&&)");
      if (c == ']' && i != class_body_start) in_class = false;
      out += c;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < n && p[i + 1] == '^') out += p[++i];
      class_body_start = i + 1;
      continue;
    }
    if (c == '(' && i + 1 < n && p[i + 1] == '?') {
      out += "(?";
      ++i;
      if (i + 1 >= n) return refuse("a truncated group");
      const char g = p[i + 1];
      if (g == ':' || g == '=' || g == '!' || g == '>') continue;
      if (g == '<' || g == '\'') continue;  // lookbehind or named group: same syntax
      if (g == '#') return refuse("a (?#...) comment");
      // Inline options: only i and m (Ruby's m is PCRE2's s).
      size_t k = i + 1;
      std::string opts;
      while (k < n && p[k] != ':' && p[k] != ')') {
        const char o = p[k];
        if (o == 'i' || o == '-') {
          opts += o;
        } else if (o == 'm') {
          opts += 's';
        } else {
          return refuse(std::string("the inline option (?") + o);
        }
        ++k;
      }
      if (k >= n) return refuse("a truncated group");
      out += opts;
      i = k - 1;
      continue;
    }
    if (c == '{') {
      // Oniguruma reads {,n} as {0,n}; PCRE2 10.42 as a literal.
      size_t k = i + 1;
      while (k < n && (std::isdigit(static_cast<unsigned char>(p[k])) || p[k] == ',')) ++k;
      if (k < n && p[k] == '}' && k > i + 1) {
        std::string body(p.substr(i + 1, k - i - 1));
        if (std::count(body.begin(), body.end(), ',') <= 1) {
          if (body[0] == ',') {
            if (body.size() == 1) return refuse("the quantifier {,}");
            body = "0" + body;
          }
          if (k + 1 < n && p[k + 1] == '+') return refuse("a quantifier {n,m}+ (possessive in PCRE2 only)");
          out += '{';
          out += body;
          out += '}';
          i = k;
          continue;
        }
      }
      out += c;
      continue;
    }
    out += c;
  }
  if (in_class) return refuse("an unterminated character class");
  return out;
}

// A literal for PCRE2: tokenizers' Split(String) is regex::escape(s) compiled by Oniguruma, i.e. the literal text.
std::string EscapeLiteral(std::string_view s) {
  std::string out;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u)) out += '\\';
    out += c;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// NFC

// Runs of non-ASCII text (with the ASCII character before them, which may compose with what follows) are normalized
// separately: a boundary before an ASCII character is always a normalization boundary. Runs whose code points are
// all below U+0300 are already NFC.
std::string Nfc(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  const size_t n = s.size();
  size_t pos = 0;
  while (pos < n) {
    size_t j = pos;
    while (j < n && static_cast<unsigned char>(s[j]) < 0x80) ++j;
    if (j == n) {
      out.append(s.substr(pos));
      break;
    }
    const size_t start = j > pos ? j - 1 : j;
    out.append(s.substr(pos, start - pos));
    size_t e = j;
    bool maybe = false;
    while (e < n && static_cast<unsigned char>(s[e]) >= 0x80) {
      maybe |= static_cast<unsigned char>(s[e]) >= 0xCC;  // a lead byte of U+0300 or above
      ++e;
    }
    const std::string_view run = s.substr(start, e - start);
    if (!maybe) {
      out.append(run);
    } else {
      utf8proc_uint8_t* dst = nullptr;
      const utf8proc_ssize_t len =
          utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(run.data()), static_cast<utf8proc_ssize_t>(run.size()),
                       &dst, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
      if (len < 0) {
        throw std::runtime_error(std::string("HfTokenizer: utf8proc NFC failed: ") + utf8proc_errmsg(len));
      }
      out.append(reinterpret_cast<const char*>(dst), static_cast<size_t>(len));
      std::free(dst);
    }
    pos = e;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Byte-level alphabet (GPT-2's bytes_to_unicode)

std::array<uint32_t, 256> ByteToChar() {
  std::array<uint32_t, 256> m{};
  std::array<bool, 256> direct{};
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) m[b] = direct[b] ? static_cast<uint32_t>(b) : next++;
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Containers

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StrMap = std::unordered_map<std::string, int32_t, SvHash, std::equal_to<>>;

// (left id, right id) -> (rank, merged id), open addressing: the inner loop of BPE is this lookup.
class MergeTable {
 public:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  void Reserve(size_t n) {
    size_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, 0);
    mask_ = cap - 1;
    shift_ = 64 - static_cast<int>(__builtin_ctzll(cap));
  }
  void Put(uint32_t a, uint32_t b, uint32_t rank, uint32_t id) {  // a later duplicate wins, as in a Rust HashMap
    const uint64_t key = (uint64_t{a} << 32) | b;
    size_t i = Slot(key);
    while (keys_[i] != kEmpty && keys_[i] != key) i = (i + 1) & mask_;
    keys_[i] = key;
    vals_[i] = (uint64_t{rank} << 32) | id;
  }
  bool Get(uint32_t a, uint32_t b, uint32_t* rank, uint32_t* id) const {
    const uint64_t key = (uint64_t{a} << 32) | b;
    size_t i = Slot(key);
    while (true) {
      const uint64_t k = keys_[i];
      if (k == key) {
        *rank = static_cast<uint32_t>(vals_[i] >> 32);
        *id = static_cast<uint32_t>(vals_[i]);
        return true;
      }
      if (k == kEmpty) return false;
      i = (i + 1) & mask_;
    }
  }

 private:
  size_t Slot(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_) & mask_; }
  std::vector<uint64_t> keys_, vals_;
  size_t mask_ = 0;
  int shift_ = 60;
};

// Finished words by their raw bytes, shared by every thread: sharded so that readers rarely meet.
class WordCache {
 public:
  static constexpr size_t kMaxWordBytes = 64;
  static constexpr size_t kShards = 16;
  static constexpr size_t kPerShard = 8192;
  bool Get(std::string_view w, size_t h, std::vector<int32_t>& out) const {
    const Shard& s = shards_[h % kShards];
    std::shared_lock lock(s.mu);
    auto it = s.map.find(w);
    if (it == s.map.end()) return false;
    out.insert(out.end(), it->second.begin(), it->second.end());
    return true;
  }
  void Put(std::string_view w, size_t h, const int32_t* ids, size_t n) {
    Shard& s = shards_[h % kShards];
    std::unique_lock lock(s.mu);
    if (s.map.size() >= kPerShard) return;  // like tokenizers' cache: full means no more entries
    s.map.try_emplace(std::string(w), ids, ids + n);
  }

 private:
  struct Shard {
    mutable std::shared_mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>, SvHash, std::equal_to<>> map;
  };
  std::array<Shard, kShards> shards_;
};

// Byte trie of added-token contents, matched leftmost-longest as tokenizers' aho-corasick (MatchKind::LeftmostLongest).
class Trie {
 public:
  Trie() { root_.fill(-1); }
  bool empty() const { return nodes_.empty(); }
  void Add(std::string_view s, int32_t value) {
    if (s.empty()) return;
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    int32_t node = root_[p[0]];
    if (node < 0) {
      node = NewNode();
      root_[p[0]] = node;
    }
    for (size_t i = 1; i < s.size(); ++i) {
      const uint64_t key = Key(node, p[i]);
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        const int32_t child = NewNode();
        edges_.emplace(key, child);
        node = child;
      } else {
        node = it->second;
      }
    }
    if (nodes_[node] < 0) nodes_[node] = value;  // the first pattern wins among equal ones
  }
  // Leftmost-longest match at or after `from`: (start, end, value).
  bool Find(std::string_view s, size_t from, size_t* ms, size_t* me, int32_t* value) const {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const size_t n = s.size();
    for (size_t i = from; i < n; ++i) {
      int32_t node = root_[p[i]];
      if (node < 0) continue;
      int32_t best = nodes_[node];
      size_t best_end = i + 1;
      for (size_t j = i + 1; j < n; ++j) {
        auto it = edges_.find(Key(node, p[j]));
        if (it == edges_.end()) break;
        node = it->second;
        if (nodes_[node] >= 0) {
          best = nodes_[node];
          best_end = j + 1;
        }
      }
      if (best >= 0) {
        *ms = i;
        *me = best_end;
        *value = best;
        return true;
      }
    }
    return false;
  }

 private:
  static uint64_t Key(int32_t node, unsigned char b) { return (static_cast<uint64_t>(node) << 8) | b; }
  int32_t NewNode() {
    nodes_.push_back(-1);
    return static_cast<int32_t>(nodes_.size() - 1);
  }
  std::array<int32_t, 256> root_;
  std::vector<int32_t> nodes_;  // value at each node, -1 if no pattern ends there
  std::unordered_map<uint64_t, int32_t> edges_;
};

// ---------------------------------------------------------------------------------------------------------------
// JSON helpers

std::string Dump(const json& v) {
  std::string s = v.dump();
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

Status GetBool(const json& obj, const char* key, const std::string& path, bool dflt, bool* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    *out = dflt;
    return Status::Ok();
  }
  if (!it->is_boolean()) return InvalidArgument(path + "." + key + " is " + Dump(*it) + ", expected true or false");
  *out = it->get<bool>();
  return Status::Ok();
}

Status RequireBool(const json& obj, const char* key, const std::string& path, bool* out) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_boolean()) {
    return InvalidArgument(path + "." + key + (it == obj.end() ? " is missing" : " is " + Dump(*it)) +
                           ", expected true or false");
  }
  *out = it->get<bool>();
  return Status::Ok();
}

std::string TypeOf(const json& obj) {
  auto it = obj.find("type");
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
}

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct Step {
  enum Kind { kSplit, kByteLevel } kind = kSplit;
  std::shared_ptr<Regex> regex;  // kSplit: the pattern; kByteLevel: GPT-2's, when use_regex
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
};

struct AddedToken {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  bool operator==(const AddedToken& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip && rstrip == o.rstrip &&
           normalized == o.normalized && special == o.special;
  }
};

struct Span {
  size_t start, end;
  bool flag;  // is_match before the behavior; "remove" after it
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

struct HfTokenizer::Impl {
  // Model
  StrMap vocab;                        // token (byte-level form) -> id
  StrMap raw_vocab;                    // ignore_merges: the raw bytes a token stands for -> id
  std::vector<std::string> id_token;   // vocab id -> token
  std::vector<uint8_t> id_in_vocab;
  MergeTable merges;
  std::array<int32_t, 256> byte_id{};  // id of each byte's character, -1 if the vocab lacks it
  int32_t unk_id = -1;
  bool fuse_unk = false;
  bool ignore_merges = false;
  // Added tokens
  std::unordered_map<std::string, int32_t> added_map;  // content -> id
  std::unordered_map<int32_t, AddedToken> added_by_id;
  Trie raw_trie, normalized_trie;  // values: added token ids
  std::shared_ptr<Regex> rust_word;  // for single_word
  // Pipeline
  bool nfc = false;
  std::vector<Step> steps;
  bool byte_level_decoder = true;
  // Decode: the bytes each id decodes to (the byte-level decoder's mapping, or the token's own UTF-8).
  std::vector<std::string> id_bytes;
  std::vector<uint8_t> id_known;
  int64_t size = 0;
  mutable WordCache cache;

  void EncodeInto(std::string_view text, std::vector<int32_t>& out) const;
  template <typename F>
  void SplitAdded(std::string_view s, const Trie& trie, F&& emit) const;
  void PreTokenize(std::string_view piece, size_t step, std::vector<int32_t>& out) const;
  void Bpe(std::string_view word, std::vector<int32_t>& out) const;
  void MergeScan(std::vector<int32_t>& syms) const;
  void MergeHeap(std::vector<int32_t>& syms) const;
  bool IsRustWordChar(std::string_view s, size_t at) const;
};

namespace {

// Per-thread scratch for Encode: one set of vectors per pre-tokenizer step, reused across calls.
struct EncodeScratch {
  std::vector<std::vector<Span>> matches, splits;
  std::vector<std::string> prefixed;
  std::vector<int32_t> syms;
};
EncodeScratch& Scratch() {
  thread_local EncodeScratch s;
  return s;
}

void ApplyBehavior(Behavior b, const std::vector<Span>& m, std::vector<Span>& out) {
  out.clear();
  switch (b) {
    case Behavior::kIsolated:
      for (const Span& s : m) out.push_back({s.start, s.end, false});
      break;
    case Behavior::kRemoved:
      out = m;
      break;
    case Behavior::kContiguous: {
      bool prev = false;
      for (const Span& s : m) {
        if (s.flag == prev && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.start, s.end, false});
        }
        prev = s.flag;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool prev = false;
      for (const Span& s : m) {
        if (s.flag && !prev && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.start, s.end, false});
        }
        prev = s.flag;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool prev = false;
      for (size_t k = m.size(); k-- > 0;) {
        const Span& s = m[k];
        if (s.flag && !prev && !out.empty()) {
          out.back().start = s.start;
        } else {
          out.push_back({s.start, s.end, false});
        }
        prev = s.flag;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
}

}  // namespace

bool HfTokenizer::Impl::IsRustWordChar(std::string_view s, size_t at) const {
  const auto c = static_cast<unsigned char>(s[at]);
  if (c < 0x80) return std::isalnum(c) || c == '_';
  const size_t len = NextUtf8(reinterpret_cast<const unsigned char*>(s.data()) + at, s.size() - at).len;
  size_t ms, me;
  // The subject ends after the character, so the class can only match that character.
  return rust_word->Search(s.substr(0, at + len), at, &ms, &me);
}

template <typename F>
void HfTokenizer::Impl::SplitAdded(std::string_view s, const Trie& trie, F&& emit) const {
  if (trie.empty()) {
    emit(s, -1);
    return;
  }
  // tokenizers' AddedVocabulary::find_matches, literally (including how lstrip/rstrip move the cut points).
  const size_t n = s.size();
  size_t start_offset = 0, pos = 0;
  size_t ms, me;
  int32_t id;
  while (pos < n && trie.Find(s, pos, &ms, &me, &id)) {
    pos = me;
    const AddedToken& tok = added_by_id.at(id);
    size_t start = ms, stop = me;
    if (tok.single_word) {
      size_t cs;
      bool start_space = start == 0;
      if (!start_space) {
        LastCodePoint(s, start, &cs);
        start_space = !IsRustWordChar(s, cs);
      }
      const bool stop_space = stop == n || !IsRustWordChar(s, stop);
      if (!stop_space || !start_space) continue;
    }
    if (tok.lstrip) {
      size_t newstart = start;
      while (newstart > 0) {
        size_t cs;
        if (!IsWhiteSpace(LastCodePoint(s, newstart, &cs))) break;
        newstart = cs;
      }
      start = std::max(newstart, start_offset);
    }
    if (tok.rstrip) {
      while (stop < n) {
        const Utf8Step st = NextUtf8(reinterpret_cast<const unsigned char*>(s.data()) + stop, n - stop);
        if (!IsWhiteSpace(st.cp)) break;
        stop += st.len;
      }
    }
    if (start_offset < start) emit(s.substr(start_offset, start - start_offset), -1);
    emit(std::string_view(), id);
    start_offset = stop;
  }
  if (start_offset < n) emit(s.substr(start_offset), -1);
}

void HfTokenizer::Impl::EncodeInto(std::string_view text, std::vector<int32_t>& out) const {
  SplitAdded(text, raw_trie, [&](std::string_view piece, int32_t id) {
    if (id >= 0) {
      out.push_back(id);
      return;
    }
    if (piece.empty()) return;
    std::string normalized;
    if (nfc) {
      normalized = Nfc(piece);
      piece = normalized;
    }
    SplitAdded(piece, normalized_trie, [&](std::string_view p, int32_t id2) {
      if (id2 >= 0) {
        out.push_back(id2);
      } else if (!p.empty()) {
        PreTokenize(p, 0, out);
      }
    });
  });
}

void HfTokenizer::Impl::PreTokenize(std::string_view piece, size_t step, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  const Step& st = steps[step];
  EncodeScratch& sc = Scratch();
  if (st.kind == Step::kByteLevel) {
    // Always the last step (Load checks): its output goes to the model.
    std::string_view p = piece;
    if (st.add_prefix_space && piece[0] != ' ') {
      std::string& buf = sc.prefixed[step];
      buf.assign(1, ' ');
      buf.append(piece);
      p = buf;
    }
    if (st.regex == nullptr) {
      Bpe(p, out);
      return;
    }
    size_t prev = 0;
    st.regex->FindIter(p, [&](size_t ms, size_t me) {
      if (prev < ms) Bpe(p.substr(prev, ms - prev), out);
      if (ms < me) Bpe(p.substr(ms, me - ms), out);
      prev = me;
    });
    if (prev < p.size()) Bpe(p.substr(prev), out);
    return;
  }
  // Split (Digits is a Split on \p{N}). tokenizers' Pattern::find_matches: matches and the gaps between them.
  std::vector<Span>& m = sc.matches[step];
  m.clear();
  size_t prev = 0;
  st.regex->FindIter(piece, [&](size_t ms, size_t me) {
    if (prev != ms) m.push_back({prev, ms, st.invert});
    m.push_back({ms, me, !st.invert});
    prev = me;
  });
  if (prev != piece.size()) m.push_back({prev, piece.size(), st.invert});
  std::vector<Span>& splits = sc.splits[step];
  ApplyBehavior(st.behavior, m, splits);
  for (const Span& s : splits) {
    if (s.flag || s.end <= s.start) continue;
    PreTokenize(piece.substr(s.start, s.end - s.start), step + 1, out);
  }
}

void HfTokenizer::Impl::Bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    auto it = raw_vocab.find(word);
    if (it != raw_vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= WordCache::kMaxWordBytes;
  size_t h = 0;
  if (cacheable) {
    h = SvHash{}(word);
    if (cache.Get(word, h, out)) return;
  }
  // tokenizers' BPE::merge_word: one symbol per byte-level character; characters missing from the vocab become the
  // unknown token (fused if fuse_unk) or vanish when there is none.
  std::vector<int32_t>& syms = Scratch().syms;
  syms.clear();
  bool pending_unk = false;
  for (unsigned char b : word) {
    const int32_t id = byte_id[b];
    if (id >= 0) {
      if (pending_unk) {
        syms.push_back(unk_id);
        pending_unk = false;
      }
      syms.push_back(id);
    } else if (unk_id >= 0) {
      if (pending_unk && !fuse_unk) syms.push_back(unk_id);
      pending_unk = true;
    }
  }
  if (pending_unk) syms.push_back(unk_id);
  if (syms.size() <= hf_internal::g_bpe_scan_max.load(std::memory_order_relaxed)) {
    MergeScan(syms);
  } else {
    MergeHeap(syms);
  }
  out.insert(out.end(), syms.begin(), syms.end());
  if (cacheable) cache.Put(word, h, syms.data(), syms.size());
}

// Repeatedly merges the lowest-ranked adjacent pair, leftmost first: what tokenizers' heap (ordered by rank, then
// position) does, in a form that is faster for the short words that make up most text.
void HfTokenizer::Impl::MergeScan(std::vector<int32_t>& syms) const {
  size_t n = syms.size();
  if (n < 2) return;
  constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
  std::vector<uint32_t> rank_v, new_v;
  uint32_t rank_a[64], new_a[64];
  uint32_t* rank = rank_a;
  uint32_t* nid = new_a;
  if (n > 64) {
    rank_v.resize(n);
    new_v.resize(n);
    rank = rank_v.data();
    nid = new_v.data();
  }
  auto pair = [&](size_t i) {
    uint32_t r, id;
    if (merges.Get(static_cast<uint32_t>(syms[i]), static_cast<uint32_t>(syms[i + 1]), &r, &id)) {
      rank[i] = r;
      nid[i] = id;
    } else {
      rank[i] = kNone;
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) pair(i);
  while (n > 1) {
    uint32_t best = kNone;
    size_t at = 0;
    for (size_t i = 0; i + 1 < n; ++i) {
      if (rank[i] < best) {
        best = rank[i];
        at = i;
      }
    }
    if (best == kNone) break;
    syms[at] = static_cast<int32_t>(nid[at]);
    for (size_t i = at + 1; i + 1 < n; ++i) {
      syms[i] = syms[i + 1];
      rank[i] = rank[i + 1];
      nid[i] = nid[i + 1];
    }
    --n;
    if (at > 0) pair(at - 1);
    if (at + 1 < n) pair(at);
  }
  syms.resize(n);
}

// tokenizers' Word::merge_all without dropout, for long words where the scan would be quadratic. Queue entries are
// rank << 32 | position, so the smallest is tokenizers' next merge. An entry is stale when the pair now at its
// position has another rank: tokenizers compares the merged id instead, which is the same test, since the left
// symbol at a position only ever grows and so never re-forms the same merged token from a different pair.
void HfTokenizer::Impl::MergeHeap(std::vector<int32_t>& syms) const {
  const size_t n = syms.size();
  if (n < 2) return;
  // Positions share a 64-bit queue entry with the rank.
  if (n > 0x7fffffffu) throw std::length_error("HfTokenizer: a pre-token of 2^31 bytes or more");
  std::vector<int32_t> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  std::vector<uint64_t> heap;
  heap.reserve(n);
  auto push = [&](size_t pos) {
    uint32_t r, id;
    if (merges.Get(static_cast<uint32_t>(syms[pos]), static_cast<uint32_t>(syms[static_cast<size_t>(next[pos])]), &r,
                   &id)) {
      heap.push_back((uint64_t{r} << 32) | pos);
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) push(i);
  std::vector<uint8_t> dead(n, 0);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const uint64_t top = heap.back();
    heap.pop_back();
    const auto pos = static_cast<size_t>(top & 0xffffffffu);
    const auto rank = static_cast<uint32_t>(top >> 32);
    if (dead[pos] || next[pos] < 0) continue;
    const auto right = static_cast<size_t>(next[pos]);
    uint32_t r, id;
    if (!merges.Get(static_cast<uint32_t>(syms[pos]), static_cast<uint32_t>(syms[right]), &r, &id) || r != rank) {
      continue;
    }
    syms[pos] = static_cast<int32_t>(id);
    dead[right] = 1;
    next[pos] = next[right];
    if (next[pos] >= 0) prev[static_cast<size_t>(next[pos])] = static_cast<int32_t>(pos);
    if (prev[pos] >= 0) push(static_cast<size_t>(prev[pos]));
    if (next[pos] >= 0) push(pos);
  }
  size_t k = 0;
  for (int32_t i = 0; i >= 0; i = next[static_cast<size_t>(i)]) syms[k++] = syms[static_cast<size_t>(i)];
  syms.resize(k);
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

namespace {

Status ParseNormalizer(const json& j, const std::string& path, bool* nfc) {
  if (j.is_null()) return Status::Ok();
  if (!j.is_object()) return InvalidArgument(path + " is " + Dump(j) + ", expected an object or null");
  const std::string type = TypeOf(j);
  if (type == "NFC") {
    *nfc = true;  // idempotent, so a Sequence of several is one
    return Status::Ok();
  }
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) return InvalidArgument(path + ".normalizers is missing or not a list");
    for (size_t i = 0; i < it->size(); ++i) {
      BTX_RETURN_IF_ERROR(ParseNormalizer((*it)[i], path + ".normalizers[" + std::to_string(i) + "]", nfc));
    }
    return Status::Ok();
  }
  return InvalidArgument(path + ".type is " + Dump(j.value("type", json())) +
                         "; only NFC (or a Sequence of NFC) normalizers are supported");
}

Status ParsePreTokenizer(const json& j, const std::string& path, std::vector<Step>* steps) {
  if (!j.is_object()) return InvalidArgument(path + " is " + Dump(j) + ", expected an object");
  const std::string type = TypeOf(j);
  if (type == "Sequence") {
    auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array()) return InvalidArgument(path + ".pretokenizers is missing or not a list");
    for (size_t i = 0; i < it->size(); ++i) {
      BTX_RETURN_IF_ERROR(ParsePreTokenizer((*it)[i], path + ".pretokenizers[" + std::to_string(i) + "]", steps));
    }
    return Status::Ok();
  }
  Step st;
  if (type == "ByteLevel") {
    st.kind = Step::kByteLevel;
    BTX_RETURN_IF_ERROR(RequireBool(j, "add_prefix_space", path, &st.add_prefix_space));
    bool use_regex = true;
    BTX_RETURN_IF_ERROR(GetBool(j, "use_regex", path, true, &use_regex));
    if (use_regex) {
      static const char kGpt2[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
      BTX_ASSIGN_OR_RETURN(std::string pcre, TranslateOnigPattern(kGpt2, path));
      BTX_ASSIGN_OR_RETURN(st.regex, Regex::Compile(pcre, path));
    }
    steps->push_back(std::move(st));
    return Status::Ok();
  }
  if (type == "Digits") {
    bool individual = false;
    BTX_RETURN_IF_ERROR(GetBool(j, "individual_digits", path, false, &individual));
    // Rust's char::is_numeric is the N categories; Isolated puts each in its own piece, Contiguous keeps runs.
    st.behavior = individual ? Behavior::kIsolated : Behavior::kContiguous;
    BTX_ASSIGN_OR_RETURN(st.regex, Regex::Compile("\\p{N}", path));
    steps->push_back(std::move(st));
    return Status::Ok();
  }
  if (type == "Split") {
    auto pat = j.find("pattern");
    if (pat == j.end() || !pat->is_object() || pat->size() != 1) {
      return InvalidArgument(path + ".pattern is " + (pat == j.end() ? std::string("missing") : Dump(*pat)) +
                             R"(, expected {"Regex": ...} or {"String": ...})");
    }
    std::string pcre, origin;
    if (pat->contains("Regex") && (*pat)["Regex"].is_string()) {
      origin = (*pat)["Regex"].get<std::string>();
      BTX_ASSIGN_OR_RETURN(pcre, TranslateOnigPattern(origin, path + ".pattern.Regex"));
    } else if (pat->contains("String") && (*pat)["String"].is_string()) {
      origin = (*pat)["String"].get<std::string>();
      pcre = EscapeLiteral(origin);
    } else {
      return InvalidArgument(path + ".pattern is " + Dump(*pat) + R"(, expected {"Regex": ...} or {"String": ...})");
    }
    BTX_ASSIGN_OR_RETURN(st.regex, Regex::Compile(pcre, path + ".pattern", origin));
    auto beh = j.find("behavior");
    const std::string b = beh != j.end() && beh->is_string() ? beh->get<std::string>() : "";
    if (b == "Removed") {
      st.behavior = Behavior::kRemoved;
    } else if (b == "Isolated") {
      st.behavior = Behavior::kIsolated;
    } else if (b == "MergedWithPrevious") {
      st.behavior = Behavior::kMergedWithPrevious;
    } else if (b == "MergedWithNext") {
      st.behavior = Behavior::kMergedWithNext;
    } else if (b == "Contiguous") {
      st.behavior = Behavior::kContiguous;
    } else {
      return InvalidArgument(path + ".behavior is " + (beh == j.end() ? std::string("missing") : Dump(*beh)) +
                             ", expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
    }
    BTX_RETURN_IF_ERROR(RequireBool(j, "invert", path, &st.invert));
    steps->push_back(std::move(st));
    return Status::Ok();
  }
  return InvalidArgument(path + ".type is " + Dump(j.value("type", json())) +
                         "; only ByteLevel, Split, Digits and Sequence pre-tokenizers are supported");
}

}  // namespace

StatusOr<HfTokenizer> HfTokenizer::Load(const std::string& tokenizer_json_path) {
  std::ifstream f(tokenizer_json_path, std::ios::binary);
  if (!f) return NotFound("cannot open " + tokenizer_json_path);
  std::stringstream ss;
  ss << f.rdbuf();
  if (!f && !f.eof()) return DataLoss("cannot read " + tokenizer_json_path);
  return FromJson(ss.str(), tokenizer_json_path);
}

StatusOr<HfTokenizer> HfTokenizer::FromJson(std::string_view json_text, const std::string& origin) {
  json root;
  try {
    root = json::parse(json_text.begin(), json_text.end());
  } catch (const json::exception& e) {
    return InvalidArgument(origin + ": not valid JSON: " + e.what());
  }
  auto fail = [&](const Status& s) { return s.With(origin); };
  if (!root.is_object()) return fail(InvalidArgument("the top level is not an object"));
  auto impl = std::make_shared<Impl>();

  if (auto it = root.find("version"); it != root.end() && !(it->is_string() && *it == "1.0")) {
    return fail(InvalidArgument("version is " + Dump(*it) + ", expected \"1.0\""));
  }
  for (const char* key : {"truncation", "padding"}) {
    if (auto it = root.find(key); it != root.end() && !it->is_null()) {
      return fail(InvalidArgument(std::string(key) + " is " + Dump(*it) +
                                  "; it changes what encode returns, so only null is supported"));
    }
  }

  // --- model
  auto mit = root.find("model");
  if (mit == root.end() || !mit->is_object()) return fail(InvalidArgument("model is missing or not an object"));
  const json& model = *mit;
  if (TypeOf(model) != "BPE") {
    return fail(InvalidArgument("model.type is " + Dump(model.value("type", json())) + "; only \"BPE\" is supported"));
  }
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null() && !(it->is_number() && *it == 0)) {
    return fail(InvalidArgument("model.dropout is " + Dump(*it) + "; BPE dropout is random, only null is supported"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = model.find(key);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      return fail(InvalidArgument(std::string("model.") + key + " is " + Dump(*it) +
                                  "; byte-level BPE has none, only null or \"\" is supported"));
    }
  }
  bool byte_fallback = false;
  BTX_RETURN_IF_ERROR(fail(GetBool(model, "byte_fallback", "model", false, &byte_fallback)));
  if (byte_fallback) return fail(InvalidArgument("model.byte_fallback is true; only false is supported"));
  BTX_RETURN_IF_ERROR(fail(GetBool(model, "fuse_unk", "model", false, &impl->fuse_unk)));
  BTX_RETURN_IF_ERROR(fail(GetBool(model, "ignore_merges", "model", false, &impl->ignore_merges)));

  auto vit = model.find("vocab");
  if (vit == model.end() || !vit->is_object()) return fail(InvalidArgument("model.vocab is missing or not an object"));
  int64_t max_id = -1;
  impl->vocab.reserve(vit->size());
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > 0x7fffffff) {
      return fail(InvalidArgument("model.vocab[" + json(it.key()).dump() + "] is " + Dump(*it) +
                                  ", expected an id in [0, 2^31)"));
    }
    const auto id = static_cast<int32_t>(it->get<int64_t>());
    impl->vocab[it.key()] = id;
    max_id = std::max<int64_t>(max_id, id);
  }
  // Tables are indexed by id; tokenizers' hash maps would take any ids, but no real vocabulary is this sparse.
  if (max_id >= static_cast<int64_t>(vit->size()) * 2 + 1024) {
    return fail(InvalidArgument("model.vocab: ids up to " + std::to_string(max_id) + " for " +
                                std::to_string(vit->size()) + " tokens; such sparse ids are not supported"));
  }
  impl->id_token.assign(static_cast<size_t>(max_id + 1), std::string());
  impl->id_in_vocab.assign(static_cast<size_t>(max_id + 1), 0);
  for (const auto& [tok, id] : impl->vocab) {
    if (impl->id_in_vocab[id]) {
      // tokenizers would decode such an id at random and merge by ids it cannot tell apart.
      return fail(InvalidArgument("model.vocab gives id " + std::to_string(id) + " to both " +
                                  json(impl->id_token[id]).dump() + " and " + json(tok).dump()));
    }
    impl->id_in_vocab[id] = 1;
    impl->id_token[id] = tok;
  }
  if (auto it = model.find("unk_token"); it != model.end() && !it->is_null()) {
    if (!it->is_string()) return fail(InvalidArgument("model.unk_token is " + Dump(*it) + ", expected a string"));
    auto v = impl->vocab.find(it->get<std::string>());
    // tokenizers fails only when it meets an unknown character; refusing now is the safe equivalent.
    if (v == impl->vocab.end()) {
      return fail(InvalidArgument("model.unk_token " + Dump(*it) + " is not in model.vocab"));
    }
    impl->unk_id = v->second;
  }

  auto git = model.find("merges");
  if (git == model.end() || !git->is_array()) return fail(InvalidArgument("model.merges is missing or not a list"));
  std::vector<std::pair<std::string, std::string>> merges;
  merges.reserve(git->size());
  for (size_t i = 0; i < git->size(); ++i) {
    const json& m = (*git)[i];
    const std::string where = "model.merges[" + std::to_string(i) + "]";
    if (m.is_string()) {
      const std::string line = m.get<std::string>();
      if (line.rfind("#version", 0) == 0) continue;
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
        return fail(InvalidArgument(where + " is " + Dump(m) + ", expected \"a b\" (one space)"));
      }
      merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return fail(InvalidArgument(where + " is " + Dump(m) + ", expected \"a b\" or [\"a\", \"b\"]"));
    }
  }
  impl->merges.Reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const std::string ab = a + b;
    auto ia = impl->vocab.find(a), ib = impl->vocab.find(b), iab = impl->vocab.find(ab);
    for (const auto& [it, tok] : {std::pair{ia, &a}, std::pair{ib, &b}, std::pair{iab, &ab}}) {
      if (it == impl->vocab.end()) {
        return fail(InvalidArgument("model.merges[" + std::to_string(rank) + "] (" + json(a).dump() + ", " +
                                    json(b).dump() + "): " + json(*tok).dump() + " is not in model.vocab"));
      }
    }
    impl->merges.Put(static_cast<uint32_t>(ia->second), static_cast<uint32_t>(ib->second),
                     static_cast<uint32_t>(rank), static_cast<uint32_t>(iab->second));
  }

  // Byte-level alphabet: each byte's character, and the raw bytes behind each token (for ignore_merges).
  const std::array<uint32_t, 256> b2c = ByteToChar();
  std::array<int16_t, 324> c2b;
  c2b.fill(-1);
  for (int b = 0; b < 256; ++b) {
    c2b[b2c[b]] = static_cast<int16_t>(b);
    std::string ch;
    AppendUtf8(ch, b2c[b]);
    auto it = impl->vocab.find(ch);
    impl->byte_id[b] = it == impl->vocab.end() ? -1 : it->second;
  }
  // The bytes a token stands for when all its characters are byte-level ones; otherwise its own UTF-8 (which is
  // what the ByteLevel decoder does with such tokens).
  auto token_bytes = [&](const std::string& tok, bool* all_byte_level) {
    std::string raw;
    const auto* p = reinterpret_cast<const unsigned char*>(tok.data());
    size_t i = 0;
    *all_byte_level = true;
    while (i < tok.size()) {
      const Utf8Step st = NextUtf8(p + i, tok.size() - i);
      if (!st.ok || st.cp >= c2b.size() || c2b[st.cp] < 0) {
        *all_byte_level = false;
        return tok;
      }
      raw += static_cast<char>(c2b[st.cp]);
      i += st.len;
    }
    return raw;
  };
  if (impl->ignore_merges) {
    for (const auto& [tok, id] : impl->vocab) {
      bool all = false;
      std::string raw = token_bytes(tok, &all);
      if (all) impl->raw_vocab.emplace(std::move(raw), id);
    }
  }

  // --- normalizer, pre-tokenizer, decoder
  if (auto it = root.find("normalizer"); it != root.end()) {
    BTX_RETURN_IF_ERROR(fail(ParseNormalizer(*it, "normalizer", &impl->nfc)));
  }
  auto pit = root.find("pre_tokenizer");
  if (pit == root.end() || pit->is_null()) {
    return fail(InvalidArgument("pre_tokenizer is null; only byte-level BPE (a ByteLevel pre-tokenizer) is supported"));
  }
  BTX_RETURN_IF_ERROR(fail(ParsePreTokenizer(*pit, "pre_tokenizer", &impl->steps)));
  for (size_t i = 0; i < impl->steps.size(); ++i) {
    if (impl->steps[i].kind == Step::kByteLevel && i + 1 != impl->steps.size()) {
      return fail(InvalidArgument("pre_tokenizer: ByteLevel must be the last step (it maps the text to bytes)"));
    }
  }
  if (impl->steps.empty() || impl->steps.back().kind != Step::kByteLevel) {
    return fail(InvalidArgument("pre_tokenizer has no ByteLevel step; only byte-level BPE is supported"));
  }
  if (auto it = root.find("decoder"); it != root.end() && !it->is_null()) {
    if (!it->is_object() || TypeOf(*it) != "ByteLevel") {
      return fail(InvalidArgument("decoder.type is " + Dump(it->is_object() ? it->value("type", json()) : *it) +
                                  "; only ByteLevel (or null) is supported"));
    }
  } else {
    impl->byte_level_decoder = false;  // tokenizers then joins the tokens with spaces
  }

  // --- added tokens: ids as tokenizers' AddedVocabulary::add_tokens assigns them (the ids in the file are only
  // checked there, with a warning), and the two tries of refresh_added_tokens.
  std::vector<AddedToken> added;
  if (auto it = root.find("added_tokens"); it != root.end() && !it->is_null()) {
    if (!it->is_array()) return fail(InvalidArgument("added_tokens is not a list"));
    for (size_t i = 0; i < it->size(); ++i) {
      const json& t = (*it)[i];
      const std::string path = "added_tokens[" + std::to_string(i) + "]";
      if (!t.is_object() || !t.contains("content") || !t["content"].is_string()) {
        return fail(InvalidArgument(path + ".content is missing or not a string"));
      }
      AddedToken a;
      a.content = t["content"].get<std::string>();
      BTX_RETURN_IF_ERROR(fail(GetBool(t, "single_word", path, false, &a.single_word)));
      BTX_RETURN_IF_ERROR(fail(GetBool(t, "lstrip", path, false, &a.lstrip)));
      BTX_RETURN_IF_ERROR(fail(GetBool(t, "rstrip", path, false, &a.rstrip)));
      BTX_RETURN_IF_ERROR(fail(GetBool(t, "normalized", path, true, &a.normalized)));
      BTX_RETURN_IF_ERROR(fail(GetBool(t, "special", path, false, &a.special)));
      added.push_back(std::move(a));
    }
  }
  std::vector<AddedToken> special_list, plain_list;
  std::unordered_map<std::string, bool> special_set;
  for (const AddedToken& t : added) {
    if (t.special && !t.content.empty() && !special_set.count(t.content)) {
      special_list.push_back(t);
      special_set[t.content] = true;
    }
  }
  const auto model_size = static_cast<int64_t>(impl->vocab.size());
  std::unordered_map<std::string, std::vector<int32_t>> ids_by_content;  // every id a content was given
  int64_t added_max = -1;  // ids in added_map only ever grow
  for (const AddedToken& t : added) {
    if (t.content.empty()) continue;
    bool seen = false;  // tokenizers skips a token equal (all flags) to one already added
    for (int32_t id : ids_by_content[t.content]) seen |= impl->added_by_id.at(id) == t;
    if (seen) continue;
    int64_t new_id;
    if (auto a = impl->added_map.find(t.content); a != impl->added_map.end()) {
      new_id = a->second;
    } else if (auto v = impl->vocab.find(t.content); v != impl->vocab.end()) {
      new_id = v->second;
    } else if (added_max < 0) {
      new_id = model_size;
    } else {
      new_id = (added_max >= model_size || model_size == 0) ? added_max + 1 : model_size;
    }
    if (new_id > 0x7fffffff) return fail(InvalidArgument("added_tokens: too many ids"));
    added_max = std::max(added_max, new_id);
    impl->added_map[t.content] = static_cast<int32_t>(new_id);
    impl->added_by_id[static_cast<int32_t>(new_id)] = t;
    ids_by_content[t.content].push_back(static_cast<int32_t>(new_id));
    if (!special_set.count(t.content)) plain_list.push_back(t);
  }
  for (const auto* list : {&special_list, &plain_list}) {
    for (const AddedToken& t : *list) {
      const int32_t id = impl->added_map.at(t.content);
      if (!t.normalized) {
        impl->raw_trie.Add(t.content, id);
      } else {
        impl->normalized_trie.Add(impl->nfc ? Nfc(t.content) : t.content, id);
      }
    }
  }
  bool any_single_word = false;
  for (const auto& [id, t] : impl->added_by_id) any_single_word |= t.single_word;
  if (any_single_word) {
    BTX_ASSIGN_OR_RETURN(impl->rust_word, Regex::Compile(kRustWordClass, "added_tokens"));
  }

  // --- decode table and size
  int64_t size = max_id + 1;
  for (const auto& [id, t] : impl->added_by_id) size = std::max<int64_t>(size, int64_t{id} + 1);
  impl->size = size;
  impl->id_bytes.assign(static_cast<size_t>(size), std::string());
  impl->id_known.assign(static_cast<size_t>(size), 0);
  for (int64_t id = 0; id < size; ++id) {
    const std::string* tok = nullptr;
    if (auto a = impl->added_by_id.find(static_cast<int32_t>(id)); a != impl->added_by_id.end()) {
      tok = &a->second.content;
    } else if (id <= max_id && impl->id_in_vocab[id]) {
      tok = &impl->id_token[id];
    }
    if (tok == nullptr) continue;
    impl->id_known[id] = 1;
    bool all = false;
    impl->id_bytes[id] = impl->byte_level_decoder ? token_bytes(*tok, &all) : *tok;
  }

  return HfTokenizer(std::move(impl));
}

// ---------------------------------------------------------------------------------------------------------------

std::vector<int32_t> HfTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> out;
  if (text.empty()) return out;
  out.reserve(text.size() / 3 + 4);
  EncodeScratch& sc = Scratch();
  const size_t steps = impl_->steps.size();
  if (sc.matches.size() < steps) {
    sc.matches.resize(steps);
    sc.splits.resize(steps);
    sc.prefixed.resize(steps);
  }
  if (IsValidUtf8(text)) {
    impl_->EncodeInto(text, out);
  } else {
    impl_->EncodeInto(ReplaceInvalidUtf8(text), out);
  }
  return out;
}

std::string HfTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || id >= impl_->size || !impl_->id_known[id]) continue;
    if (!impl_->byte_level_decoder && !first) bytes += ' ';
    bytes += impl_->id_bytes[id];
    first = false;
  }
  return IsValidUtf8(bytes) ? bytes : ReplaceInvalidUtf8(bytes);
}

int64_t HfTokenizer::vocab_size() const { return impl_->size; }

std::optional<int32_t> HfTokenizer::TokenToId(std::string_view token) const {
  if (auto a = impl_->added_map.find(std::string(token)); a != impl_->added_map.end()) return a->second;
  if (auto v = impl_->vocab.find(token); v != impl_->vocab.end()) return v->second;
  return std::nullopt;
}

std::optional<std::string> HfTokenizer::IdToToken(int32_t id) const {
  if (auto a = impl_->added_by_id.find(id); a != impl_->added_by_id.end()) return a->second.content;
  if (id >= 0 && static_cast<size_t>(id) < impl_->id_in_vocab.size() && impl_->id_in_vocab[id]) {
    return impl_->id_token[id];
  }
  return std::nullopt;
}

std::string ReplaceInvalidUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 16);
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    const Utf8Step st = NextUtf8(p + i, s.size() - i);
    if (st.ok) {
      out.append(s.substr(i, st.len));
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += st.len;
  }
  return out;
}

}  // namespace btx::model
