#include "btx/model/trainer.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "btx/kernels/autocast.h"
#include "btx/kernels/chunked_loss.h"
#include "btx/kernels/fused_adamw.h"
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "btx/contract/files.h"
#include "btx/model/hf_io.h"
#include "btx/model/memory_model.h"
#include "btx/model/safetensors.h"

namespace btx::model {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {
}  // namespace


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
    auto s = WindowSampler::Create(data_[d].train, cfg_.seq_len, SplitMix64(cfg_.seed + d), data_[d].train_loss);
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
      // The optimizer updates flat views of the parameters: they must be dense.
      if (!params[i].second.is_contiguous()) return Internal("parameter " + params[i].first + " is not contiguous");
      trainable_.push_back(i);
      flat_offsets_.push_back(flat_numel_);
      flat_numel_ += params[i].second.numel();
    }
  }
  if (trainable_.empty()) return InvalidArgument("freeze: every parameter is frozen");
  // ZeRO-1: rank r owns elements [r·S, (r+1)·S) of the flat trainable parameters, S = ceil(N / R) (the last
  // shards may be short or empty); equal strides let the all-gather exchange equal-sized buffers. ZeRO-3 shards
  // each unit (a decoder layer's trainable parameters, or the rest) that way instead (zero3.h): a rank owns
  // several ranges of the flat layout, and its optimizer state is their concatenation.
  const int world = opts_.dp ? opts_.dp->world_size() : 1;
  zero3_ = world > 1 && cfg_.zero == 3;
  zero_ = world > 1 && (cfg_.zero == 1 || zero3_);
  device_ = params[trainable_.front()].second.device();
  if (zero3_ && cfg_.micro_batch() < world) {
    // The layers' gathers and reduce-scatters are collectives inside forward and backward: every rank needs rows.
    return InvalidArgument("train.zero 3 on " + std::to_string(world) + " ranks needs micro-batches of at least " +
                           std::to_string(world) + " sequences (got " + std::to_string(cfg_.micro_batch()) +
                           "): raise train.batch_tokens or lower train.grad_accum");
  }
  shard_size_ = zero_ ? (flat_numel_ + world - 1) / world : flat_numel_;
  const int rank = opts_.dp ? opts_.dp->rank() : 0;
  shard_begin_ = zero_ && !zero3_ ? std::min(flat_numel_, rank * shard_size_) : 0;
  shard_end_ = zero_ && !zero3_ ? std::min(flat_numel_, shard_begin_ + shard_size_) : flat_numel_;
  const auto state_opts = params[trainable_.front()].second.options().dtype(at::kFloat).requires_grad(false);
  if (zero3_) {
    // Units: the trainable parameters of each decoder layer, and the rest (embeddings, final norm, lm_head).
    const int64_t layers = model_->config().num_hidden_layers;
    units_.resize(static_cast<size_t>(layers) + 1);
    unit_members_.resize(units_.size());
    for (auto& u : units_) u = std::make_shared<ShardedUnit>();
    for (size_t k = 0; k < trainable_.size(); ++k) {
      const auto& [name, t] = params[trainable_[k]];
      size_t u = 0;
      if (name.starts_with("model.layers.")) {
        u = 1 + std::stoul(name.substr(std::string("model.layers.").size()));
        if (u > static_cast<size_t>(layers)) return Internal("parameter " + name + " outside the model's layers");
      }
      units_[u]->Add(name, t.sizes().vec());
      unit_members_[u].push_back(k);
    }
    for (auto& u : units_) u->Finish(world);
    segments_ = Zero3SegmentsOf(rank);
    int64_t owned = 0;
    for (const Segment& sg : segments_) owned += sg.len;
    shard_end_ = owned;  // the optimizer state's length (its elements are OwnedRanges(rank), not [begin, end))
    at::NoGradGuard ng;
    for (size_t u = 0; u < units_.size(); ++u) {
      at::Tensor sh = at::zeros({units_[u]->shard}, state_opts);
      for (const Segment& sg : segments_)
        if (sg.unit == u)
          sh.narrow(0, sg.unit_off, sg.len).copy_(params[trainable_[sg.k]].second.reshape({-1}).narrow(0, sg.param_off, sg.len));
      unit_shard_.push_back(sh.requires_grad_(true));
    }
    std::vector<size_t> all(trainable_.size());
    for (size_t k = 0; k < all.size(); ++k) all[k] = k;
    ToPlaceholders(all);  // from here on only the shards hold the trainable weights
    comm_ = MakeShardComm(opts_.dp);
  } else {
    segments_ = SegmentsOf(shard_begin_, shard_end_);
    if (zero_) {
      for (int r = 0; r < world; ++r)
        rank_segments_.push_back(SegmentsOf(std::min(flat_numel_, r * shard_size_), std::min(flat_numel_, (r + 1) * shard_size_)));
    }
  }
  exp_avg_ = at::zeros({shard_end_ - shard_begin_}, state_opts);
  exp_avg_sq_ = at::zeros({shard_end_ - shard_begin_}, state_opts);
  if (opts_.dp && !zero3_) {
    std::vector<at::Tensor> tp;
    for (size_t i : trainable_) tp.push_back(params[i].second);
    const DistConfig& dc = opts_.dp->config();
    reducer_ = std::make_unique<GradReducer>(opts_.dp, std::move(tp), dc.bucket_bytes, dc.overlap);
  }
  // Randomised ops (SparseMixer sampling, jitter) draw from the default generator; its state is checkpointed.
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_current_seed(cfg_.seed);
  return Status::Ok();
}

