// Declarations shared between the operator front end (moe_swiglu.cpp) and its device back ends.
#pragma once

#include <ATen/ATen.h>

#include "btx/kernels/moe.h"

namespace btx::kernels::detail {

// Gradients to compute; the backward skips the GEMMs of inputs that need none (frozen experts, etc.).
struct SwigluNeeds {
  bool x = true, gates = true, w1 = true, w3 = true, w2 = true;
};

struct SwigluForward {
  at::Tensor y;   // [T, D]
  at::Tensor h1;  // [N, F] pre-activations x W1^T of the sorted rows, kept for the backward
  at::Tensor h3;  // [N, F] x W3^T of the sorted rows
};

struct SwigluGrads {
  at::Tensor dx, dgates, dw1, dw3, dw2;  // undefined where not needed
};

SwigluForward moe_swiglu_forward_cpu(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1,
                                     const at::Tensor& w3, const at::Tensor& w2, const DispatchPlan& plan,
                                     bool keep_activations);

SwigluGrads moe_swiglu_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates,
                                    const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                                    const DispatchPlan& plan, const at::Tensor& h1, const at::Tensor& h3,
                                    const SwigluNeeds& needs);

#ifdef BTX_TORCH_HAS_CUDA
DispatchPlan make_dispatch_plan_cuda(const at::Tensor& expert_index, int64_t num_experts, double capacity_factor);
SwigluForward moe_swiglu_forward_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1,
                                      const at::Tensor& w3, const at::Tensor& w2, const DispatchPlan& plan,
                                      bool keep_activations);
SwigluGrads moe_swiglu_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates,
                                     const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                                     const DispatchPlan& plan, const at::Tensor& h1, const at::Tensor& h3,
                                     const SwigluNeeds& needs);
#endif

}  // namespace btx::kernels::detail
