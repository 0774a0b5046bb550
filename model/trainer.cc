#include "btx/model/trainer.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "btx/kernels/autocast.h"
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/safetensors.h"

namespace btx::model {
namespace fs = std::filesystem;
using nlohmann::json;


double LearningRate(const TrainConfig& c, int64_t step, int64_t total) {
  if (c.warmup > 0 && step < c.warmup) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup);
  if (c.schedule == "constant") return c.lr;
  const double span = std::max<int64_t>(1, total - c.warmup);
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup) / span);
  const double floor = c.lr * c.min_lr_ratio;
  if (c.schedule == "linear") return floor + (c.lr - floor) * (1.0 - progress);
  return floor + (c.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
}


bool IsFrozen(const std::string& name, const std::vector<std::string>& freeze) {
  for (const auto& f : freeze) {
    if (f == "all_but_router" && name.find("block_sparse_moe.gate.") == std::string::npos) return true;
    if (f == "experts" && (name.find(".experts.") != std::string::npos || name.find(".mlp.") != std::string::npos))
      return true;
    if (f == "attention" && name.find(".self_attn.") != std::string::npos) return true;
    if (f == "embeddings" && (name == "model.embed_tokens.weight" || name == "lm_head.weight")) return true;
    if (f == "norms" && name.find("norm.weight") != std::string::npos) return true;
  }
  return false;
}

Trainer::Trainer(LlamaModel* model, TrainConfig cfg, TrainOptions opts, std::vector<DomainData> data, TrainHooks hooks)
    : model_(model), cfg_(std::move(cfg)), opts_(std::move(opts)), data_(std::move(data)), hooks_(std::move(hooks)) {}

void Trainer::Emit(const json& j) {
  if (hooks_.emit && (!opts_.dp || opts_.dp->rank() == 0)) hooks_.emit(j);
}

Status Trainer::Init() {
  if (data_.empty()) return InvalidArgument("no training data");
  BTX_RETURN_IF_ERROR(model_->config().CheckSeqLen(cfg_.seq_len).With("train.seq_len"));
  for (const auto& f : opts_.freeze) {
    const auto& groups = contract::kFreezeGroups;
    if (std::find(groups.begin(), groups.end(), f) == groups.end()) return InvalidArgument("freeze: unknown group '" + f + "'");
  }
  std::vector<WindowSampler> samplers;
  std::vector<double> weights;
  for (size_t d = 0; d < data_.size(); ++d) {
    auto s = WindowSampler::Create(data_[d].train, cfg_.seq_len, SplitMix64(cfg_.seed + d));
    if (!s.ok()) return s.status().With("data '" + data_[d].name + "'");
    samplers.push_back(std::move(*s));
    if (!(data_[d].weight > 0)) return InvalidArgument("mixture weight of '" + data_[d].name + "' must be > 0");
    weights.push_back(data_[d].weight);
  }
  sampler_ = std::make_unique<MixtureSampler>(std::move(samplers), std::move(weights), cfg_.seed);
  if (opts_.device != "cpu") {
    c10::Device dev(opts_.device);
    if (dev.is_cuda() && !at::hasCUDA()) return FailedPrecondition("device " + opts_.device + ": LibTorch has no CUDA");
    model_->To(dev);
  }
  auto& params = model_->params();
  for (size_t i = 0; i < params.size(); ++i) {
    const bool train = !IsFrozen(params[i].first, opts_.freeze);
    params[i].second.requires_grad_(train);
    if (train) {
      trainable_.push_back(i);
      exp_avg_.push_back(at::zeros_like(params[i].second));
      exp_avg_sq_.push_back(at::zeros_like(params[i].second));
    }
  }
  if (trainable_.empty()) return InvalidArgument("freeze: every parameter is frozen");
  // Randomised ops (SparseMixer sampling, jitter) draw from the default generator; its state is checkpointed.
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_current_seed(cfg_.seed);
  return Status::Ok();
}