StatusOr<double> Trainer::TrainStep() {
  auto& params = model_->params();
  const int64_t micro = cfg_.micro_batch();
  const c10::Device dev = device_;
  const bool cuda = dev.is_cuda();
  double loss_sum = 0;
  // ZeRO-3: the outer unit is whole for the step; each layer gathers its parameters when it runs.
  if (zero3_) BTX_RETURN_IF_ERROR(GatherOuterUnit());
  for (int64_t a = 0; a < cfg_.grad_accum; ++a) {
    // Every rank draws the whole micro-batch (the sampler is deterministic) and computes its slice of the rows,
    // so that R ranks see exactly the samples one rank would; the slice's loss is weighted by its share of the
    // rows and the gradients summed over ranks, which gives the one-rank mean.
    // Targets are kIgnoreIndex (-100) where the loss does not count (chat: all but assistant tokens); the CE is the
    // mean over the counted ones, so a rank's share is its slice's share of the micro-batch's counted targets.
    MixtureSampler::Batch drawn = sampler_->NextBatch(micro, cfg_.seq_len);
    at::Tensor batch = drawn.tokens, targets = drawn.targets;
    double share = 1.0, aux_share = 1.0;
    if (opts_.dp) {
      const auto [begin, end] = opts_.dp->Slice(micro);
      batch = batch.narrow(0, begin, end - begin);
      targets = targets.narrow(0, begin, end - begin);
      share = CountedShare(drawn.targets, begin, end);
      aux_share = 1.0 / opts_.dp->world_size();
      if (end == begin) continue;
    }
    batch = batch.to(dev);
    at::Tensor input = batch.narrow(1, 0, cfg_.seq_len), target = targets.to(dev);
    ForwardOutput out;
    at::Tensor ce;
    // ZeRO-3's collectives run inside forward and backward; a failed one throws.
    try {
    {
      // bf16 forward with `train.precision: bf16`; the backward runs outside autocast
      kernels::CudaAutocastScope amp(cuda && cfg_.precision == "bf16");
      // The forward in bf16; weights stay float32 and the cast cache is dropped after (autocast.h).
      kernels::CpuAutocastScope cpu_amp(!cuda && cfg_.precision == "bf16");
      ForwardOptions fo;
      fo.training = true;
      fo.backend = opts_.backend;
      fo.top_k = opts_.top_k;
      ApplyMemoryOptions(cfg_, fo);
      if (zero3_) {
        fo.layer_runner = [this](int64_t l, const at::Tensor& x, const LayerFn& fn) {
          const size_t u = static_cast<size_t>(l) + 1;
          if (units_[u]->numel == 0) return fn(x, {});  // a layer without trainable parameters
          return RunShardedUnit(units_[u], comm_.get(), fn, x, unit_shard_[u]);
        };
      }
      out = model_->Forward(input, fo);
      if (cfg_.loss_chunk_tokens > 0) {
        // Same mean over the tokens whose target is not -100, without the [tokens, vocab] logits.
        ce = kernels::chunked_cross_entropy(out.hidden.reshape({-1, out.hidden.size(-1)}), model_->lm_head(),
                                            target.reshape({-1}), cfg_.loss_chunk_tokens)
                 .loss;
      } else {
        at::Tensor logits = out.logits.to(at::kFloat);
        ce = at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}), -1), target.reshape({-1}));
      }
    }
    at::Tensor loss = (ce * share + out.aux_loss * aux_share) / static_cast<double>(cfg_.grad_accum);
    // The last micro-batch's backward feeds the gradient buckets as it goes (overlap; distributed.h).
    if (reducer_ && a + 1 == cfg_.grad_accum) reducer_->Arm();
    loss.backward();
    } catch (const std::exception& e) {
      if (!zero3_) throw;
      return Internal(std::string("ZeRO-3 step ") + std::to_string(step_ + 1) + ": " + e.what());
    }
    loss_sum += ce.item<double>() * share;
  }
  at::NoGradGuard ng;
  if (zero3_) {
    BTX_RETURN_IF_ERROR(ReduceOuterUnit());
    if (step_ == 0) {
      int64_t largest = 0;
      for (size_t u = 1; u < units_.size(); ++u) largest = std::max(largest, units_[u]->numel);
      std::cerr << "btx: rank " << opts_.dp->rank() << ": parameters, gradients and optimizer sharded (ZeRO-3): "
                << shard_end_ - shard_begin_ << " of " << flat_numel_ << " elements in " << units_.size()
                << " units (outer " << units_[0]->numel << ", largest layer " << largest << ")\n";
    }
    BTX_ASSIGN_OR_RETURN(loss_sum, opts_.dp->Sum(loss_sum));
  } else if (opts_.dp) {
    // Every rank ends with the summed gradient of every parameter (Gloo has no reduce-scatter in LibTorch 1.13;
    // ZeRO-1 then reads only its shard of it).
    BTX_RETURN_IF_ERROR(reducer_->Finish());
    if (step_ == 0) {
      std::cerr << "btx: rank " << opts_.dp->rank() << ": " << reducer_->num_buckets() << " gradient buckets, "
                << reducer_->launched_during_backward() << " all-reduced during the backward pass; optimizer "
                << (zero_ ? "sharded (ZeRO-1): " : "replicated: ") << shard_end_ - shard_begin_ << " of "
                << flat_numel_ << " elements\n";
    }
    BTX_ASSIGN_OR_RETURN(loss_sum, opts_.dp->Sum(loss_sum));
  }
  const double lr = LearningRate(cfg_, step_, opts_.steps);
  // A segment's gradient: a view into the parameter's .grad, or with ZeRO-3 into its unit's gradient shard.
  auto grad_of = [&](const Segment& s) -> at::Tensor {
    const at::Tensor& g = zero3_ ? unit_shard_[s.unit].grad() : params[trainable_[s.k]].second.grad();
    if (!g.defined()) return g;
    return zero3_ ? g.narrow(0, s.unit_off, s.len) : g.reshape({-1}).narrow(0, s.param_off, s.len);
  };
  if (cfg_.grad_clip > 0) {
    // The global norm: over this rank's shard, summed over the ranks with ZeRO-1 or 3 (each element counted once).
    std::vector<at::Tensor> norms;
    for (const Segment& s : segments_) {
      at::Tensor g = grad_of(s);
      if (g.defined()) norms.push_back(g.pow(2).sum());
    }
    double sq = norms.empty() ? 0.0 : at::stack(norms).sum().item<double>();
    if (zero_) {
      BTX_ASSIGN_OR_RETURN(sq, opts_.dp->Sum(sq));
    }
    const double total = std::sqrt(sq);
    if (total > cfg_.grad_clip) {
      const double scale = cfg_.grad_clip / (total + 1e-6);
      for (const Segment& s : segments_) {
        at::Tensor& p = params[trainable_[s.k]].second;
        if (zero3_) {
          at::Tensor g = grad_of(s);  // a view into the unit's gradient shard; segments do not overlap
          if (g.defined()) g.mul_(scale);
        } else if (p.grad().defined()) {
          p.mutable_grad().mul_(scale);  // a parameter has at most one segment per shard
        }
      }
    }
  }
  const double t = static_cast<double>(step_ + 1);
  const double bc1 = 1 - std::pow(cfg_.beta1, t), bc2 = 1 - std::pow(cfg_.beta2, t);
  for (const Segment& s : segments_) {
    at::Tensor& p = params[trainable_[s.k]].second;
    at::Tensor g = grad_of(s);
    if (!g.defined()) continue;
    at::Tensor w = zero3_ ? unit_shard_[s.unit].narrow(0, s.unit_off, s.len) : p.view({-1}).narrow(0, s.param_off, s.len);
    at::Tensor m = exp_avg_.narrow(0, s.state_off, s.len), v = exp_avg_sq_.narrow(0, s.state_off, s.len);
    // Decoupled weight decay (AdamW) on matrices only; norms and other vectors are not decayed.
    // One pass over w, g, m, v (btx::kernels::FusedAdamW) instead of ~6 ATen ops; other layouts or dtypes
    // take the same ATen sequence as before.
    btx::kernels::AdamWParams hp;
    hp.lr = lr;
    hp.beta1 = cfg_.beta1;
    hp.beta2 = cfg_.beta2;
    hp.eps = cfg_.eps;
    hp.weight_decay = (cfg_.weight_decay > 0 && p.dim() >= 2) ? cfg_.weight_decay : 0.0;
    hp.bc1 = bc1;
    hp.bc2 = bc2;
    if (btx::kernels::FusedAdamWAccepts(w, g, m, v)) {
      btx::kernels::FusedAdamW(w, g, m, v, hp);
    } else {
      btx::kernels::AdamWAtenSequence(w, g, m, v, hp);
    }
  }
  for (size_t i : trainable_) params[i].second.mutable_grad().reset();
  for (auto& sh : unit_shard_) sh.mutable_grad().reset();
  if (zero_ && !zero3_) BTX_RETURN_IF_ERROR(GatherParams());
  ++step_;
  return loss_sum / static_cast<double>(cfg_.grad_accum);
}

