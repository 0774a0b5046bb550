// moe_swiglu front end: argument checks, dispatch plan, device selection and the autograd Function with
// a hand-written backward (autograd never traces the per-expert loop).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "btx/kernels/autocast.h"
#include "btx/kernels/moe.h"
#include "internal.h"

namespace btx::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_args(const at::Tensor& x, const at::Tensor& expert_index, const at::Tensor& gates, const at::Tensor& w1,
                const at::Tensor& w3, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2, "moe_swiglu: x must be [T, D], got ", x.sizes());
  TORCH_CHECK(expert_index.dim() == 2 && expert_index.scalar_type() == at::kLong,
              "moe_swiglu: expert_index must be int64 [T, k]");
  TORCH_CHECK(gates.sizes() == expert_index.sizes(), "moe_swiglu: gates ", gates.sizes(),
              " must match expert_index ", expert_index.sizes());
  TORCH_CHECK(expert_index.size(0) == x.size(0), "moe_swiglu: T mismatch between x and expert_index");
  TORCH_CHECK(w1.dim() == 3 && w3.sizes() == w1.sizes(), "moe_swiglu: w1 and w3 must both be [E, F, D]");
  TORCH_CHECK(w1.size(2) == x.size(1), "moe_swiglu: w1 inner dim ", w1.size(2), " != D ", x.size(1));
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == w1.size(0) && w2.size(1) == x.size(1) && w2.size(2) == w1.size(1),
              "moe_swiglu: w2 must be [E, D, F]");
  for (const at::Tensor* t : {&gates, &w1, &w3, &w2}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "moe_swiglu: all float inputs must share x's dtype");
    TORCH_CHECK(t->device() == x.device(), "moe_swiglu: all inputs must be on x's device");
  }
  TORCH_CHECK(expert_index.device() == x.device(), "moe_swiglu: expert_index must be on x's device");
}

bool on_cuda(const at::Tensor& x) {
#ifdef BTX_TORCH_HAS_CUDA
  return x.is_cuda();
#else
  TORCH_CHECK(x.device().is_cpu(), "moe_swiglu: this build has no CUDA support in LibTorch; got ", x.device());
  return false;
#endif
}

detail::SwigluForward run_forward(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1,
                                  const at::Tensor& w3, const at::Tensor& w2, const DispatchPlan& plan,
                                  bool keep_activations) {
#ifdef BTX_TORCH_HAS_CUDA
  if (on_cuda(x)) return detail::moe_swiglu_forward_cuda(x, gates, w1, w3, w2, plan, keep_activations);
#endif
  (void)on_cuda(x);
  return detail::moe_swiglu_forward_cpu(x, gates, w1, w3, w2, plan, keep_activations);
}

void fill_stats(MoeStats* stats, const DispatchPlan& plan) {
  if (stats == nullptr) return;
  stats->tokens_per_expert = (plan.offsets.narrow(0, 1, plan.offsets.numel() - 1) -
                              plan.offsets.narrow(0, 0, plan.offsets.numel() - 1))
                                 .cpu();
  stats->dropped = plan.dropped;
}

class MoeSwigluFunction : public torch::autograd::Function<MoeSwigluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& expert_index,
                               const at::Tensor& gates, const at::Tensor& w1, const at::Tensor& w3,
                               const at::Tensor& w2, double capacity_factor, MoeStats* stats) {
    const DispatchPlan plan = make_dispatch_plan(expert_index, w1.size(0), capacity_factor);
    fill_stats(stats, plan);
    detail::SwigluForward out = run_forward(x, gates, w1, w3, w2, plan, /*keep_activations=*/true);
    // Inputs are saved by reference (no copies); the activations h1/h3 are the only extra memory.
    ctx->save_for_backward({x, gates, w1, w3, w2, plan.offsets, plan.sorted_assign, plan.row_of_assign, out.h1,
                            out.h3});
    return {out.y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &gates = saved[1], &w1 = saved[2], &w3 = saved[3], &w2 = saved[4];
    DispatchPlan plan;
    plan.offsets = saved[5];
    plan.sorted_assign = saved[6];
    plan.row_of_assign = saved[7];
    detail::SwigluNeeds needs;
    needs.x = ctx->needs_input_grad(0);
    needs.gates = ctx->needs_input_grad(2);
    needs.w1 = ctx->needs_input_grad(3);
    needs.w3 = ctx->needs_input_grad(4);
    needs.w2 = ctx->needs_input_grad(5);
    const at::Tensor dy = grad_outputs[0].contiguous();
    detail::SwigluGrads g;
#ifdef BTX_TORCH_HAS_CUDA
    if (x.is_cuda()) {
      g = detail::moe_swiglu_backward_cuda(dy, x, gates, w1, w3, w2, plan, saved[8], saved[9], needs);
    } else
#endif
    {
      g = detail::moe_swiglu_backward_cpu(dy, x, gates, w1, w3, w2, plan, saved[8], saved[9], needs);
    }
    return {g.dx, at::Tensor(), g.dgates, g.dw1, g.dw3, g.dw2, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor moe_swiglu(const at::Tensor& x, const at::Tensor& expert_index, const at::Tensor& gates,
                      const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2, const MoeOptions& opts,
                      MoeStats* stats) {
  // Under CUDA autocast the layer behaves like at::linear: float inputs are cast to the autocast dtype, so
  // a float32 model trains with bf16 expert GEMMs and autograd casts the gradients back for the params.
  if (x.is_cuda() && cuda_autocast_enabled()) {
    const at::ScalarType amp = cuda_autocast_dtype();
    auto cast = [amp](const at::Tensor& t) { return t.is_floating_point() ? t.to(amp) : t; };
    if (x.scalar_type() != amp || gates.scalar_type() != amp || w1.scalar_type() != amp ||
        w3.scalar_type() != amp || w2.scalar_type() != amp) {
      return moe_swiglu(cast(x), expert_index, cast(gates), cast(w1), cast(w3), cast(w2), opts, stats);
    }
  }
  check_args(x, expert_index, gates, w1, w3, w2);
  const at::Tensor xc = x.contiguous(), gc = gates.contiguous();
  const at::Tensor w1c = w1.contiguous(), w3c = w3.contiguous(), w2c = w2.contiguous();
  const bool wants_grad = torch::autograd::GradMode::is_enabled() &&
                          (x.requires_grad() || gates.requires_grad() || w1.requires_grad() ||
                           w3.requires_grad() || w2.requires_grad());
  if (!wants_grad) {
    // Inference: same kernels, nothing kept for a backward.
    const DispatchPlan plan = make_dispatch_plan(expert_index, w1.size(0), opts.capacity_factor);
    fill_stats(stats, plan);
    return run_forward(xc, gc, w1c, w3c, w2c, plan, /*keep_activations=*/false).y;
  }
  return MoeSwigluFunction::apply(xc, expert_index.contiguous(), gc, w1c, w3c, w2c, opts.capacity_factor,
                                  stats)[0];
}

bool cuda_compiled() {
#ifdef BTX_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace btx::kernels