StatusOr<double> Trainer::TrainStep() {
  auto& params = model_->params();
  const int64_t micro = cfg_.micro_batch();
  const c10::Device dev = params.front().second.device();
  const bool cuda = dev.is_cuda();
  double loss_sum = 0;
  for (int64_t a = 0; a < cfg_.grad_accum; ++a) {
    // Every rank draws the whole micro-batch (the sampler is deterministic) and computes its slice of the rows,
    // so that R ranks see exactly the samples one rank would; the slice's loss is weighted by its share of the
    // rows and the gradients summed over ranks, which gives the one-rank mean.
    at::Tensor batch = sampler_->Next(micro, cfg_.seq_len);
    double share = 1.0, aux_share = 1.0;
    if (opts_.dp) {
      const auto [begin, end] = opts_.dp->Slice(micro);
      batch = batch.narrow(0, begin, end - begin);
      share = static_cast<double>(end - begin) / static_cast<double>(micro);
      aux_share = 1.0 / opts_.dp->world_size();
      if (end == begin) continue;
    }
    batch = batch.to(dev);
    at::Tensor input = batch.narrow(1, 0, cfg_.seq_len), target = batch.narrow(1, 1, cfg_.seq_len);
    ForwardOutput out;
    at::Tensor ce;
    {
      kernels::CudaAutocastScope amp(cuda);  // bf16 forward on GPUs; the backward runs outside autocast
      ForwardOptions fo;
      fo.training = true;
      fo.backend = opts_.backend;
      fo.top_k = opts_.top_k;
      out = model_->Forward(input, fo);
      at::Tensor logits = out.logits.to(at::kFloat);
      ce = at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}), -1), target.reshape({-1}));
    }
    at::Tensor loss = (ce * share + out.aux_loss * aux_share) / static_cast<double>(cfg_.grad_accum);
    loss.backward();
    loss_sum += ce.item<double>() * share;
  }
  at::NoGradGuard ng;
  if (opts_.dp) {
    std::vector<at::Tensor> grads;
    for (size_t i : trainable_) {
      at::Tensor& p = params[i].second;
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);  // a rank with no rows still takes part
      grads.push_back(p.grad());
    }
    BTX_RETURN_IF_ERROR(opts_.dp->AllReduceGradients(grads));
    BTX_ASSIGN_OR_RETURN(loss_sum, opts_.dp->Sum(loss_sum));
  }
  const double lr = LearningRate(cfg_, step_, opts_.steps);
  if (cfg_.grad_clip > 0) {
    std::vector<at::Tensor> norms;
    for (size_t i : trainable_)
      if (params[i].second.grad().defined()) norms.push_back(params[i].second.grad().pow(2).sum());
    const double total = std::sqrt(at::stack(norms).sum().item<double>());
    if (total > cfg_.grad_clip) {
      const double scale = cfg_.grad_clip / (total + 1e-6);
      for (size_t i : trainable_)
        if (params[i].second.grad().defined()) params[i].second.mutable_grad().mul_(scale);
    }
  }
  const double t = static_cast<double>(step_ + 1);
  const double bc1 = 1 - std::pow(cfg_.beta1, t), bc2 = 1 - std::pow(cfg_.beta2, t);
  for (size_t k = 0; k < trainable_.size(); ++k) {
    at::Tensor& p = params[trainable_[k]].second;
    if (!p.grad().defined()) continue;
    at::Tensor g = p.grad();
    // Decoupled weight decay (AdamW) on matrices only; norms and other vectors are not decayed.
    if (cfg_.weight_decay > 0 && p.dim() >= 2) p.mul_(1.0 - lr * cfg_.weight_decay);
    exp_avg_[k].mul_(cfg_.beta1).add_(g, 1.0 - cfg_.beta1);
    exp_avg_sq_[k].mul_(cfg_.beta2).addcmul_(g, g, 1.0 - cfg_.beta2);
    at::Tensor denom = (exp_avg_sq_[k].sqrt() / std::sqrt(bc2)).add_(cfg_.eps);
    p.addcdiv_(exp_avg_[k], denom, -lr / bc1);
    p.mutable_grad().reset();
  }
  ++step_;
  return loss_sum / static_cast<double>(cfg_.grad_accum);
}

StatusOr<TrainOutcome> Trainer::Run() {
  using clock = std::chrono::steady_clock;
  auto window_start = clock::now();
  int64_t window_tokens = 0;
  const int64_t tokens_per_step = cfg_.micro_batch() * cfg_.grad_accum * cfg_.seq_len;
  while (step_ < opts_.steps) {
    BTX_ASSIGN_OR_RETURN(last_loss_, TrainStep());
    window_tokens += tokens_per_step;
    if (!std::isfinite(last_loss_)) return Internal("loss is not finite at step " + std::to_string(step_));
    if (step_ % cfg_.log_every == 0 || step_ == opts_.steps) {
      const double secs = std::chrono::duration<double>(clock::now() - window_start).count();
      Emit({{"event", "progress"}, {"step", step_}, {"total_steps", opts_.steps}, {"loss", last_loss_},
            {"lr", LearningRate(cfg_, step_ - 1, opts_.steps)},
            {"tokens_per_s", secs > 0 ? window_tokens / secs : 0.0}, {"tokens", step_ * tokens_per_step}});
      window_start = clock::now();
      window_tokens = 0;
    }
    const bool stop = hooks_.stop && hooks_.stop->load();
    const bool periodic = cfg_.checkpoint_every > 0 && step_ % cfg_.checkpoint_every == 0;
    if (!opts_.checkpoint_dir.empty() && (periodic || stop || step_ == opts_.steps))
      BTX_RETURN_IF_ERROR(SaveCheckpoint());
    if (stop && step_ < opts_.steps) return TrainOutcome::kInterrupted;
  }
  return TrainOutcome::kCompleted;
}

