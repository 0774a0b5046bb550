// CUDA back end of the operators for a LibTorch built with CUDA: allocates with ATen on the tensors'
// device and stream, then calls the raw kernels of btx_kernels_cuda. Compiled only when BTX_TORCH_HAS_CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "btx/kernels/cuda/moe_cuda.h"
#include "internal.h"

namespace btx::kernels::detail {
namespace {

namespace kc = btx::kernels::cuda;

kc::DType raw_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kc::DType::kFloat32;
    case at::kBFloat16:
      return kc::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "CUDA moe_swiglu supports float32 and bfloat16, got ", t.scalar_type());
  }
}

void check(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": ", cudaGetErrorString(status));
}

void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, what, ": cuBLAS status ", static_cast<int>(status));
}

std::vector<int64_t> host_offsets(const DispatchPlan& plan) {
  const at::Tensor h = plan.offsets.cpu();
  return {h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel()};
}

at::Tensor gather(const at::Tensor& src, const DispatchPlan& plan, int64_t k, cudaStream_t stream) {
  const int64_t rows = plan.sorted_assign.numel();
  at::Tensor dst = at::empty({rows, src.size(1)}, src.options());
  check(kc::gather_rows(src.data_ptr(), raw_dtype(src), src.size(1), plan.sorted_assign.data_ptr<int64_t>(), rows, k,
                        dst.data_ptr(), stream),
        "gather_rows");
  return dst;
}

}  // namespace

DispatchPlan make_dispatch_plan_cuda(const at::Tensor& expert_index, int64_t num_experts, double capacity_factor) {
  c10::cuda::CUDAGuard guard(expert_index.device());
  const at::Tensor idx = expert_index.contiguous();
  const int64_t assignments = idx.numel();
  if (assignments > 0) {
    // The sort kernels index per-expert counters by the expert id, so range is checked first.
    TORCH_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < num_experts,
                "expert index out of range [0, ", num_experts, ")");
  }
  const int64_t cap = expert_capacity(assignments, num_experts, capacity_factor);
  const auto opts = idx.options();
  DispatchPlan plan;
  plan.offsets = at::empty({num_experts + 1}, opts);
  at::Tensor sorted = at::empty({assignments}, opts);
  plan.row_of_assign = at::empty({assignments}, opts);
  at::Tensor work =
      at::empty({static_cast<int64_t>(kc::dispatch_workspace_bytes(assignments, num_experts))}, opts.dtype(at::kByte));
  check(kc::build_dispatch(idx.data_ptr<int64_t>(), assignments, num_experts, cap, work.data_ptr(),
                           plan.offsets.data_ptr<int64_t>(), sorted.data_ptr<int64_t>(),
                           plan.row_of_assign.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream()),
        "build_dispatch");
  const int64_t kept = plan.offsets[num_experts].item<int64_t>();  // the grouped GEMM needs sizes on the host
  plan.sorted_assign = sorted.narrow(0, 0, kept);
  plan.dropped = assignments - kept;
  return plan;
}

SwigluForward moe_swiglu_forward_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1,
                                      const at::Tensor& w3, const at::Tensor& w2, const DispatchPlan& plan,
                                      bool keep_activations) {
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  const kc::DType dt = raw_dtype(x);
  const int64_t tokens = x.size(0), dim = x.size(1), hidden = w1.size(1), experts = w1.size(0), k = gates.size(1);
  const int64_t rows = plan.sorted_assign.numel();
  const std::vector<int64_t> off = host_offsets(plan);

  const at::Tensor xs = gather(x, plan, k, stream);
  at::Tensor h1 = at::empty({rows, hidden}, x.options()), h3 = at::empty({rows, hidden}, x.options());
  check(kc::grouped_gemm(blas, kc::GroupedOp::kRowsTimesWeightT, dt, off.data(), experts, hidden, dim, xs.data_ptr(),
                         w1.data_ptr(), h1.data_ptr(), 0.f, stream),
        "x W1^T");
  check(kc::grouped_gemm(blas, kc::GroupedOp::kRowsTimesWeightT, dt, off.data(), experts, hidden, dim, xs.data_ptr(),
                         w3.data_ptr(), h3.data_ptr(), 0.f, stream),
        "x W3^T");
  at::Tensor act = at::empty({rows, hidden}, x.options());
  check(kc::swiglu_forward(h1.data_ptr(), h3.data_ptr(), dt, rows * hidden, act.data_ptr(), stream), "swiglu");
  at::Tensor ys = at::empty({rows, dim}, x.options());
  check(kc::grouped_gemm(blas, kc::GroupedOp::kRowsTimesWeightT, dt, off.data(), experts, dim, hidden,
                         act.data_ptr(), w2.data_ptr(), ys.data_ptr(), 0.f, stream),
        "act W2^T");
  at::Tensor y = at::empty({tokens, dim}, x.options());
  check(kc::combine_rows(ys.data_ptr(), dt, dim, plan.row_of_assign.data_ptr<int64_t>(), gates.data_ptr(), tokens, k,
                         y.data_ptr(), stream),
        "combine_rows");
  if (!keep_activations) return {y, {}, {}};
  return {y, h1, h3};
}

