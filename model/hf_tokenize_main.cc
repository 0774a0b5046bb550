// btx_hf_tokenize: encodes or decodes with btx::model::HfTokenizer, for comparisons with the Python `tokenizers`.
//   btx_hf_tokenize TOKENIZER_JSON INPUT OUTPUT            INPUT: documents separated by NUL bytes;
//                                                          OUTPUT: one line of space-separated ids per document
//   btx_hf_tokenize --decode TOKENIZER_JSON INPUT OUTPUT   the reverse: ids lines in, NUL-separated texts out
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "hf_tokenizer.h"

namespace {

bool ReadAll(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::stringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const bool decode = !args.empty() && args[0] == "--decode";
  if (decode) args.erase(args.begin());
  if (args.size() != 3) {
    std::fprintf(stderr, "usage: btx_hf_tokenize [--decode] TOKENIZER_JSON INPUT OUTPUT\n");
    return 2;
  }
  auto tok = btx::model::HfTokenizer::Load(args[0]);
  if (!tok.ok()) {
    std::fprintf(stderr, "btx_hf_tokenize: %s\n", tok.status().ToString().c_str());
    return 1;
  }
  std::string in;
  if (!ReadAll(args[1], &in)) {
    std::fprintf(stderr, "btx_hf_tokenize: cannot read %s\n", args[1].c_str());
    return 1;
  }
  std::string out;
  if (!decode) {
    size_t pos = 0;
    while (true) {
      const size_t end = in.find('\0', pos);
      const std::string_view doc(in.data() + pos, (end == std::string::npos ? in.size() : end) - pos);
      bool first = true;
      for (int32_t id : tok->Encode(doc)) {
        if (!first) out += ' ';
        out += std::to_string(id);
        first = false;
      }
      out += '\n';
      if (end == std::string::npos) break;
      pos = end + 1;
    }
  } else {
    std::istringstream lines(in);
    std::string line;
    bool first = true;
    while (std::getline(lines, line)) {
      std::vector<int32_t> ids;
      std::istringstream nums(line);
      long long v;
      while (nums >> v) ids.push_back(static_cast<int32_t>(v));
      if (!first) out += '\0';
      out += tok->Decode(ids);
      first = false;
    }
  }
  std::ofstream f(args[2], std::ios::binary);
  f << out;
  if (!f) {
    std::fprintf(stderr, "btx_hf_tokenize: cannot write %s\n", args[2].c_str());
    return 1;
  }
  return 0;
}
