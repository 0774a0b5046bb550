// Shared helpers for the model tests: temp dirs, tiny configs, small corpora.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "btx/model/config.h"

namespace btx::model::testing {

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = (std::filesystem::temp_directory_path() /
             ("btx-test-" + std::to_string(::getpid()) + "-" + std::to_string(rd())))
                .string();
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline void WriteText(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

inline ModelConfig TinyConfig(int64_t experts = 0) {
  ModelConfig c;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.num_local_experts = experts;
  c.num_experts_per_tok = 2;
  return c;
}

// A few KB of text with learnable structure (repeated phrases with counters).
inline std::string SampleText(int lines, int salt = 0) {
  std::string s;
  for (int i = 0; i < lines; ++i)
    s += "line " + std::to_string((i * 7 + salt) % 100) + ": the quick brown fox jumps over " +
         std::to_string(i % 13 + salt) + " lazy dogs.\n";
  return s;
}

}  // namespace btx::model::testing
