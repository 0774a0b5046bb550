#include "btx/model/tokenizer.h"

#include <fcntl.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "btx/contract/files.h"

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <sstream>

#include "btx/model/token_shard.h"
#ifdef BTX_HAVE_HF_TOKENIZER
#include "hf_tokenizer.h"
#endif

extern char** environ;

namespace btx::model {
namespace fs = std::filesystem;

namespace {

// What AutoTokenizer and generate() read besides the model's own files.
constexpr const char* kHfTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                             "generation_config.json", "chat_template.jinja"};

// Copies those of kHfTokenizerFiles that `from_dir` has into `to_dir`.
Status CopyHfTokenizerFiles(const std::string& from_dir, const std::string& to_dir) {
  for (const char* f : kHfTokenizerFiles) {
    const std::string from = from_dir + "/" + f;
    if (!fs::exists(from)) continue;
    BTX_ASSIGN_OR_RETURN(std::string bytes, ReadFile(from));
    BTX_RETURN_IF_ERROR(WriteFileDurable(to_dir + "/" + f, bytes));
  }
  return Status::Ok();
}

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> out(text.size());
    for (size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
    return out;
  }
  std::string Decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    for (int32_t id : ids)
      if (id >= 0 && id < 256) s.push_back(static_cast<char>(id));
    return s;
  }
  int64_t vocab_size() const override { return kByteVocab; }
  int32_t bos_id() const override { return kByteBos; }
  int32_t eos_id() const override { return kByteEos; }
  std::string kind() const override { return "byte"; }
  Status SaveTo(const std::string& dir) const override {
    nlohmann::json j = {{"type", "byte"}, {"vocab_size", kByteVocab}, {"bos_id", kByteBos}, {"eos_id", kByteEos},
                        {"pad_id", kBytePad}};
    return WriteFileDurable(dir + "/btx_tokenizer.json", j.dump(2));
  }
};

#ifdef BTX_HAVE_SENTENCEPIECE
// The btx-spm helper: next to the running executable, $BTX_SPM, the build tree, or PATH.
std::string SpmHelper() {
  if (const char* env = std::getenv("BTX_SPM")) return env;
  std::error_code ec;
  auto self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec && fs::exists(self.parent_path() / "btx-spm")) return (self.parent_path() / "btx-spm").string();
#ifdef BTX_SPM_BUILD_PATH
  if (fs::exists(BTX_SPM_BUILD_PATH)) return BTX_SPM_BUILD_PATH;
#endif
  return "btx-spm";
}

// Runs the helper; stdout goes to `out_file` when given.
Status RunSpm(const std::vector<std::string>& args, const std::string& out_file = "") {
  std::vector<std::string> argv_s = {SpmHelper()};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (!out_file.empty()) posix_spawn_file_actions_addopen(&fa, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid;
  int rc = posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return FailedPrecondition("cannot run the sentencepiece helper " + argv_s[0]);
  int wst = 0;
  while (waitpid(pid, &wst, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(wst) || WEXITSTATUS(wst) != 0)
    return InvalidArgument("sentencepiece helper failed: " + argv_s[1] + " " + argv_s[2]);
  return Status::Ok();
}

std::string TempPath(const std::string& suffix) {
  std::random_device rd;
  return (fs::temp_directory_path() / ("btx-spm-" + std::to_string(::getpid()) + "-" + std::to_string(rd()) + suffix))
      .string();
}

class SpTokenizer final : public Tokenizer {
 public:
  explicit SpTokenizer(std::string path) : path_(std::move(path)) {}
  Status Init() {
    const std::string info = TempPath(".txt");
    Status st = RunSpm({"info", path_}, info);
    auto text = ReadFile(info);
    fs::remove(info);
    BTX_RETURN_IF_ERROR(st);
    if (!text.ok()) return text.status();
    std::istringstream in(*text);
    if (!(in >> vocab_ >> bos_ >> eos_)) return InvalidArgument("sentencepiece model " + path_ + ": cannot read info");
    if (bos_ < 0 || eos_ < 0) return InvalidArgument("sentencepiece model " + path_ + " needs bos and eos pieces");
    return Status::Ok();
  }
  std::vector<int32_t> Encode(std::string_view text) const override {
    const std::string in = TempPath(".txt"), out = TempPath(".btxtok");
    std::vector<int32_t> ids;
    if (WriteFileDurable(in, std::string(text)).ok() && RunSpm({"encode", path_, out, in}).ok()) {
      auto r = ReadTokenShard(out);
      if (r.ok()) ids = std::move(*r);
    }
    fs::remove(in);
    fs::remove(out);
    return ids;
  }
  std::string Decode(const std::vector<int32_t>& ids) const override {
    const std::string in = TempPath(".btxtok"), out = TempPath(".txt");
    std::string text;
    if (WriteTokenShard(in, ids, 0).ok() && RunSpm({"decode", path_, in}, out).ok()) {
      auto r = ReadFile(out);
      if (r.ok()) text = std::move(*r);
    }
    fs::remove(in);
    fs::remove(out);
    return text;
  }
  int64_t vocab_size() const override { return vocab_; }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  std::string kind() const override { return "sentencepiece"; }
  Status SaveTo(const std::string& dir) const override {
    BTX_ASSIGN_OR_RETURN(std::string bytes, ReadFile(path_));
    BTX_RETURN_IF_ERROR(WriteFileDurable(dir + "/tokenizer.model", bytes));
    // A seed's tokenizer.model comes with the files transformers reads (its tokenizer_config.json with the chat
    // template, generation_config.json, ...): outputs carry them too. A .model file named by a spec stands alone.
    if (fs::path(path_).filename() != "tokenizer.model") return Status::Ok();
    return CopyHfTokenizerFiles(fs::path(path_).parent_path().string(), dir);
  }

 private:
  std::string path_;
  int64_t vocab_ = 0;
  int32_t bos_ = -1, eos_ = -1;
};
#endif
}  // namespace

std::unique_ptr<Tokenizer> MakeByteTokenizer() { return std::make_unique<ByteTokenizer>(); }

bool SentencePieceAvailable() {
#ifdef BTX_HAVE_SENTENCEPIECE
  return true;
#else
  return false;
#endif
}

StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& model_path) {
#ifdef BTX_HAVE_SENTENCEPIECE
  auto t = std::make_unique<SpTokenizer>(model_path);
  BTX_RETURN_IF_ERROR(t->Init());
  return std::unique_ptr<Tokenizer>(std::move(t));
#else
  return FailedPrecondition("this build has no sentencepiece support (" + model_path + ")");
#endif
}

