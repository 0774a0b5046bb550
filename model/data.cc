#include "btx/model/data.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "btx/contract/files.h"
#include "btx/model/chat_template.h"
#include "btx/model/token_shard.h"

namespace btx::model {
namespace fs = std::filesystem;
using nlohmann::json;

StatusOr<DataFormat> ParseDataFormat(const std::string& name) {
  if (name.empty() || name == "auto") return DataFormat::kAuto;
  if (name == "text") return DataFormat::kText;
  if (name == "jsonl") return DataFormat::kJsonl;
  if (name == "chat") return DataFormat::kChat;
  return InvalidArgument("data format '" + name + "': expected text, jsonl or chat");
}

const char* DataFormatName(DataFormat f) {
  switch (f) {
    case DataFormat::kAuto: return "auto";
    case DataFormat::kText: return "text";
    case DataFormat::kJsonl: return "jsonl";
    case DataFormat::kChat: return "chat";
  }
  return "?";
}

struct DocumentEncoder::ChatState {
  ChatTemplate tmpl;
  ChatVariables vars;
};

StatusOr<DocumentEncoder> DocumentEncoder::Create(const Tokenizer& tok) {
  DocumentEncoder e;
  e.tok_ = &tok;
  // Chat needs the tokenizer's own text for its special tokens and an Encode that can run on pieces of text:
  // the sentencepiece helper is a process per call and adds a word-start marker to each piece.
  if (tok.kind() == "sentencepiece") {
    e.chat_error_ = "chat data needs a byte or tokenizer.json tokenizer, not sentencepiece";
    return e;
  }
  // A seed whose chat template btx cannot use still trains on text: the error waits for the first conversation.
  auto source = tok.chat_template();
  if (!source.ok()) {
    e.chat_error_ = source.status().message();
    return e;
  }
  ChatTemplateSource src = std::move(*source);
  if (src.source.empty()) {
    src.source = std::string(kChatMlTemplate);
    src.origin = "ChatML (the tokenizer has no chat template)";
  }
  auto tmpl = ChatTemplate::Parse(src.source, src.origin);
  if (!tmpl.ok()) {
    e.chat_error_ = tmpl.status().message();
    return e;
  }
  auto state = std::make_shared<ChatState>(ChatState{std::move(*tmpl), {}});
  state->vars.bos_token = src.bos_token;
  state->vars.eos_token = src.eos_token;
  e.chat_ = std::move(state);
  return e;
}

EncodedDocument DocumentEncoder::Text(std::string_view text) const {
  EncodedDocument d;
  if (tok_->bos_id() >= 0) d.ids.push_back(tok_->bos_id());
  std::vector<int32_t> body = tok_->Encode(text);
  d.ids.insert(d.ids.end(), body.begin(), body.end());
  if (tok_->eos_id() >= 0) d.ids.push_back(tok_->eos_id());
  return d;
}

namespace {

Status CheckMessages(const nlohmann::ordered_json& messages) {
  if (!messages.is_array() || messages.empty())
    return InvalidArgument("\"messages\" must be a non-empty list of {role, content}, got " +
                           std::string(messages.is_array() ? "an empty list" : messages.type_name()));
  bool assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string at = "messages[" + std::to_string(i) + "]";
    const auto& m = messages[i];
    if (!m.is_object()) return InvalidArgument(at + ": expected an object {role, content}, got " + m.dump());
    for (auto it = m.begin(); it != m.end(); ++it)
      if (it.key() != "role" && it.key() != "content")
        return InvalidArgument(at + ": unknown key \"" + it.key() + "\" (expected role and content)");
    if (!m.contains("role")) return InvalidArgument(at + ": missing \"role\"");
    if (!m.contains("content")) return InvalidArgument(at + ": missing \"content\"");
    const auto& role = m["role"];
    if (!role.is_string() || (role != "system" && role != "user" && role != "assistant"))
      return InvalidArgument(at + ".role: got " + role.dump() + "; expected \"system\", \"user\" or \"assistant\"");
    if (!m["content"].is_string())
      return InvalidArgument(at + ".content: got " + std::string(m["content"].type_name()) + " " +
                             m["content"].dump().substr(0, 80) + "; expected a string");
    assistant = assistant || role == "assistant";
  }
  if (!assistant) return InvalidArgument("the conversation has no assistant message (nothing to train on)");
  return Status::Ok();
}

}  // namespace

