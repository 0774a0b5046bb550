#include "btx/kernels/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <sys/resource.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <fstream>
#include <mutex>
#include <optional>
#include <string>

#include "btx/kernels/autocast.h"
#include <torch/version.h>

#ifdef BTX_TORCH_HAS_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace btx::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward needs besides the saved inputs: the function and the forward's ambient state.
struct CheckpointState : torch::CustomClassHolder {
  CheckpointFn fn;
  at::Tensor cpu_rng;
  std::optional<c10::Device> device;  // a CUDA device whose generator is restored too
  at::Tensor device_rng;
  bool autocast = false;
  at::ScalarType autocast_dtype = at::kBFloat16;
  bool cpu_autocast = false;
  at::ScalarType cpu_autocast_dtype = at::kBFloat16;
};

at::Tensor get_rng(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}
void set_rng(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Swaps in the forward's RNG and autocast state for the re-run and puts the current ones back after it, so
// that checkpointing leaves random streams (and thus the trainer's checkpointed generator) as without it.
class ForwardState {
 public:
  explicit ForwardState(const CheckpointState& s) : s_(s) {
    const auto& cpu = at::detail::getDefaultCPUGenerator();
    cpu_now_ = get_rng(cpu);
    set_rng(cpu, s.cpu_rng);
    if (s.device) {
      const auto& gen = at::globalContext().defaultGenerator(*s.device);
      device_now_ = get_rng(gen);
      set_rng(gen, s.device_rng);
    }
    autocast_now_ = cuda_autocast_enabled();
    dtype_now_ = cuda_autocast_dtype();
    set_cuda_autocast(s.autocast, s.autocast_dtype);
    cpu_autocast_now_ = cpu_autocast_enabled();
    cpu_dtype_now_ = cpu_autocast_dtype();
    set_cpu_autocast(s.cpu_autocast, s.cpu_autocast_dtype);
  }
  ~ForwardState() {
    set_cuda_autocast(autocast_now_, dtype_now_);
    set_cpu_autocast(cpu_autocast_now_, cpu_dtype_now_);
    if (!autocast_now_ && !cpu_autocast_now_) at::autocast::clear_cache();
    set_rng(at::detail::getDefaultCPUGenerator(), cpu_now_);
    if (s_.device) set_rng(at::globalContext().defaultGenerator(*s_.device), device_now_);
  }
  ForwardState(const ForwardState&) = delete;
  ForwardState& operator=(const ForwardState&) = delete;

 private:
  const CheckpointState& s_;
  at::Tensor cpu_now_, device_now_;
  bool autocast_now_ = false, cpu_autocast_now_ = false;
  at::ScalarType dtype_now_ = at::kBFloat16, cpu_dtype_now_ = at::kBFloat16;
};

struct CheckpointFnNode : public torch::autograd::Function<CheckpointFnNode> {
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<CheckpointState> state, at::TensorList inputs) {
    state->cpu_rng = get_rng(at::detail::getDefaultCPUGenerator());
    for (const at::Tensor& x : inputs) {
      if (x.defined() && x.is_cuda()) {
        state->device = x.device();
        state->device_rng = get_rng(at::globalContext().defaultGenerator(x.device()));
        break;
      }
    }
    state->autocast = cuda_autocast_enabled();
    state->autocast_dtype = cuda_autocast_dtype();
    state->cpu_autocast = cpu_autocast_enabled();
    state->cpu_autocast_dtype = cpu_autocast_dtype();
    variable_list out = state->fn(inputs.vec());  // apply() runs forward with gradients disabled
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["state"] = at::IValue::make_capsule(state);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto state = c10::static_intrusive_pointer_cast<CheckpointState>(ctx->saved_data["state"].toCapsule());
    const variable_list saved = ctx->get_saved_variables();
    variable_list inputs;
    std::vector<size_t> wanted;  // indices of inputs that take gradients
    for (size_t i = 0; i < saved.size(); ++i) {
      at::Tensor x = saved[i].detach();
      if (saved[i].requires_grad()) {
        x.requires_grad_(true);
        wanted.push_back(i);
      }
      inputs.push_back(x);
    }
    variable_list outputs;
    {
      ForwardState fs(*state);
      at::AutoGradMode enable(true);
      outputs = state->fn(inputs);
    }
    variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size() && i < grads.size(); ++i) {
      if (outputs[i].requires_grad() && grads[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    variable_list targets;
    for (size_t i : wanted) targets.push_back(inputs[i]);
    variable_list result(1 + saved.size());  // slot 0: the state, which takes no gradient
    if (roots.empty() || targets.empty()) return result;
    const variable_list g = torch::autograd::grad(roots, targets, root_grads, /*retain_graph=*/false,
                                                  /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t j = 0; j < wanted.size(); ++j) result[1 + wanted[j]] = g[j];
    return result;
  }
};

}  // namespace

std::vector<at::Tensor> checkpoint(const CheckpointFn& fn, const std::vector<at::Tensor>& inputs) {
  if (!at::GradMode::is_enabled()) return fn(inputs);
  bool any_grad = false;
  for (const at::Tensor& x : inputs) any_grad = any_grad || (x.defined() && x.requires_grad());
  if (!any_grad) return fn(inputs);
  auto state = c10::make_intrusive<CheckpointState>();
  state->fn = fn;
  return CheckpointFnNode::apply(state, at::TensorList(inputs));
}

int64_t host_peak_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // "VmHWM:   123456 kB"
  }
  struct rusage ru {};
  if (getrusage(RUSAGE_SELF, &ru) == 0) return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // kB on Linux
  return -1;
}

int64_t cuda_peak_allocated_bytes(int64_t device) {
#ifdef BTX_TORCH_HAS_CUDA
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<int>(device));
  return stats.allocated_bytes[0].peak;  // index 0: the aggregate over pool types
#else
  (void)device;
  return -1;
#endif
}

}  // namespace btx::kernels
