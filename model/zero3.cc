#include "btx/model/zero3.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <mutex>
#include <optional>
#include <stdexcept>

#include "btx/kernels/autocast.h"

namespace btx::model {
namespace {

class DpComm : public ShardComm {
 public:
  explicit DpComm(DataParallel* dp) : dp_(dp) {}
  int rank() const override { return dp_->rank(); }
  int world_size() const override { return dp_->world_size(); }
  Status AllGather(const at::Tensor& mine, at::Tensor& full) override {
    const int64_t s = mine.numel();
    std::vector<at::Tensor> outs;
    for (int r = 0; r < dp_->world_size(); ++r) outs.push_back(full.narrow(0, r * s, s));
    return dp_->AllGatherInto(mine, outs);
  }
  StatusOr<at::Tensor> ReduceScatter(at::Tensor& full) override { return dp_->ReduceScatter(full); }

 private:
  DataParallel* dp_;
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void Check(const Status& st) {
  if (!st.ok()) throw std::runtime_error(st.message());
}

at::Tensor GetRng(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
void SetRng(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

struct UnitState : torch::CustomClassHolder {
  std::shared_ptr<const ShardedUnit> unit;
  ShardComm* comm = nullptr;
  LayerFn fn;
  // The forward's ambient state, for the recomputation (as kernels/checkpoint.cc).
  at::Tensor cpu_rng, device_rng;
  std::optional<c10::Device> device;
  bool autocast = false, cpu_autocast = false;
  at::ScalarType autocast_dtype = at::kBFloat16, cpu_autocast_dtype = at::kBFloat16;

  at::Tensor Gather(const at::Tensor& shard) const {
    at::Tensor full = at::empty({comm->world_size() * unit->shard}, shard.options().requires_grad(false));
    at::Tensor mine = shard.detach();
    Check(comm->AllGather(mine, full));
    return full;
  }
};

// Swaps in the forward's RNG and autocast state for the recomputation and restores the current one after it.
class ForwardState {
 public:
  explicit ForwardState(const UnitState& s) : s_(s) {
    const auto& cpu = at::detail::getDefaultCPUGenerator();
    cpu_now_ = GetRng(cpu);
    SetRng(cpu, s.cpu_rng);
    if (s.device) {
      const auto& gen = at::globalContext().defaultGenerator(*s.device);
      device_now_ = GetRng(gen);
      SetRng(gen, s.device_rng);
    }
    autocast_now_ = kernels::cuda_autocast_enabled();
    dtype_now_ = kernels::cuda_autocast_dtype();
    kernels::set_cuda_autocast(s.autocast, s.autocast_dtype);
    cpu_autocast_now_ = kernels::cpu_autocast_enabled();
    cpu_dtype_now_ = kernels::cpu_autocast_dtype();
    kernels::set_cpu_autocast(s.cpu_autocast, s.cpu_autocast_dtype);
  }
  ~ForwardState() {
    kernels::set_cuda_autocast(autocast_now_, dtype_now_);
    kernels::set_cpu_autocast(cpu_autocast_now_, cpu_dtype_now_);
    if (!autocast_now_ && !cpu_autocast_now_) at::autocast::clear_cache();
    SetRng(at::detail::getDefaultCPUGenerator(), cpu_now_);
    if (s_.device) SetRng(at::globalContext().defaultGenerator(*s_.device), device_now_);
  }
  ForwardState(const ForwardState&) = delete;
  ForwardState& operator=(const ForwardState&) = delete;

 private:
  const UnitState& s_;
  at::Tensor cpu_now_, device_now_;
  bool autocast_now_ = false, cpu_autocast_now_ = false;
  at::ScalarType dtype_now_ = at::kBFloat16, cpu_dtype_now_ = at::kBFloat16;
};

struct ShardedUnitNode : public torch::autograd::Function<ShardedUnitNode> {
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<UnitState> state, const at::Tensor& x,
                               const at::Tensor& shard) {
    state->cpu_rng = GetRng(at::detail::getDefaultCPUGenerator());
    if (x.is_cuda()) {
      state->device = x.device();
      state->device_rng = GetRng(at::globalContext().defaultGenerator(x.device()));
    }
    state->autocast = kernels::cuda_autocast_enabled();
    state->autocast_dtype = kernels::cuda_autocast_dtype();
    state->cpu_autocast = kernels::cpu_autocast_enabled();
    state->cpu_autocast_dtype = kernels::cpu_autocast_dtype();
    variable_list out;
    {
      at::Tensor full = state->Gather(shard);  // freed at the end of this scope: outputs do not alias it
      out = state->fn(x, state->unit->Views(full));
    }
    ctx->save_for_backward({x, shard});
    ctx->saved_data["state"] = at::IValue::make_capsule(state);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto state = c10::static_intrusive_pointer_cast<UnitState>(ctx->saved_data["state"].toCapsule());
    const ShardedUnit& unit = *state->unit;
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor x = saved[0].detach();
    const bool want_x = saved[0].requires_grad();
    if (want_x) x.requires_grad_(true);
    const at::Tensor& shard = saved[1];
    // Each parameter a leaf of its own (views of one gathered buffer): their gradients come out separately and are
    // packed once, instead of every view's backward producing a gradient the size of the whole unit.
    std::unordered_map<std::string, at::Tensor> w;
    std::vector<at::Tensor> leaves;
    variable_list outputs;
    {
      at::Tensor full = state->Gather(shard);
      w = unit.Views(full);
      for (const auto& name : unit.names) {
        at::Tensor& p = w.at(name);
        p.requires_grad_(true);
        leaves.push_back(p);
      }
      ForwardState fs(*state);
      at::AutoGradMode enable(true);
      outputs = state->fn(x, w);
    }
    w.clear();
    variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size() && i < grads.size(); ++i) {
      if (outputs[i].requires_grad() && grads[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    variable_list targets = leaves;
    if (want_x) targets.push_back(x);
    variable_list g;
    if (!roots.empty()) {
      g = torch::autograd::grad(roots, targets, root_grads, /*retain_graph=*/false, /*create_graph=*/false,
                                /*allow_unused=*/true);
    }
    outputs.clear();
    roots.clear();
    leaves.clear();
    // The full gradient (zero padding, zero for parameters without one), reduce-scattered: every rank calls this.
    at::Tensor full_grad = at::zeros({state->comm->world_size() * unit.shard}, shard.options().requires_grad(false));
    for (size_t j = 0; j < unit.names.size() && j < g.size(); ++j) {
      if (!g[j].defined()) continue;
      full_grad.narrow(0, unit.offsets[j], g[j].numel()).copy_(g[j].reshape({-1}));
      g[j] = at::Tensor();
    }
    auto mine = state->comm->ReduceScatter(full_grad);
    Check(mine.status());
    variable_list result(3);  // state, x, shard
    if (want_x && !g.empty()) result[1] = g.back();
    result[2] = *mine;
    return result;
  }
};

}  // namespace

std::unique_ptr<ShardComm> MakeShardComm(DataParallel* dp) { return std::make_unique<DpComm>(dp); }

void ShardedUnit::Add(const std::string& name, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  names.push_back(name);
  shapes.push_back(std::move(shape));
  offsets.push_back(numel);
  numel += n;
}

void ShardedUnit::Finish(int world) { shard = (numel + world - 1) / world; }

std::unordered_map<std::string, at::Tensor> ShardedUnit::Views(const at::Tensor& full) const {
  std::unordered_map<std::string, at::Tensor> w;
  for (size_t i = 0; i < names.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : shapes[i]) n *= d;
    w.emplace(names[i], full.narrow(0, offsets[i], n).view(shapes[i]));
  }
  return w;
}

std::vector<at::Tensor> RunShardedUnit(std::shared_ptr<const ShardedUnit> unit, ShardComm* comm, const LayerFn& fn,
                                       const at::Tensor& x, const at::Tensor& shard) {
  auto state = c10::make_intrusive<UnitState>();
  state->unit = std::move(unit);
  state->comm = comm;
  state->fn = fn;
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || shard.requires_grad())) {
    at::Tensor full = state->Gather(shard);
    return fn(x, state->unit->Views(full));
  }
  return ShardedUnitNode::apply(state, x, shard);
}

}  // namespace btx::model
