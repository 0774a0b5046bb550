// Tokenizers: byte-level (256 bytes + bos/eos/pad), Hugging Face tokenizer.json (byte-level BPE: Llama 3, Qwen2,
// GPT-2, SmolLM) and sentencepiece (optional, when the library has it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "btx/contract/status.h"

namespace btx::model {

// A model dir's chat template (tokenizer_config.json `chat_template`, or chat_template.jinja) and the special
// tokens it refers to by name. `source` empty: the tokenizer carries none.
struct ChatTemplateSource {
  std::string source, origin, bos_token, eos_token;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1: none (Qwen2 has no BOS token)
  virtual int32_t eos_id() const = 0;  // -1: none
  virtual std::string kind() const = 0;  // "byte" | "huggingface" | "sentencepiece"
  // Writes the files that let LoadTokenizer(dir) rebuild this tokenizer from a model directory.
  virtual Status SaveTo(const std::string& dir) const = 0;
  virtual StatusOr<ChatTemplateSource> chat_template() const { return ChatTemplateSource{}; }
};

inline constexpr int32_t kByteBos = 256, kByteEos = 257, kBytePad = 258, kByteVocab = 259;
std::unique_ptr<Tokenizer> MakeByteTokenizer();

bool SentencePieceAvailable();
StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePiece(const std::string& model_path);
// Trains a BPE sentencepiece model on text files (deterministic: one thread, fixed seed) and writes it to
// `model_path`.
StatusOr<std::unique_ptr<Tokenizer>> TrainSentencePiece(const std::vector<std::string>& text_files, int vocab_size,
                                                        const std::string& model_path);

// From a model dir, the first that applies: btx_tokenizer.json ({"type": "byte"}); tokenizer.json (Hugging Face)
// when btx can read it; tokenizer.model (sentencepiece, e.g. a Llama 2 or Mistral dir whose tokenizer.json is
// a Metaspace one btx refuses). BOS and EOS come from tokenizer_config.json, else config.json's ids.
StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir);
bool HasTokenizer(const std::string& model_dir);

}  // namespace btx::model