StatusOr<std::unique_ptr<Tokenizer>> TrainSentencePiece(const std::vector<std::string>& text_files, int vocab_size,
                                                        const std::string& model_path) {
#ifdef BTX_HAVE_SENTENCEPIECE
  if (text_files.empty()) return InvalidArgument("no text files to train the sentencepiece model on");
  if (vocab_size < 32) return InvalidArgument("sentencepiece vocab_size must be >= 32");
  std::vector<std::string> args = {"train", model_path, std::to_string(vocab_size)};
  args.insert(args.end(), text_files.begin(), text_files.end());
  BTX_RETURN_IF_ERROR(RunSpm(args));
  return LoadSentencePiece(model_path);
#else
  (void)text_files;
  (void)vocab_size;
  return FailedPrecondition("this build has no sentencepiece support; cannot train " + model_path);
#endif
}

namespace {

#ifdef BTX_HAVE_HF_TOKENIZER
// Hugging Face tokenizer.json, with the special tokens its tokenizer_config.json (or config.json) names. SaveTo
// copies every tokenizer file of the source dir, so outputs load with AutoTokenizer as the seed did.
class HfDirTokenizer final : public Tokenizer {
 public:
  static StatusOr<std::unique_ptr<Tokenizer>> Open(const std::string& dir) {
    BTX_ASSIGN_OR_RETURN(HfTokenizer hf, HfTokenizer::Load(dir + "/tokenizer.json"));
    auto t = std::unique_ptr<HfDirTokenizer>(new HfDirTokenizer(dir, std::move(hf)));
    BTX_ASSIGN_OR_RETURN(t->bos_, t->SpecialId("bos"));
    BTX_ASSIGN_OR_RETURN(t->eos_, t->SpecialId("eos"));
    return std::unique_ptr<Tokenizer>(std::move(t));
  }
  std::vector<int32_t> Encode(std::string_view text) const override { return hf_.Encode(text); }
  std::string Decode(const std::vector<int32_t>& ids) const override { return hf_.Decode(ids); }
  int64_t vocab_size() const override { return hf_.vocab_size(); }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  std::string kind() const override { return "huggingface"; }
  // transformers' order: chat_template.jinja beside the config wins over the config's chat_template, which is a
  // string or a list of {name, template} (the one named "default" is apply_chat_template's).
  StatusOr<ChatTemplateSource> chat_template() const override {
    ChatTemplateSource out;
    const std::string config_path = dir_ + "/tokenizer_config.json";
    nlohmann::json config = nlohmann::json::object();
    if (auto text = ReadFile(config_path); text.ok()) {
      config = nlohmann::json::parse(*text, nullptr, false);
      if (!config.is_object()) return InvalidArgument(config_path + ": not a JSON object");
    }
    auto token = [&](const char* key) {
      const nlohmann::json v = config.value(key, nlohmann::json());
      return v.is_string() ? v.get<std::string>() : v.is_object() ? v.value("content", std::string()) : std::string();
    };
    out.bos_token = token("bos_token");
    out.eos_token = token("eos_token");
    if (auto jinja = ReadFile(dir_ + "/chat_template.jinja"); jinja.ok()) {
      out.source = *jinja;
      out.origin = dir_ + "/chat_template.jinja";
      return out;
    }
    const nlohmann::json t = config.value("chat_template", nlohmann::json());
    out.origin = config_path + " chat_template";
    if (t.is_string()) {
      out.source = t.get<std::string>();
    } else if (t.is_array()) {
      for (const auto& e : t)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
          out.source = e["template"].get<std::string>();
      if (out.source.empty()) return InvalidArgument(out.origin + ": a list without a template named \"default\"");
    } else if (!t.is_null()) {
      return InvalidArgument(out.origin + ": expected a string or a list of {name, template}");
    }
    return out;
  }
  Status SaveTo(const std::string& dir) const override { return CopyHfTokenizerFiles(dir_, dir); }