StatusOr<EncodedDocument> DocumentEncoder::Chat(const nlohmann::ordered_json& messages) const {
  BTX_RETURN_IF_ERROR(CheckMessages(messages));
  if (!chat_) return FailedPrecondition(chat_error_);
  BTX_ASSIGN_OR_RETURN(ChatRendering r, chat_->tmpl.Render(messages, chat_->vars));
  const std::vector<ChatSpan> spans = LossSpans(r, chat_->tmpl, chat_->vars.eos_token);
  bool has_content = false;
  for (const auto& m : messages) has_content = has_content || (m["role"] == "assistant" && !m["content"].get<std::string>().empty());
  if (has_content && spans.empty())
    return InvalidArgument("the chat template does not output the assistant content as given (transformed by a "
                           "filter btx cannot trace), so its loss mask is unknown");
  // Tokens per piece: the text between span boundaries encoded on its own. Boundaries sit before end-of-turn
  // tokens and after role headers, where tokenizers split anyway, so the pieces' tokens are almost always those
  // of the whole text; when they are not (a merge across a boundary) the whole text's tokens are kept and each
  // boundary placed by decoding prefixes.
  std::vector<size_t> cuts = {0};
  for (const auto& s : spans) cuts.insert(cuts.end(), {s.begin, s.end});
  cuts.push_back(r.text.size());
  EncodedDocument d;
  std::vector<int32_t> whole = tok_->Encode(r.text);
  for (size_t k = 0; k + 1 < cuts.size(); ++k) {
    if (cuts[k + 1] <= cuts[k]) continue;
    std::vector<int32_t> piece = tok_->Encode(std::string_view(r.text).substr(cuts[k], cuts[k + 1] - cuts[k]));
    d.ids.insert(d.ids.end(), piece.begin(), piece.end());
    d.loss.insert(d.loss.end(), piece.size(), static_cast<uint8_t>(k % 2));
  }
  if (d.ids != whole) {
    d.ids = whole;
    d.loss.assign(whole.size(), 0);
    auto prefix_bytes = [&](size_t n) { return tok_->Decode({whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(n)}).size(); };
    // The token holding byte `b`: the last k whose prefix ids[0..k) decodes to at most b bytes.
    auto token_at = [&](size_t b) {
      size_t lo = 0, hi = whole.size();
      while (hi - lo > 1) {
        const size_t mid = (lo + hi) / 2;
        (prefix_bytes(mid) <= b ? lo : hi) = mid;
      }
      return lo;
    };
    for (const auto& s : spans) {
      const size_t a = token_at(s.begin), b = token_at(s.end - 1);
      for (size_t k = a; k <= b && k < whole.size(); ++k) d.loss[k] = 1;
    }
  }
  // The byte tokenizer's bos/eos have no text a template could write.
  if (tok_->kind() == "byte") {
    d.ids.insert(d.ids.begin(), tok_->bos_id());
    d.loss.insert(d.loss.begin(), 0);
    d.ids.push_back(tok_->eos_id());
    d.loss.push_back(0);
  }
  return d;
}

namespace {

bool IsJsonlName(const std::string& f) { return f.ends_with(".jsonl") || f.ends_with(".ndjson") || f.ends_with(".json"); }

// The next line (without its \n or \r\n) from `pos`; 0 at the end of the text.
size_t NextLine(const std::string& text, size_t& pos, std::string_view& line) {
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    line = std::string_view(text).substr(pos, nl - pos);
    pos = nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    return 1;
  }
  return 0;
}

bool Blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t'; });
}

}  // namespace

namespace {
// JSON lines are chat when the first record has "messages".
DataFormat JsonlKind(const std::string& text) {
  size_t pos = 0;
  std::string_view line;
  while (NextLine(text, pos, line)) {
    if (Blank(line)) continue;
    const json j = json::parse(line, nullptr, false);
    return j.is_object() && j.contains("messages") ? DataFormat::kChat : DataFormat::kJsonl;
  }
  return DataFormat::kJsonl;
}
}  // namespace

StatusOr<DataFormat> ResolveFormat(const std::string& file, const DataFormatOptions& options) {
  if (options.format != DataFormat::kAuto) return options.format;
  if (!IsJsonlName(file)) return DataFormat::kText;
  BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(file));
  return JsonlKind(text);
}

