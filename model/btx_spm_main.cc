// btx-spm: sentencepiece in its own process (libsentencepiece's bundled protobuf cannot share a process
// with LibTorch's). Used by btx::model::Tokenizer; not meant to be run by hand, but simple enough to:
//   btx-spm train  MODEL VOCAB_SIZE FILE...      train a BPE model (one thread: deterministic)
//   btx-spm info   MODEL                          print "vocab_size bos_id eos_id"
//   btx-spm encode MODEL OUT.btxtok FILE          tokenize FILE (no bos/eos) into a token shard
//   btx-spm decode MODEL IN.btxtok                print the text of a token shard
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <iostream>
#include <string>
#include <vector>

#include "btx/contract/files.h"
#include "btx/model/token_shard.h"

namespace {
int Fail(const std::string& m) {
  std::cerr << "btx-spm: " << m << "\n";
  return 2;
}
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  if (a.size() < 2) return Fail("usage: btx-spm train|info|encode|decode MODEL ...");
  const std::string& cmd = a[0];
  const std::string& model = a[1];
  if (cmd == "train") {
    if (a.size() < 4) return Fail("usage: btx-spm train MODEL VOCAB_SIZE FILE...");
    std::string inputs;
    for (size_t i = 3; i < a.size(); ++i) inputs += (inputs.empty() ? "" : ",") + a[i];
    std::string prefix = model.substr(0, model.size() - (model.ends_with(".model") ? 6 : 0));
    std::string args = "--input=" + inputs + " --model_prefix=" + prefix + " --vocab_size=" + a[2] +
                       " --model_type=bpe --character_coverage=1.0 --byte_fallback=true --unk_id=0 --bos_id=1"
                       " --eos_id=2 --pad_id=-1 --num_threads=1 --minloglevel=1 --hard_vocab_limit=false"
                       " --input_sentence_size=200000 --shuffle_input_sentence=false";
    auto st = sentencepiece::SentencePieceTrainer::Train(args);
    if (!st.ok()) return Fail("training failed: " + st.ToString());
    return 0;
  }
  sentencepiece::SentencePieceProcessor sp;
  auto st = sp.Load(model);
  if (!st.ok()) return Fail("cannot load " + model + ": " + st.ToString());
  if (cmd == "info") {
    std::cout << sp.GetPieceSize() << " " << sp.bos_id() << " " << sp.eos_id() << "\n";
    return 0;
  }
  if (cmd == "encode" && a.size() == 4) {
    auto text = btx::ReadFile(a[3]);
    if (!text.ok()) return Fail(text.status().message());
    std::vector<int> ids;
    auto es = sp.Encode(*text, &ids);
    if (!es.ok()) return Fail("encode failed: " + es.ToString());
    auto ws = btx::model::WriteTokenShard(a[2], std::vector<int32_t>(ids.begin(), ids.end()), sp.GetPieceSize());
    if (!ws.ok()) return Fail(ws.message());
    return 0;
  }
  if (cmd == "decode" && a.size() == 3) {
    auto ids = btx::model::ReadTokenShard(a[2]);
    if (!ids.ok()) return Fail(ids.status().message());
    std::string text;
    auto ds = sp.Decode(std::vector<int>(ids->begin(), ids->end()), &text);
    if (!ds.ok()) return Fail("decode failed: " + ds.ToString());
    std::cout << text;
    return 0;
  }
  return Fail("unknown command or wrong arguments: " + cmd);
}