std::vector<Trainer::Segment> Trainer::SegmentsOf(int64_t begin, int64_t end) const {
  std::vector<Segment> out;
  const auto& params = model_->params();
  for (size_t k = 0; k < trainable_.size(); ++k) {
    const int64_t lo = std::max(begin, flat_offsets_[k]);
    const int64_t hi = std::min(end, flat_offsets_[k] + params[trainable_[k]].second.numel());
    if (lo < hi) out.push_back({k, lo - flat_offsets_[k], lo - begin, hi - lo});
  }
  return out;
}

Status Trainer::GatherParams() {
  auto& params = model_->params();
  const auto o = params[trainable_.front()].second.options().requires_grad(false);
  at::Tensor mine = at::zeros({shard_size_}, o);  // padded to the common stride
  for (const Segment& s : segments_)
    mine.narrow(0, s.state_off, s.len).copy_(params[trainable_[s.k]].second.view({-1}).narrow(0, s.param_off, s.len));
  std::vector<at::Tensor> all;
  for (size_t r = 0; r < rank_segments_.size(); ++r) all.push_back(at::empty({shard_size_}, o));
  BTX_RETURN_IF_ERROR(opts_.dp->AllGatherInto(mine, all));
  for (size_t r = 0; r < rank_segments_.size(); ++r) {
    if (static_cast<int>(r) == opts_.dp->rank()) continue;
    for (const Segment& s : rank_segments_[r])
      params[trainable_[s.k]].second.view({-1}).narrow(0, s.param_off, s.len).copy_(all[r].narrow(0, s.state_off, s.len));
  }
  return Status::Ok();
}