Status ForEachDocument(const std::string& file, const DataFormatOptions& options, const DocumentEncoder& enc,
                       const std::function<Status(EncodedDocument&&)>& fn) {
  BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(file));
  const DataFormat format = options.format != DataFormat::kAuto ? options.format
                            : IsJsonlName(file)                 ? JsonlKind(text)
                                                                : DataFormat::kText;
  if (format == DataFormat::kText) return fn(enc.Text(text));
  size_t pos = 0, lineno = 0;
  std::string_view line;
  while (NextLine(text, pos, line)) {
    ++lineno;
    if (Blank(line)) continue;
    const std::string where = file + ":" + std::to_string(lineno) + ": ";
    nlohmann::ordered_json record;  // ordered: a template's tojson writes keys as the record has them
    try {
      record = nlohmann::ordered_json::parse(line);
    } catch (const nlohmann::ordered_json::parse_error& e) {
      std::string why = e.what();
      if (auto at = why.find("] "); at != std::string::npos) why = why.substr(at + 2);
      return InvalidArgument(where + "invalid JSON (" + why + ")");
    }
    if (!record.is_object()) return InvalidArgument(where + "expected a JSON object, got " + std::string(record.type_name()));
    if (format == DataFormat::kJsonl) {
      const std::string& field = options.text_field;
      if (!record.contains(field))
        return InvalidArgument(where + "missing field \"" + field + "\" (format jsonl reads the text of field \"" +
                               field + "\"; set text_field for another)");
      if (!record[field].is_string())
        return InvalidArgument(where + "field \"" + field + "\" is " + std::string(record[field].type_name()) +
                               "; expected a string");
      BTX_RETURN_IF_ERROR(fn(enc.Text(record[field].get_ref<const std::string&>())));
      continue;
    }
    if (!record.contains("messages"))
      return InvalidArgument(where + "missing field \"messages\" (format chat: {\"messages\": [{\"role\": ..., \"content\": ...}]})");
    auto doc = enc.Chat(record["messages"]);
    if (!doc.ok()) return Status(doc.status().code(), where + doc.status().message());
    BTX_RETURN_IF_ERROR(fn(std::move(*doc)));
  }
  return Status::Ok();
}

StatusOr<std::vector<std::string>> ExpandDataPaths(const std::vector<std::string>& paths) {
  std::vector<std::string> out;
  for (const auto& p : paths) {
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      BTX_ASSIGN_OR_RETURN(auto files, ListFilesRecursive(p));
      for (auto& f : files) out.push_back((fs::path(p) / f).string());
    } else if (fs::is_regular_file(p, ec)) {
      out.push_back(p);
    } else {
      return NotFound("data path " + p + " does not exist");
    }
  }
  if (out.empty()) return InvalidArgument("data paths contain no files");
  return out;
}

StatusOr<TokenData> LoadData(const std::vector<std::string>& paths, const Tokenizer& tok,
                             const DataFormatOptions& options, int64_t max_tokens, int64_t vocab_limit) {
  BTX_ASSIGN_OR_RETURN(auto files, ExpandDataPaths(paths));
  BTX_ASSIGN_OR_RETURN(DocumentEncoder enc, DocumentEncoder::Create(tok));
  auto out = std::make_shared<std::vector<int32_t>>();
  std::vector<uint8_t> loss;  // kept only once some document has a mask; 1 for every token before it
  bool masked = false;
  auto append = [&](const std::vector<int32_t>& ids, const std::vector<uint8_t>& mask) {
    if (!mask.empty() && !masked) {
      loss.assign(out->size(), 1);
      masked = true;
    }
    out->insert(out->end(), ids.begin(), ids.end());
    if (masked) {
      if (mask.empty()) loss.insert(loss.end(), ids.size(), 1);
      else loss.insert(loss.end(), mask.begin(), mask.end());
    }
  };
  const Status kEnough = Cancelled("enough tokens");
  for (const auto& f : files) {
    if (max_tokens > 0 && static_cast<int64_t>(out->size()) >= max_tokens) break;
    if (f.ends_with(".btxtok")) {
      BTX_ASSIGN_OR_RETURN(auto shard, ReadTokenShardWithMask(f));
      append(shard.tokens, shard.loss);
      continue;
    }
    Status st = ForEachDocument(f, options, enc, [&](EncodedDocument&& d) {
      append(d.ids, d.loss);
      return max_tokens > 0 && static_cast<int64_t>(out->size()) >= max_tokens ? kEnough : Status::Ok();
    });
    if (!st.ok() && !(st.code() == kEnough.code() && st.message() == kEnough.message())) return st;
  }
  if (max_tokens > 0 && static_cast<int64_t>(out->size()) > max_tokens) {
    out->resize(max_tokens);
    if (masked) loss.resize(max_tokens);
  }
  if (vocab_limit > 0) {
    for (size_t i = 0; i < out->size(); ++i)
      if ((*out)[i] < 0 || (*out)[i] >= vocab_limit)
        return InvalidArgument("token id " + std::to_string((*out)[i]) + " is outside the model vocabulary (" +
                               std::to_string(vocab_limit) + ")");
  }
  TokenData d;
  d.tokens = out;
  if (masked) d.loss = std::make_shared<const std::vector<uint8_t>>(std::move(loss));
  return d;
}

