// btx-model-tool: small model-dir utilities for interop checks and debugging.
//   btx-model-tool logits MODEL_DIR OUT.safetensors TOKEN...   logits [1, T, V] (float32) under key "logits";
//                                                               MoE: also "router_logits.L" [T, E] per layer
//   btx-model-tool init OUT_DIR CONFIG.json SEED                random model from an HF config.json, published
//   btx-model-tool report EVAL.json OUT_DIR                     eval.txt, routing.svg, routing.png of an eval
//                                                               job's eval.json (as the eval job writes them)
//   btx-model-tool data-prepare INPUT... --out DIR [--tokenizer byte|PATH.model|DIR|spm:VOCAB] [--format F]
//                  [--text-field NAME] [--valid-fraction F] [--shard-tokens N] [--seed S] [--progress-fd N]
//                                                               text, JSONL or chat -> train/valid *.btxtok shards
//                                                               (btxctl data prepare). Exit 65 on bad arguments or
//                                                               inputs.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "btx/model/data_prepare.h"
#include "btx/model/eval.h"
#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/safetensors.h"
#include "btx/model/tokenizer.h"

namespace {
int Fail(const std::string& m) {
  std::cerr << "btx-model-tool: " << m << "\n";
  return 1;
}
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  if (!a.empty() && a[0] == "data-prepare") {
    // --progress-fd N (btxctl's progress bar): "progress DONE TOTAL" input bytes after each file.
    int progress_fd = -1;
    std::vector<std::string> args;
    for (size_t i = 1; i < a.size(); ++i) {
      if (a[i] == "--progress-fd" && i + 1 < a.size()) progress_fd = std::atoi(a[++i].c_str());
      else args.push_back(a[i]);
    }
    auto opts = btx::model::ParseDataPrepareArgs(args);
    if (opts.ok() && progress_fd >= 0) {
      opts->progress = [progress_fd](int64_t done, int64_t total) {
        const std::string line = "progress " + std::to_string(done) + " " + std::to_string(total) + "\n";
        if (::write(progress_fd, line.data(), line.size()) < 0) {
        }  // a reader that went away only loses the bar
      };
    }
    auto r = opts.ok() ? btx::model::PrepareData(*opts) : btx::StatusOr<btx::model::DataPrepareResult>(opts.status());
    if (!r.ok()) {
      // 65 (EX_DATAERR, as btx-train uses it) separates "the user's arguments or data are wrong" from
      // I/O trouble, so btxctl can report the former as a usage error.
      const auto c = r.status().code();
      Fail(r.status().message());
      return c == btx::StatusCode::kInvalidArgument || c == btx::StatusCode::kNotFound ||
                     c == btx::StatusCode::kFailedPrecondition
                 ? 65
                 : 1;
    }
    std::cout << "prepared " << r->out << ": " << r->files << " files, " << r->bytes << " bytes; tokens train "
              << r->train_tokens << " / valid " << r->valid_tokens << "; shards train " << r->train_shards
              << " / valid " << r->valid_shards;
    if (r->loss_tokens != r->train_tokens + r->valid_tokens) std::cout << "; loss on " << r->loss_tokens << " tokens";
    std::cout << "\n";
    return 0;
  }
  if (a.size() >= 4 && a[0] == "logits") {
    auto m = btx::model::LoadModelDir(a[1]);
    if (!m.ok()) return Fail(m.status().message());
    at::Tensor tokens = at::empty({1, static_cast<int64_t>(a.size() - 3)}, at::kLong);
    for (size_t i = 3; i < a.size(); ++i) tokens.data_ptr<int64_t>()[i - 3] = static_cast<int64_t>(std::stoll(a[i]));
    at::NoGradGuard ng;
    const btx::model::ModelConfig& c = m->config();
    btx::model::ForwardOptions fo;
    fo.collect_ffn_inputs = c.is_moe();
    btx::model::ForwardOutput out = m->Forward(tokens, fo);
    std::vector<std::pair<std::string, at::Tensor>> t = {{"logits", out.logits.contiguous()}};
    // The router's input is the layer's normalised FFN input; its logits are what transformers reports as
    // router_logits, so routing can be compared directly and not only through the final logits.
    for (int64_t l = 0; c.is_moe() && l < c.num_hidden_layers; ++l)
      t.emplace_back("router_logits." + std::to_string(l),
                     at::linear(out.ffn_inputs[l].reshape({-1, c.hidden_size}),
                                m->param("model.layers." + std::to_string(l) + ".block_sparse_moe.gate.weight"))
                         .contiguous());
    auto st = btx::model::st::Write(a[2], t);
    return st.ok() ? 0 : Fail(st.message());
  }
  if (a.size() == 3 && a[0] == "report") {
    auto text = btx::ReadFile(a[1]);
    if (!text.ok()) return Fail(text.status().message());
    const nlohmann::json eval = nlohmann::json::parse(*text, nullptr, false);
    if (eval.is_discarded()) return Fail(a[1] + " is not JSON");
    std::filesystem::create_directories(a[2]);
    btx::Status st = btx::WriteFileDurable(a[2] + "/eval.txt", btx::model::EvalText(eval));
    const std::string svg = btx::model::RoutingSvg(eval), png = btx::model::RoutingPng(eval);
    if (st.ok() && !svg.empty()) st = btx::WriteFileDurable(a[2] + "/routing.svg", svg);
    if (st.ok() && !png.empty()) st = btx::WriteFileDurable(a[2] + "/routing.png", png);
    if (!st.ok()) return Fail(st.message());
    std::cout << "wrote " << a[2] << "/eval.txt" << (svg.empty() ? " (no MoE routing in " + a[1] + ")" : ", routing.svg")
              << (png.empty() ? "" : ", routing.png") << "\n";
    return 0;
  }
  if (a.size() == 4 && a[0] == "init") {
    auto text = btx::ReadFile(a[2]);
    if (!text.ok()) return Fail(text.status().message());
    auto cfg = btx::model::ConfigFromHfJson(nlohmann::json::parse(*text, nullptr, false));
    if (!cfg.ok()) return Fail(cfg.status().message());
    auto m = btx::model::LlamaModel::Init(*cfg, std::stoull(a[3]));
    if (!m.ok()) return Fail(m.status().message());
    {
      // Norm weights of 1 would hide a norm mix-up in an interop check: perturb them deterministically.
      at::NoGradGuard ng;
      auto gen = at::make_generator<at::CPUGeneratorImpl>(std::stoull(a[3]) + 1);
      for (auto& [name, p] : m->params())
        if (p.dim() == 1) p.add_(at::normal(0.0, 0.1, p.sizes(), gen, at::kFloat));
    }
    auto staged = btx::StagedDir::Create(a[1]);
    if (!staged.ok()) return Fail(staged.status().message());
    btx::Status st = btx::model::WriteModelFiles(*m, staged->path());
    if (st.ok() && cfg->vocab_size >= btx::model::kByteVocab) st = btx::model::MakeByteTokenizer()->SaveTo(staged->path());
    if (st.ok()) st = staged->Publish();
    return st.ok() ? 0 : Fail(st.message());
  }
  return Fail("usage: btx-model-tool logits MODEL_DIR OUT.safetensors TOKEN... | init OUT_DIR CONFIG.json SEED | "
              "report EVAL.json OUT_DIR | data-prepare INPUT... --out DIR");
}