namespace {
std::string StepDirName(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}
std::string Hex(const at::Tensor& bytes) {
  static const char* k = "0123456789abcdef";
  at::Tensor b = bytes.contiguous();
  const uint8_t* p = b.data_ptr<uint8_t>();
  std::string s;
  for (int64_t i = 0; i < b.numel(); ++i) {
    s.push_back(k[p[i] >> 4]);
    s.push_back(k[p[i] & 15]);
  }
  return s;
}
at::Tensor Unhex(const std::string& s) {
  at::Tensor t = at::empty({static_cast<int64_t>(s.size() / 2)}, at::kByte);
  uint8_t* p = t.data_ptr<uint8_t>();
  for (size_t i = 0; i + 1 < s.size(); i += 2) p[i / 2] = static_cast<uint8_t>(std::stoi(s.substr(i, 2), nullptr, 16));
  return t;
}
}  // namespace

Status Trainer::SaveCheckpoint() {
  if (opts_.dp && opts_.dp->rank() != 0) return Status::Ok();  // every rank holds the same state
  const std::string final_dir = opts_.checkpoint_dir + "/" + StepDirName(step_);
  if (fs::exists(final_dir)) {
    last_checkpoint_ = final_dir;
    return Status::Ok();
  }
  // On any error `staged` removes its temp dir on the way out, so a failed checkpoint (a full
  // disk) gives its space back and leaves the previous checkpoints as they were.
  auto write = [&]() -> Status {
    BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(final_dir));
    FileDigests digests;  // of the tensor files, hashed as written: the manifest does not read them again
    // Checkpoints hold the float32 weights whatever the output's dtype: resuming must be bit-exact.
    SaveOptions exact;
    exact.dtype = st::DType::kF32;
    BTX_RETURN_IF_ERROR(WriteModelFiles(*model_, staged.path(), exact, &digests));
    std::vector<std::pair<std::string, at::Tensor>> opt;
    const auto& params = model_->params();
    for (size_t k = 0; k < trainable_.size(); ++k) {
      opt.emplace_back("exp_avg/" + params[trainable_[k]].first, exp_avg_[k]);
      opt.emplace_back("exp_avg_sq/" + params[trainable_[k]].first, exp_avg_sq_[k]);
    }
    // Twice the model's size (Adam's two moments): hashed as written too.
    BTX_RETURN_IF_ERROR(st::Write(staged.path() + "/optimizer.safetensors", opt, {}, &digests["optimizer.safetensors"]));
    at::Tensor rng;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng = gen.get_state();
    }
    json state = {{"step", step_}, {"total_steps", opts_.steps}, {"samples_drawn", sampler_->drawn()},
                  {"cursors", sampler_->cursors()}, {"rng_state", Hex(rng)}, {"seed", cfg_.seed},
                  {"last_loss", last_loss_}};
    BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/trainer_state.json", state.dump(2)));
    if (hooks_.extra_files) BTX_RETURN_IF_ERROR(hooks_.extra_files(staged.path()));
    return staged.Publish(digests);
  };
  if (Status s = write(); !s.ok()) {
    // Attempts of one job share the checkpoint dir, and a stale attempt (its worker lost the lease
    // but has not killed it yet) may publish the same step first. Its checkpoint is as good as ours.
    if (fs::exists(final_dir) && VerifyManifest(final_dir).ok()) {
      last_checkpoint_ = final_dir;
      return Status::Ok();
    }
    return s.With("writing checkpoint " + final_dir);
  }
  last_checkpoint_ = final_dir;
  Emit({{"event", "checkpoint"}, {"step", step_}, {"path", final_dir}});
  // Keep the newest few; older ones are only disk.
  std::vector<std::string> all;
  for (auto& e : fs::directory_iterator(opts_.checkpoint_dir))
    if (e.is_directory() && e.path().filename().string().starts_with("step-")) all.push_back(e.path().string());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + static_cast<size_t>(std::max<int64_t>(1, cfg_.keep_checkpoints)) < all.size(); ++i) {
    std::error_code ec;
    fs::remove_all(all[i], ec);
  }
  return Status::Ok();
}