StatusOr<TokenStream> LoadTokens(const std::vector<std::string>& paths, const Tokenizer& tok, int64_t max_tokens,
                                 int64_t vocab_limit) {
  BTX_ASSIGN_OR_RETURN(TokenData d, LoadData(paths, tok, DataFormatOptions{}, max_tokens, vocab_limit));
  return d.tokens;
}

double CountedShare(const at::Tensor& targets, int64_t begin, int64_t end) {
  const at::Tensor counted = targets.ne(kIgnoreIndex).sum(1);
  const int64_t all = counted.sum().item<int64_t>();
  if (all == 0) return 0.0;
  return static_cast<double>(counted.narrow(0, begin, end - begin).sum().item<int64_t>()) / static_cast<double>(all);
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

StatusOr<WindowSampler> WindowSampler::Create(TokenStream tokens, int64_t seq_len, uint64_t seed, LossMask loss) {
  WindowSampler s;
  s.windows_ = (static_cast<int64_t>(tokens->size()) - 1) / seq_len;
  if (s.windows_ < 1)
    return InvalidArgument("data has " + std::to_string(tokens->size()) + " tokens, needs at least seq_len+1 = " +
                           std::to_string(seq_len + 1));
  if (loss) {
    if (loss->size() != tokens->size()) return Internal("loss mask and tokens differ in length");
    // A window without a counted target would give a loss of 0/0: only windows with one are drawn.
    for (int64_t w = 0; w < s.windows_; ++w) {
      const uint8_t* m = loss->data() + w * seq_len + 1;
      if (std::any_of(m, m + seq_len, [](uint8_t x) { return x != 0; })) s.eligible_.push_back(w);
    }
    if (s.eligible_.empty())
      return InvalidArgument("no window of seq_len+1 = " + std::to_string(seq_len + 1) +
                             " tokens has a token the loss counts (chat data without assistant tokens?)");
    s.windows_ = static_cast<int64_t>(s.eligible_.size());
    s.loss_ = std::move(loss);
  }
  s.tokens_ = std::move(tokens);
  s.seq_len_ = seq_len;
  s.seed_ = seed;
  return s;
}

void WindowSampler::Fill(uint64_t index, int64_t* dst, int64_t* targets) {
  const int64_t epoch = static_cast<int64_t>(index / windows_);
  if (epoch != perm_epoch_) {
    // Fisher-Yates with our own generator: std distributions differ between standard libraries.
    perm_.resize(windows_);
    for (int64_t i = 0; i < windows_; ++i) perm_[i] = i;
    uint64_t state = SplitMix64(seed_ ^ SplitMix64(static_cast<uint64_t>(epoch) + 1));
    for (int64_t i = windows_ - 1; i > 0; --i) {
      state = SplitMix64(state);
      std::swap(perm_[i], perm_[state % static_cast<uint64_t>(i + 1)]);
    }
    perm_epoch_ = epoch;
  }
  int64_t w = perm_[index % windows_];
  if (!eligible_.empty()) w = eligible_[static_cast<size_t>(w)];
  const int32_t* src = tokens_->data() + w * seq_len_;
  for (int64_t i = 0; i <= seq_len_; ++i) dst[i] = src[i];
  if (!targets) return;
  const uint8_t* m = loss_ ? loss_->data() + w * seq_len_ : nullptr;
  for (int64_t i = 0; i < seq_len_; ++i) targets[i] = m && !m[i + 1] ? kIgnoreIndex : src[i + 1];
}

MixtureSampler::MixtureSampler(std::vector<WindowSampler> samplers, std::vector<double> weights, uint64_t seed)
    : samplers_(std::move(samplers)), seed_(seed), cursors_(samplers_.size(), 0) {
  double total = 0;
  for (double w : weights) total += w;
  double acc = 0;
  for (double w : weights) cumulative_.push_back((acc += w) / total);
}

at::Tensor MixtureSampler::Next(int64_t count, int64_t seq_len) { return NextBatch(count, seq_len).tokens; }

MixtureSampler::Batch MixtureSampler::NextBatch(int64_t count, int64_t seq_len) {
  at::Tensor out = at::empty({count, seq_len + 1}, at::kLong);
  at::Tensor targets = at::empty({count, seq_len}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t b = 0; b < count; ++b) {
    size_t d = 0;
    if (samplers_.size() > 1) {
      const double u = static_cast<double>(SplitMix64(seed_ * 0x632be59bd9b4e019ull + drawn_) >> 11) * 0x1.0p-53;
      while (d + 1 < cumulative_.size() && u >= cumulative_[d]) ++d;
    }
    samplers_[d].Fill(cursors_[d]++, p + b * (seq_len + 1), t + b * seq_len);
    ++drawn_;
  }
  return {out, targets};
}

}  // namespace btx::model