std::vector<Trainer::Segment> Trainer::Zero3SegmentsOf(int rank) const {
  std::vector<Segment> out;
  int64_t state = 0;
  for (size_t u = 0; u < units_.size(); ++u) {
    const ShardedUnit& unit = *units_[u];
    const int64_t begin = std::min(unit.numel, rank * unit.shard), end = std::min(unit.numel, begin + unit.shard);
    for (size_t j = 0; j < unit_members_[u].size(); ++j) {
      const int64_t off = unit.offsets[j], next = j + 1 < unit.offsets.size() ? unit.offsets[j + 1] : unit.numel;
      const int64_t lo = std::max(begin, off), hi = std::min(end, next);
      if (lo >= hi) continue;
      out.push_back({unit_members_[u][j], lo - off, state, hi - lo, u, lo - begin});
      state += hi - lo;
    }
  }
  return out;
}

std::vector<Trainer::Range> Trainer::OwnedRanges(int rank) const {
  if (!zero3_) {
    const int64_t b = zero_ ? std::min(flat_numel_, rank * shard_size_) : 0;
    const int64_t e = zero_ ? std::min(flat_numel_, (rank + 1) * shard_size_) : flat_numel_;
    return {{b, e, 0}};
  }
  std::vector<Range> out;
  for (const Segment& s : Zero3SegmentsOf(rank)) {
    const int64_t b = flat_offsets_[s.k] + s.param_off;
    if (!out.empty() && out.back().end == b && out.back().state_off + (out.back().end - out.back().begin) == s.state_off)
      out.back().end += s.len;
    else
      out.push_back({b, b + s.len, s.state_off});
  }
  return out;
}

void Trainer::ToPlaceholders(const std::vector<size_t>& ks) {
  auto& params = model_->params();
  for (size_t k : ks) {
    at::Tensor& t = params[trainable_[k]].second;
    t = at::empty(t.sizes(), at::TensorOptions().dtype(at::kFloat).device(at::kMeta)).requires_grad_(true);
  }
}

Status Trainer::GatherOuterUnit() {
  const ShardedUnit& unit = *units_[0];
  if (unit.numel == 0) return Status::Ok();
  at::Tensor full = at::empty({comm_->world_size() * unit.shard}, unit_shard_[0].options().requires_grad(false));
  BTX_RETURN_IF_ERROR(comm_->AllGather(unit_shard_[0].detach(), full));
  auto views = unit.Views(full);
  auto& params = model_->params();
  for (size_t j = 0; j < unit.names.size(); ++j) {
    at::Tensor p = views.at(unit.names[j]);
    p.requires_grad_(true);  // a leaf for the step: its .grad accumulates over the micro-batches
    params[trainable_[unit_members_[0][j]]].second = p;
  }
  return Status::Ok();
}