SwigluGrads moe_swiglu_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates,
                                     const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                                     const DispatchPlan& plan, const at::Tensor& h1, const at::Tensor& h3,
                                     const SwigluNeeds& needs) {
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  const kc::DType dt = raw_dtype(x);
  const int64_t tokens = x.size(0), dim = x.size(1), hidden = w1.size(1), experts = w1.size(0), k = gates.size(1);
  const int64_t rows = plan.sorted_assign.numel();
  const bool need_hidden_grad = needs.x || needs.w1 || needs.w3;
  const std::vector<int64_t> off = host_offsets(plan);
  SwigluGrads grads;

  const at::Tensor dys = gather(dy.to(x.scalar_type()), plan, k, stream);
  at::Tensor g = at::empty({rows, hidden}, x.options());
  check(kc::grouped_gemm(blas, kc::GroupedOp::kRowsTimesWeight, dt, off.data(), experts, hidden, dim, dys.data_ptr(),
                         w2.data_ptr(), g.data_ptr(), 0.f, stream),
        "dY W2");
  at::Tensor act_gated = needs.w2 ? at::empty({rows, hidden}, x.options()) : at::Tensor();
  at::Tensor dh3 = need_hidden_grad ? at::empty({rows, hidden}, x.options()) : at::Tensor();
  at::Tensor dgate_rows = at::empty({rows}, x.options().dtype(at::kFloat));
  check(kc::swiglu_backward(h1.data_ptr(), h3.data_ptr(), g.data_ptr(), gates.data_ptr(),
                            plan.sorted_assign.data_ptr<int64_t>(), rows, hidden, dt,
                            need_hidden_grad ? g.data_ptr() : nullptr, need_hidden_grad ? dh3.data_ptr() : nullptr,
                            needs.w2 ? act_gated.data_ptr() : nullptr, dgate_rows.data_ptr<float>(), stream),
        "swiglu_backward");
  if (needs.w2) {
    grads.dw2 = at::empty_like(w2);
    check(kc::grouped_gemm(blas, kc::GroupedOp::kWeightGrad, dt, off.data(), experts, dim, hidden, dys.data_ptr(),
                           act_gated.data_ptr(), grads.dw2.data_ptr(), 0.f, stream),
          "dW2");
  }
  if (needs.gates) {
    grads.dgates = at::zeros({tokens, k}, gates.options());
    if (rows > 0) grads.dgates.view({-1}).index_put_({plan.sorted_assign}, dgate_rows.to(gates.scalar_type()));
  }
  if (!need_hidden_grad) return grads;
  const at::Tensor& dh1 = g;
  if (needs.w1 || needs.w3) {
    const at::Tensor xs = gather(x, plan, k, stream);
    if (needs.w1) {
      grads.dw1 = at::empty_like(w1);
      check(kc::grouped_gemm(blas, kc::GroupedOp::kWeightGrad, dt, off.data(), experts, hidden, dim, dh1.data_ptr(),
                             xs.data_ptr(), grads.dw1.data_ptr(), 0.f, stream),
            "dW1");
    }
    if (needs.w3) {
      grads.dw3 = at::empty_like(w3);
      check(kc::grouped_gemm(blas, kc::GroupedOp::kWeightGrad, dt, off.data(), experts, hidden, dim, dh3.data_ptr(),
                             xs.data_ptr(), grads.dw3.data_ptr(), 0.f, stream),
            "dW3");
    }
  }
  if (needs.x) {
    at::Tensor dxs = at::empty({rows, dim}, x.options());
    check(kc::grouped_gemm(blas, kc::GroupedOp::kRowsTimesWeight, dt, off.data(), experts, dim, hidden,
                           dh1.data_ptr(), w1.data_ptr(), dxs.data_ptr(), 0.f, stream),
          "dH1 W1");
    check(kc::grouped_gemm(blas, kc::GroupedOp::kRowsTimesWeight, dt, off.data(), experts, dim, hidden,
                           dh3.data_ptr(), w3.data_ptr(), dxs.data_ptr(), 1.f, stream),
          "dH3 W3");
    grads.dx = at::empty_like(x);
    check(kc::combine_rows(dxs.data_ptr(), dt, dim, plan.row_of_assign.data_ptr<int64_t>(), nullptr, tokens, k,
                           grads.dx.data_ptr(), stream),
          "combine_rows (dx)");
  }
  return grads;
}

}  // namespace btx::kernels::detail
