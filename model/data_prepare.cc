#include "btx/model/data_prepare.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>

#include "btx/model/data.h"
#include "btx/contract/files.h"
#include "btx/model/token_shard.h"
#include "btx/model/tokenizer.h"

namespace btx::model {
namespace fs = std::filesystem;

namespace {

// Buffers one split's tokens and writes them out shard_tokens at a time, so memory stays bounded by one
// shard plus one document whatever the corpus size.
class ShardWriter {
 public:
  ShardWriter(std::string dir, int64_t shard_tokens, int64_t vocab)
      : dir_(std::move(dir)), shard_tokens_(shard_tokens), vocab_(vocab) {}

  // loss: one flag per token, or null when every token counts.
  Status Add(const int32_t* p, const uint8_t* loss, size_t n) {
    while (n > 0) {
      const size_t take = std::min(n, static_cast<size_t>(shard_tokens_) - buf_.size());
      buf_.insert(buf_.end(), p, p + take);
      if (loss) {
        loss_.insert(loss_.end(), loss, loss + take);
        loss += take;
      } else {
        loss_.insert(loss_.end(), take, 1);
      }
      p += take;
      n -= take;
      tokens_ += static_cast<int64_t>(take);
      if (static_cast<int64_t>(buf_.size()) == shard_tokens_) BTX_RETURN_IF_ERROR(Flush());
    }
    return Status::Ok();
  }
  Status Flush() {
    if (buf_.empty()) return Status::Ok();
    char name[32];
    std::snprintf(name, sizeof(name), "shard-%05zu.btxtok", shards_.size());
    // A shard with nothing masked stays version 1, readable by earlier releases.
    const bool masked = std::find(loss_.begin(), loss_.end(), 0) != loss_.end();
    loss_tokens_ += std::count(loss_.begin(), loss_.end(), 1);
    BTX_RETURN_IF_ERROR(WriteTokenShard(dir_ + "/" + name, buf_, static_cast<uint64_t>(vocab_), masked ? &loss_ : nullptr));
    shards_.emplace_back(name);
    buf_.clear();
    loss_.clear();
    return Status::Ok();
  }
  int64_t tokens() const { return tokens_; }
  int64_t loss_tokens() const { return loss_tokens_; }
  const std::vector<std::string>& shards() const { return shards_; }

 private:
  std::string dir_;
  int64_t shard_tokens_, vocab_;
  int64_t tokens_ = 0, loss_tokens_ = 0;
  std::vector<int32_t> buf_;
  std::vector<uint8_t> loss_;
  std::vector<std::string> shards_;
};

Status ValidateOptions(const DataPrepareOptions& o) {
  if (o.inputs.empty()) return InvalidArgument("no INPUT given (text or JSONL files, or directories)");
  if (o.format.text_field.empty()) return InvalidArgument("--text-field: must not be empty");
  if (o.format.text_field != "text" && o.format.format != DataFormat::kJsonl && o.format.format != DataFormat::kAuto)
    return InvalidArgument(std::string("--text-field ") + o.format.text_field + ": only --format jsonl has a text field, not " +
                           DataFormatName(o.format.format));
  if (o.out.empty()) return InvalidArgument("--out DIR is required");
  if (!(o.valid_fraction >= 0.0 && o.valid_fraction <= 0.5))
    return InvalidArgument("--valid-fraction " + std::to_string(o.valid_fraction) + ": expected a number in [0, 0.5]");
  if (o.shard_tokens < 1) return InvalidArgument("--shard-tokens " + std::to_string(o.shard_tokens) + ": must be >= 1");
  return Status::Ok();
}

StatusOr<int64_t> ParseInt(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  int64_t x = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size() || x < lo || x > hi)
    return InvalidArgument(flag + " " + v + ": expected an integer in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "]");
  return x;
}

}  // namespace

StatusOr<DataPrepareOptions> ParseDataPrepareArgs(const std::vector<std::string>& args) {
  DataPrepareOptions o;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (!a.starts_with("--")) {
      o.inputs.push_back(a);
      continue;
    }
    std::string flag = a, value;
    bool has_value = false;
    if (auto eq = a.find('='); eq != std::string::npos) {
      flag = a.substr(0, eq);
      value = a.substr(eq + 1);
      has_value = true;
    }
    if (flag != "--out" && flag != "--tokenizer" && flag != "--valid-fraction" && flag != "--shard-tokens" &&
        flag != "--seed" && flag != "--format" && flag != "--text-field")
      return InvalidArgument("unknown argument " + a);
    if (!has_value) {
      if (i + 1 >= args.size()) return InvalidArgument(flag + " needs a value");
      value = args[++i];
    }
    if (flag == "--out") {
      o.out = value;
    } else if (flag == "--tokenizer") {
      o.tokenizer = value;
    } else if (flag == "--format") {
      auto f = ParseDataFormat(value);
      if (!f.ok() || value.empty() || value == "auto")
        return InvalidArgument("--format " + value + ": expected text, jsonl or chat");
      o.format.format = *f;
    } else if (flag == "--text-field") {
      o.format.text_field = value;
    } else if (flag == "--valid-fraction") {
      char* end = nullptr;
      const double f = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(f >= 0.0 && f <= 0.5))
        return InvalidArgument("--valid-fraction " + value + ": expected a number in [0, 0.5]");
      o.valid_fraction = f;
    } else if (flag == "--shard-tokens") {
      BTX_ASSIGN_OR_RETURN(o.shard_tokens, ParseInt(flag, value, 1, int64_t{1} << 40));
    } else {
      uint64_t s = 0;
      auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), s);
      if (ec != std::errc() || p != value.data() + value.size())
        return InvalidArgument("--seed " + value + ": expected a non-negative integer");
      o.seed = s;
    }
  }
  BTX_RETURN_IF_ERROR(ValidateOptions(o));
  return o;
}