 private:
  HfDirTokenizer(std::string dir, HfTokenizer hf) : dir_(std::move(dir)), hf_(std::move(hf)) {}

  // tokenizer_config.json's "<which>_token" (a string or {"content": ...}), else config.json's "<which>_token_id";
  // -1 when neither names one. A token the vocabulary lacks is an error, not a silent -1.
  StatusOr<int32_t> SpecialId(const std::string& which) const {
    const std::string key = which + "_token";
    if (auto text = ReadFile(dir_ + "/tokenizer_config.json"); text.ok()) {
      const auto j = nlohmann::json::parse(*text, nullptr, false);
      if (j.is_object() && j.contains(key) && !j[key].is_null()) {
        const nlohmann::json& v = j[key];
        const std::string content = v.is_string() ? v.get<std::string>() : v.value("content", std::string());
        if (auto id = hf_.TokenToId(content)) return *id;
        return InvalidArgument(dir_ + "/tokenizer_config.json: " + key + " '" + content + "' is not in tokenizer.json");
      }
    }
    if (auto text = ReadFile(dir_ + "/config.json"); text.ok()) {
      const auto j = nlohmann::json::parse(*text, nullptr, false);
      if (j.is_object() && j.contains(key + "_id") && j[key + "_id"].is_number_integer()) return j[key + "_id"].get<int32_t>();
    }
    return -1;
  }

  std::string dir_;
  HfTokenizer hf_;
  int32_t bos_ = -1, eos_ = -1;
};
#else
struct HfDirTokenizer {
  static StatusOr<std::unique_ptr<Tokenizer>> Open(const std::string& dir) {
    return FailedPrecondition(dir + "/tokenizer.json: this build has no Hugging Face tokenizer.json support "
                              "(built without libpcre2-8 / libutf8proc)");
  }
};
#endif

}  // namespace

bool HasTokenizer(const std::string& dir) {
  return fs::exists(dir + "/btx_tokenizer.json") || fs::exists(dir + "/tokenizer.json") ||
         fs::exists(dir + "/tokenizer.model");
}

StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir) {
  if (fs::exists(dir + "/btx_tokenizer.json")) {
    BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(dir + "/btx_tokenizer.json"));
    try {
      auto j = nlohmann::json::parse(text);
      if (j.at("type") == "byte") return MakeByteTokenizer();
      return InvalidArgument(dir + "/btx_tokenizer.json: unknown type " + j.at("type").dump());
    } catch (const std::exception& e) {
      return InvalidArgument(dir + "/btx_tokenizer.json: " + e.what());
    }
  }
  if (fs::exists(dir + "/tokenizer.json")) {
    // A tokenizer.json btx refuses (e.g. a Metaspace one) may sit beside its sentencepiece model.
    auto hf = HfDirTokenizer::Open(dir);
    if (hf.ok() || !fs::exists(dir + "/tokenizer.model")) return hf;
  }
  if (fs::exists(dir + "/tokenizer.model")) return LoadSentencePiece(dir + "/tokenizer.model");
  return NotFound(dir + ": no tokenizer (btx_tokenizer.json, tokenizer.json or tokenizer.model)");
}

}  // namespace btx::model