Status Trainer::ResumeFromLatest() {
  if (opts_.checkpoint_dir.empty() || !fs::is_directory(opts_.checkpoint_dir)) return Status::Ok();
  std::vector<std::string> all;
  for (auto& e : fs::directory_iterator(opts_.checkpoint_dir))
    if (e.is_directory() && e.path().filename().string().starts_with("step-")) all.push_back(e.path().string());
  std::sort(all.rbegin(), all.rend());
  for (const auto& dir : all) {
    Status v = VerifyManifest(dir);
    if (!v.ok()) {
      std::cerr << "btx: skipping checkpoint that does not verify: " << v.message() << "\n";
      continue;
    }
    return ResumeFrom(dir);
  }
  return Status::Ok();
}

Status Trainer::ResumeFrom(const std::string& dir) {
  BTX_ASSIGN_OR_RETURN(LlamaModel saved, LoadModelDir(dir));
  auto& params = model_->params();
  if (saved.params().size() != params.size()) return FailedPrecondition(dir + ": checkpoint does not match the model");
  at::NoGradGuard ng;
  for (size_t i = 0; i < params.size(); ++i) {
    if (saved.params()[i].first != params[i].first || !saved.params()[i].second.sizes().equals(params[i].second.sizes()))
      return FailedPrecondition(dir + ": checkpoint tensor " + saved.params()[i].first + " does not match the model");
    params[i].second.copy_(saved.params()[i].second);
  }
  BTX_ASSIGN_OR_RETURN(auto opt, st::File::Open(dir + "/optimizer.safetensors"));
  for (size_t k = 0; k < trainable_.size(); ++k) {
    const std::string& name = params[trainable_[k]].first;
    BTX_ASSIGN_OR_RETURN(at::Tensor m, opt->Load("exp_avg/" + name));
    BTX_ASSIGN_OR_RETURN(at::Tensor v, opt->Load("exp_avg_sq/" + name));
    exp_avg_[k].copy_(m);
    exp_avg_sq_[k].copy_(v);
  }
  BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(dir + "/trainer_state.json"));
  try {
    json s = json::parse(text);
    step_ = s.at("step").get<int64_t>();
    last_loss_ = s.value("last_loss", 0.0);
    auto cursors = s.at("cursors").get<std::vector<uint64_t>>();
    if (cursors.size() != data_.size()) return FailedPrecondition(dir + ": checkpoint has a different number of domains");
    sampler_->Restore(s.at("samples_drawn").get<uint64_t>(), cursors);
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(Unhex(s.at("rng_state").get<std::string>()));
  } catch (const std::exception& e) {
    return DataLoss(dir + "/trainer_state.json: " + e.what());
  }
  last_checkpoint_ = dir;
  std::cerr << "btx: resumed from " << dir << " at step " << step_ << "\n";
  return Status::Ok();
}

std::map<std::string, double> Trainer::Validate() {
  std::map<std::string, double> out;
  at::NoGradGuard ng;
  for (const auto& d : data_) {
    if (!d.valid || d.valid->size() < 2) continue;
    double total = 0;
    int64_t count = 0;
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(d.valid->size()), cfg_.valid_tokens + 1);
    for (int64_t start = 0; start + 1 < n; start += cfg_.seq_len) {
      const int64_t len = std::min(cfg_.seq_len, n - 1 - start);
      at::Tensor seq = at::empty({1, len + 1}, at::kLong);
      for (int64_t i = 0; i <= len; ++i) seq.data_ptr<int64_t>()[i] = (*d.valid)[start + i];
      seq = seq.to(model_->params().front().second.device());
      ForwardOptions fo;
      fo.backend = opts_.backend;
      fo.top_k = opts_.top_k;
      at::Tensor logits = model_->Forward(seq.narrow(1, 0, len), fo).logits.to(at::kFloat);
      at::Tensor nll = at::nll_loss(at::log_softmax(logits.reshape({len, -1}), -1), seq.narrow(1, 1, len).reshape({len}),
                                    {}, at::Reduction::Sum);
      total += nll.item<double>();
      count += len;
    }
    if (count > 0) out[d.name] = total / static_cast<double>(count);
  }
  return out;
}

}  // namespace btx::model