StatusOr<DataPrepareResult> PrepareData(const DataPrepareOptions& opts) {
  BTX_RETURN_IF_ERROR(ValidateOptions(opts));
  for (const auto& in : opts.inputs) {
    std::error_code ec;
    if (!fs::exists(in, ec)) return NotFound("input " + in + " does not exist");
  }
  BTX_ASSIGN_OR_RETURN(std::vector<std::string> files, ExpandDataPaths(opts.inputs));
  for (const auto& f : files)
    if (f.ends_with(".btxtok")) return InvalidArgument("input " + f + " is already a token shard");
  if (fs::exists(opts.out)) return FailedPrecondition("--out " + opts.out + " already exists");

  // Tokenizer spec first: a bad --tokenizer should fail before anything is written.
  int spm_vocab = 0;
  std::string spm_model, model_dir;
  if (opts.tokenizer.starts_with("spm:")) {
    auto v = ParseInt("--tokenizer", opts.tokenizer.substr(4), 32, 1 << 20);
    if (!v.ok())
      return InvalidArgument("--tokenizer " + opts.tokenizer + ": expected spm:VOCAB, VOCAB an integer in [32, 1048576]");
    spm_vocab = static_cast<int>(*v);
  } else if (opts.tokenizer != "byte") {
    if (fs::is_directory(opts.tokenizer)) {
      if (!HasTokenizer(opts.tokenizer))
        return NotFound("--tokenizer " + opts.tokenizer + ": the directory has no tokenizer.json, tokenizer.model or btx_tokenizer.json");
      model_dir = fs::absolute(opts.tokenizer).string();
    } else if (!fs::is_regular_file(opts.tokenizer)) {
      return NotFound("--tokenizer " + opts.tokenizer + ": no such file or directory (expected byte, PATH.model, a model DIR or spm:VOCAB)");
    } else {
      spm_model = fs::absolute(opts.tokenizer).string();
    }
  }
  if ((spm_vocab > 0 || !spm_model.empty()) && !SentencePieceAvailable())
    return FailedPrecondition("--tokenizer " + opts.tokenizer + ": this build has no sentencepiece support");

  BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(opts.out));
  std::unique_ptr<Tokenizer> tok;
  if (spm_vocab > 0) {
    BTX_ASSIGN_OR_RETURN(tok, TrainSentencePiece(files, spm_vocab, staged.path() + "/tokenizer.model"));
  } else if (!spm_model.empty()) {
    BTX_ASSIGN_OR_RETURN(tok, LoadSentencePiece(spm_model));
  } else if (!model_dir.empty()) {
    auto t = LoadTokenizer(model_dir);
    if (!t.ok()) return t.status().With("--tokenizer " + opts.tokenizer);
    tok = std::move(*t);
  } else {
    tok = MakeByteTokenizer();
  }

  std::vector<int64_t> sizes(files.size());
  int64_t total_bytes = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    std::error_code ec;
    sizes[i] = static_cast<int64_t>(fs::file_size(files[i], ec));
    if (ec) return NotFound("input " + files[i] + ": " + ec.message());
    total_bytes += sizes[i];
  }
  // Fisher-Yates with SplitMix64 rather than std::shuffle: std distributions differ between libraries,
  // and the split must be a pure function of (inputs, seed).
  std::vector<size_t> order(files.size());
  std::iota(order.begin(), order.end(), size_t{0});
  for (size_t i = order.size(); i > 1; --i)
    std::swap(order[i - 1], order[SplitMix64(opts.seed ^ SplitMix64(i)) % i]);

  for (const char* split : {"train", "valid"}) {
    std::error_code ec;
    fs::create_directory(staged.path() + "/" + split, ec);
    if (ec) return Internal("cannot create " + staged.path() + "/" + split + ": " + ec.message());
  }
  ShardWriter train(staged.path() + "/train", opts.shard_tokens, tok->vocab_size());
  ShardWriter valid(staged.path() + "/valid", opts.shard_tokens, tok->vocab_size());
  // Split by input bytes, not tokens, so one pass suffices: token totals are unknown until the end.
  int64_t valid_left = static_cast<int64_t>(std::ceil(opts.valid_fraction * static_cast<double>(total_bytes)));
  nlohmann::json inputs = nlohmann::json::array();
  std::vector<int64_t> doc_tokens(files.size());
  BTX_ASSIGN_OR_RETURN(DocumentEncoder enc, DocumentEncoder::Create(*tok));
  int64_t done_bytes = 0;
  for (size_t idx : order) {
    // A file's documents are one unit of the split: its tokens, and their loss flags when some are masked.
    std::vector<int32_t> ids;
    std::vector<uint8_t> loss;
    bool masked = false;
    int64_t docs = 0;
    BTX_RETURN_IF_ERROR(ForEachDocument(files[idx], opts.format, enc, [&](EncodedDocument&& d) -> Status {
      ++docs;
      if (!d.loss.empty() && !masked) {
        loss.assign(ids.size(), 1);
        masked = true;
      }
      ids.insert(ids.end(), d.ids.begin(), d.ids.end());
      if (masked) {
        if (d.loss.empty()) loss.insert(loss.end(), d.ids.size(), 1);
        else loss.insert(loss.end(), d.loss.begin(), d.loss.end());
      }
      return Status::Ok();
    }));
    // The sentencepiece tokenizer reports helper failures as an empty encoding (bos + eos alone).
    if (tok->kind() == "sentencepiece" && docs == 1 && sizes[idx] > 0 && ids.size() == 2)
      return Internal("tokenizing " + files[idx] + " failed");
    const int64_t doc_bytes = sizes[idx];
    size_t k = 0;
    if (valid_left > 0 && valid_left >= doc_bytes) {
      k = ids.size();
      valid_left -= doc_bytes;
    } else if (valid_left > 0) {
      k = static_cast<size_t>(std::llround(static_cast<double>(ids.size()) * static_cast<double>(valid_left) /
                                           static_cast<double>(doc_bytes)));
      valid_left = 0;
    }
    BTX_RETURN_IF_ERROR(valid.Add(ids.data(), masked ? loss.data() : nullptr, k));
    BTX_RETURN_IF_ERROR(train.Add(ids.data() + k, masked ? loss.data() + k : nullptr, ids.size() - k));
    doc_tokens[idx] = static_cast<int64_t>(ids.size());
    done_bytes += doc_bytes;
    if (opts.progress) opts.progress(done_bytes, total_bytes);
  }
  BTX_RETURN_IF_ERROR(train.Flush());
  BTX_RETURN_IF_ERROR(valid.Flush());
  for (size_t i = 0; i < files.size(); ++i)
    inputs.push_back({{"path", fs::absolute(files[i]).lexically_normal().string()},
                      {"bytes", sizes[i]},
                      {"tokens", doc_tokens[i]}});

  nlohmann::json tj = {{"type", tok->kind()},
                       {"vocab_size", tok->vocab_size()},
                       {"bos_id", tok->bos_id()},
                       {"eos_id", tok->eos_id()}};
  if (spm_vocab > 0) tj["model"] = "tokenizer.model";
  else if (!spm_model.empty()) tj["model"] = spm_model;
  else if (!model_dir.empty()) tj["model_dir"] = model_dir;
  auto split_json = [](const ShardWriter& w, const char* dir) {
    nlohmann::json shards = nlohmann::json::array();
    for (const auto& s : w.shards()) shards.push_back(std::string(dir) + "/" + s);
    return nlohmann::json{{"tokens", w.tokens()}, {"loss_tokens", w.loss_tokens()}, {"shards", shards}};
  };
  nlohmann::json manifest = {{"format", "btx-data-v1"},
                             {"tokenizer", tj},
                             {"seed", opts.seed},
                             {"data_format", DataFormatName(opts.format.format)},
                             {"text_field", opts.format.text_field},
                             {"valid_fraction", opts.valid_fraction},
                             {"shard_tokens", opts.shard_tokens},
                             {"inputs", inputs},
                             {"bytes", total_bytes},
                             {"tokens", train.tokens() + valid.tokens()},
                             {"train", split_json(train, "train")},
                             {"valid", split_json(valid, "valid")}};
  BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/manifest.json", manifest.dump(2) + "\n"));
  BTX_RETURN_IF_ERROR(staged.Publish());

  DataPrepareResult r;
  r.files = static_cast<int64_t>(files.size());
  r.bytes = total_bytes;
  r.train_tokens = train.tokens();
  r.valid_tokens = valid.tokens();
  r.train_shards = static_cast<int64_t>(train.shards().size());
  r.valid_shards = static_cast<int64_t>(valid.shards().size());
  r.loss_tokens = train.loss_tokens() + valid.loss_tokens();
  r.out = staged.final_path();
  return r;
}

}  // namespace btx::model