Status Trainer::ReduceOuterUnit() {
  const ShardedUnit& unit = *units_[0];
  if (unit.numel == 0) return Status::Ok();
  auto& params = model_->params();
  at::Tensor full = at::zeros({comm_->world_size() * unit.shard}, unit_shard_[0].options().requires_grad(false));
  for (size_t j = 0; j < unit.names.size(); ++j) {
    const at::Tensor& g = params[trainable_[unit_members_[0][j]]].second.grad();
    if (g.defined()) full.narrow(0, unit.offsets[j], g.numel()).copy_(g.reshape({-1}));
  }
  ToPlaceholders(unit_members_[0]);  // frees the gathered weights and their gradients
  BTX_ASSIGN_OR_RETURN(at::Tensor mine, comm_->ReduceScatter(full));
  at::Tensor& g = unit_shard_[0].mutable_grad();
  if (g.defined())
    g.add_(mine);
  else
    g = mine;
  return Status::Ok();
}

Status Trainer::GatherFullParams(std::vector<std::pair<std::string, at::Tensor>>* dst, c10::Device device) {
  at::NoGradGuard ng;
  for (size_t u = 0; u < units_.size(); ++u) {
    const ShardedUnit& unit = *units_[u];
    if (unit.numel == 0) continue;
    at::Tensor full = at::empty({comm_->world_size() * unit.shard}, unit_shard_[u].options().requires_grad(false));
    BTX_RETURN_IF_ERROR(comm_->AllGather(unit_shard_[u].detach(), full));
    if (dst == nullptr) continue;
    auto views = unit.Views(full);
    for (size_t j = 0; j < unit.names.size(); ++j)
      (*dst)[trainable_[unit_members_[u][j]]].second =
          views.at(unit.names[j]).to(at::TensorOptions().device(device), /*non_blocking=*/false, /*copy=*/true);
  }
  return Status::Ok();
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
    bool stop = hooks_.stop && hooks_.stop->load();
    if (opts_.dp) {
      // SIGTERM may reach the ranks at different steps: they stop together, after the same step.
      BTX_ASSIGN_OR_RETURN(const double stopping, opts_.dp->Sum(stop ? 1.0 : 0.0));
      stop = stopping > 0;
    }
    const bool periodic = cfg_.checkpoint_every > 0 && step_ % cfg_.checkpoint_every == 0;
    if (!opts_.checkpoint_dir.empty() && (periodic || stop || step_ == opts_.steps))
      BTX_RETURN_IF_ERROR(SaveCheckpoint());
    if (stop && step_ < opts_.steps) return TrainOutcome::kInterrupted;
  }
  if (zero3_) {
    // Rank 0 validates and publishes the trained model: it gets the full weights back (collective).
    BTX_RETURN_IF_ERROR(GatherFullParams(opts_.dp->rank() == 0 ? &model_->params() : nullptr, device_));
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

namespace {
std::string ShardFileName(int shard, int shards) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "optimizer-%05d-of-%05d.safetensors", shard, shards);
  return buf;
}
at::Tensor CpuRngState() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
}  // namespace

Status Trainer::WriteOptimizerShard(const std::string& path, std::string* sha256) const {
  std::map<std::string, std::string> meta = {{"numel", std::to_string(flat_numel_)}};
  if (zero3_) {
    json ranges = json::array();
    for (const Range& r : OwnedRanges(opts_.dp->rank())) ranges.push_back({r.begin, r.end});
    meta["ranges"] = ranges.dump();
  } else {
    meta["begin"] = std::to_string(shard_begin_);
    meta["end"] = std::to_string(shard_end_);
  }
  return st::Write(path, {{"exp_avg", exp_avg_.cpu()}, {"exp_avg_sq", exp_avg_sq_.cpu()}}, meta, sha256);
}

// With several ranks every step of this is collective, so that all ranks agree on the outcome: ranks other than 0
// write their optimizer shard next to the checkpoints (".step-N.optimizer-r-of-R.safetensors.partial", written
// and fsynced); rank 0 stages the checkpoint dir, writes the model, its shard and the trainer state, moves the
// other shards in and publishes it (manifest, fsync, rename, fsync of the parent). checkpoint_dir is shared.
Status Trainer::SaveCheckpoint() {
  const int rank = opts_.dp ? opts_.dp->rank() : 0;
  const int world = opts_.dp ? opts_.dp->world_size() : 1;
  const std::string final_dir = opts_.checkpoint_dir + "/" + StepDirName(step_);
  // Rank 0 fails the others when it fails, and vice versa (a Sum of failure flags).
  auto agree = [&](const Status& mine, const std::string& what) -> Status {
    if (!opts_.dp) return mine;
    BTX_ASSIGN_OR_RETURN(const double failed, opts_.dp->Sum(mine.ok() ? 0.0 : 1.0));
    if (!mine.ok()) return mine;
    if (failed > 0) return Internal(what + " failed on another rank (see its log)");
    return Status::Ok();
  };
  bool exists = fs::exists(final_dir);
  if (opts_.dp) {
    BTX_ASSIGN_OR_RETURN(const double n, opts_.dp->Sum(exists ? 1.0 : 0.0));
    exists = n > 0;
  }
  if (exists) {
    last_checkpoint_ = final_dir;
    return Status::Ok();
  }
  std::vector<at::Tensor> rngs = {CpuRngState()};
  if (opts_.dp) {
    BTX_ASSIGN_OR_RETURN(rngs, opts_.dp->AllGather(rngs[0]));
  }
  // ZeRO-3: the model files need the full weights; rank 0 assembles them in host memory, unit by unit.
  std::optional<LlamaModel> full;
  if (zero3_) {
    if (rank == 0) full = *model_;
    BTX_RETURN_IF_ERROR(GatherFullParams(rank == 0 ? &full->params() : nullptr, c10::kCPU));
  }
  const int shards = zero_ ? world : 1;
  auto partial = [&](int r) {
    return opts_.checkpoint_dir + "/." + StepDirName(step_) + "." + ShardFileName(r, shards) + ".partial";
  };
  if (rank != 0) {
    Status mine = Status::Ok();
    if (zero_) {
      std::error_code ec;
      fs::create_directories(opts_.checkpoint_dir, ec);
      mine = WriteOptimizerShard(partial(rank), nullptr);
    }
    BTX_RETURN_IF_ERROR(agree(mine, "writing optimizer shards").With("writing checkpoint " + final_dir));
    BTX_RETURN_IF_ERROR(agree(Status::Ok(), "publishing the checkpoint").With("writing checkpoint " + final_dir));
    last_checkpoint_ = final_dir;
    return Status::Ok();
  }
  BTX_RETURN_IF_ERROR(agree(Status::Ok(), "writing optimizer shards").With("writing checkpoint " + final_dir));
  // On any error `staged` removes its temp dir on the way out, so a failed checkpoint (a full
  // disk) gives its space back and leaves the previous checkpoints as they were.
  auto write = [&]() -> Status {
    BTX_ASSIGN_OR_RETURN(StagedDir staged, StagedDir::Create(final_dir));
    FileDigests digests;  // of the tensor files, hashed as written: the manifest does not read them again
    // Checkpoints hold the float32 weights whatever the output's dtype: resuming must be bit-exact.
    SaveOptions exact;
    exact.dtype = st::DType::kF32;
    BTX_RETURN_IF_ERROR(WriteModelFiles(zero3_ ? *full : *model_, staged.path(), exact, &digests));
    // Twice the (shard of the) model's size (Adam's two moments): hashed as written too.
    const std::string own = ShardFileName(0, shards);
    BTX_RETURN_IF_ERROR(WriteOptimizerShard(staged.path() + "/" + own, &digests[own]));
    json layout = {{"numel", flat_numel_}, {"zero", zero3_ ? 3 : zero_ ? 1 : 0}, {"world_size", world}};
    const auto& params = model_->params();
    for (size_t i : trainable_) layout["params"].push_back({params[i].first, params[i].second.numel()});
    for (int r = 0; r < shards; ++r) {
      if (zero3_) {
        // Rank r's elements: its shard of every unit, in unit order (several ranges of the flat layout).
        json ranges = json::array();
        for (const Range& g : OwnedRanges(r)) ranges.push_back({g.begin, g.end});
        layout["shards"].push_back({{"file", ShardFileName(r, shards)}, {"ranges", ranges}});
      } else {
        const int64_t b = std::min(flat_numel_, r * shard_size_), e = std::min(flat_numel_, (r + 1) * shard_size_);
        layout["shards"].push_back({{"file", ShardFileName(r, shards)}, {"begin", b}, {"end", e}});
      }
      // The other ranks' shards: hashed by the manifest (they were written by other processes).
      if (r > 0 && ::rename(partial(r).c_str(), (staged.path() + "/" + ShardFileName(r, shards)).c_str()) != 0)
        return Internal("moving " + partial(r) + " into the checkpoint: " + std::strerror(errno));
    }
    json rng_states = json::array();
    for (const auto& t : rngs) rng_states.push_back(Hex(t));
    json state = {{"step", step_}, {"total_steps", opts_.steps}, {"samples_drawn", sampler_->drawn()},
                  {"cursors", sampler_->cursors()}, {"rng_state", Hex(rngs[0])}, {"rng_states", rng_states},
                  {"seed", cfg_.seed}, {"last_loss", last_loss_}, {"optimizer", layout}};
    BTX_RETURN_IF_ERROR(WriteFileDurable(staged.path() + "/trainer_state.json", state.dump(2)));
    if (hooks_.extra_files) BTX_RETURN_IF_ERROR(hooks_.extra_files(staged.path()));
    return staged.Publish(digests);
  };
  Status s = write();
  if (!s.ok()) {
    for (int r = 1; r < shards; ++r) {
      std::error_code ec;
      fs::remove(partial(r), ec);
    }
    // Attempts of one job share the checkpoint dir, and a stale attempt (its worker lost the lease
    // but has not killed it yet) may publish the same step first. Its checkpoint is as good as ours.
    if (fs::exists(final_dir) && VerifyManifest(final_dir).ok()) s = Status::Ok();
  }
  BTX_RETURN_IF_ERROR(agree(s, "publishing the checkpoint").With("writing checkpoint " + final_dir));
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

// Reassembles this rank's shard of the optimizer state from the checkpoint's shards, whatever the world size and
// ZeRO setting it was written with; checkpoints from before sharding hold one "optimizer.safetensors" by name.
Status Trainer::LoadOptimizerState(const std::string& dir, const json& state) {
  const auto& params = model_->params();
  if (!state.contains("optimizer")) {
    BTX_ASSIGN_OR_RETURN(auto opt, st::File::Open(dir + "/optimizer.safetensors"));
    at::NoGradGuard ng;
    for (const Segment& s : segments_) {
      const std::string& name = params[trainable_[s.k]].first;
      BTX_ASSIGN_OR_RETURN(at::Tensor m, opt->Load("exp_avg/" + name));
      BTX_ASSIGN_OR_RETURN(at::Tensor v, opt->Load("exp_avg_sq/" + name));
      if (m.numel() != params[trainable_[s.k]].second.numel() || v.numel() != m.numel())
        return FailedPrecondition(dir + ": optimizer state of " + name + " does not match the model");
      exp_avg_.narrow(0, s.state_off, s.len).copy_(m.reshape({-1}).narrow(0, s.param_off, s.len));
      exp_avg_sq_.narrow(0, s.state_off, s.len).copy_(v.reshape({-1}).narrow(0, s.param_off, s.len));
    }
    return Status::Ok();
  }
  const json& layout = state.at("optimizer");
  const auto& saved = layout.at("params");
  if (layout.at("numel").get<int64_t>() != flat_numel_ || saved.size() != trainable_.size())
    return FailedPrecondition(dir + ": the checkpoint's trainable parameters differ from this job's (freeze?)");
  for (size_t k = 0; k < trainable_.size(); ++k) {
    if (saved[k].at(0).get<std::string>() != params[trainable_[k]].first ||
        saved[k].at(1).get<int64_t>() != params[trainable_[k]].second.numel())
      return FailedPrecondition(dir + ": optimizer state of " + params[trainable_[k]].first + " does not match the model");
  }
  at::NoGradGuard ng;
  // A saved shard holds the flat elements of its ranges, concatenated: one range ([begin, end)) with ZeRO-0/1,
  // one or more per unit with ZeRO-3 ("ranges"). This rank's state is OwnedRanges(rank); any layout loads into
  // any other (world size, ZeRO 0/1/3).
  const std::vector<Range> mine = OwnedRanges(opts_.dp ? opts_.dp->rank() : 0);
  int64_t covered = 0;
  for (const auto& sh : layout.at("shards")) {
    std::vector<Range> saved_ranges;
    int64_t total = 0;
    if (sh.contains("ranges")) {
      for (const auto& r : sh.at("ranges")) {
        const int64_t b = r.at(0).get<int64_t>(), e = r.at(1).get<int64_t>();
        if (b < 0 || e < b || e > flat_numel_) return DataLoss(dir + ": bad optimizer shard range");
        saved_ranges.push_back({b, e, total});
        total += e - b;
      }
    } else {
      const int64_t b = sh.at("begin").get<int64_t>(), e = sh.at("end").get<int64_t>();
      saved_ranges.push_back({b, e, 0});
      total = e - b;
    }
    bool overlaps = false;
    for (const Range& s : saved_ranges)
      for (const Range& m : mine) overlaps = overlaps || std::max(s.begin, m.begin) < std::min(s.end, m.end);
    if (!overlaps) continue;
    const std::string file = sh.at("file").get<std::string>();
    if (file.find('/') != std::string::npos) return DataLoss(dir + ": bad optimizer shard name " + file);
    BTX_ASSIGN_OR_RETURN(auto opt, st::File::Open(dir + "/" + file));
    BTX_ASSIGN_OR_RETURN(at::Tensor m, opt->Load("exp_avg"));
    BTX_ASSIGN_OR_RETURN(at::Tensor v, opt->Load("exp_avg_sq"));
    if (m.dim() != 1 || m.numel() != total || v.numel() != total)
      return DataLoss(dir + "/" + file + ": holds " + std::to_string(m.numel()) + " elements, expected " + std::to_string(total));
    for (const Range& s : saved_ranges) {
      for (const Range& r : mine) {
        const int64_t lo = std::max(s.begin, r.begin), hi = std::min(s.end, r.end);
        if (lo >= hi) continue;
        exp_avg_.narrow(0, r.state_off + lo - r.begin, hi - lo).copy_(m.narrow(0, s.state_off + lo - s.begin, hi - lo));
        exp_avg_sq_.narrow(0, r.state_off + lo - r.begin, hi - lo).copy_(v.narrow(0, s.state_off + lo - s.begin, hi - lo));
        covered += hi - lo;
      }
    }
  }
  if (covered != exp_avg_.numel()) return DataLoss(dir + ": the optimizer shards do not cover the parameters");
  return Status::Ok();
}

Status Trainer::ResumeFrom(const std::string& dir) {
  BTX_ASSIGN_OR_RETURN(LlamaModel saved, LoadModelDir(dir));
  auto& params = model_->params();
  if (saved.params().size() != params.size()) return FailedPrecondition(dir + ": checkpoint does not match the model");
  {
    at::NoGradGuard ng;
    for (size_t i = 0; i < params.size(); ++i) {
      if (saved.params()[i].first != params[i].first || !saved.params()[i].second.sizes().equals(params[i].second.sizes()))
        return FailedPrecondition(dir + ": checkpoint tensor " + saved.params()[i].first + " does not match the model");
      if (!zero3_ || !params[i].second.requires_grad()) params[i].second.copy_(saved.params()[i].second);
    }
    // ZeRO-3: the trainable weights go into this rank's shards.
    for (const Segment& s : zero3_ ? segments_ : std::vector<Segment>{}) {
      unit_shard_[s.unit].narrow(0, s.unit_off, s.len)
          .copy_(saved.params()[trainable_[s.k]].second.reshape({-1}).narrow(0, s.param_off, s.len));
    }
  }
  BTX_ASSIGN_OR_RETURN(std::string text, ReadFile(dir + "/trainer_state.json"));
  try {
    json s = json::parse(text);
    BTX_RETURN_IF_ERROR(LoadOptimizerState(dir, s));
    step_ = s.at("step").get<int64_t>();
    last_loss_ = s.value("last_loss", 0.0);
    auto cursors = s.at("cursors").get<std::vector<uint64_t>>();
    if (cursors.size() != data_.size()) return FailedPrecondition(dir + ": checkpoint has a different number of domains");
    sampler_->Restore(s.at("samples_drawn").get<uint64_t>(), cursors);
    // Each rank's own generator when the world size is the same (ranks draw different amounts for their rows);
    // rank 0's otherwise.
    const int rank = opts_.dp ? opts_.dp->rank() : 0, world = opts_.dp ? opts_.dp->world_size() : 1;
    std::string rng = s.at("rng_state").get<std::string>();
    if (s.contains("rng_states") && s["rng_states"].size() == static_cast<size_t>(world))
      rng = s["rng_states"][rank].get<std::string>();
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(Unhex(rng));
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
      at::Tensor target = seq.narrow(1, 1, len).clone();  // kIgnoreIndex where chat data's loss does not count
      int64_t counted = len;
      for (int64_t i = 0; d.valid_loss && i < len; ++i)
        if (!(*d.valid_loss)[start + 1 + i]) target.data_ptr<int64_t>()[i] = kIgnoreIndex, --counted;
      seq = seq.to(model_->params().front().second.device());
      ForwardOptions fo;
      fo.backend = opts_.backend;
      fo.top_k = opts_.top_k;
      at::Tensor logits = model_->Forward(seq.narrow(1, 0, len), fo).logits.to(at::kFloat);
      at::Tensor nll = at::nll_loss(at::log_softmax(logits.reshape({len, -1}), -1),
                                    target.to(seq.device()).reshape({len}), {}, at::Reduction::Sum, kIgnoreIndex);
      total += nll.item<double>();
      count += counted;
    }
    if (count > 0) out[d.name] = total / static_cast<double>(count);
  }
  return out;
}

}  // namespace btx::model
