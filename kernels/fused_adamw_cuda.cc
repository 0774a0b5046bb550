// CUDA back end of FusedAdamW for a LibTorch built with CUDA. Compiled only when BTX_TORCH_HAS_CUDA.
#include "fused_adamw_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "btx/kernels/cuda/fused_adamw_cuda.h"

namespace btx::kernels::detail {

void fused_adamw_cuda(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                      const AdamWParams& p) {
  c10::cuda::CUDAGuard guard(w.device());
  btx::kernels::cuda::AdamWCoeffs c;  // rounded to float32 exactly as the CPU path rounds them
  c.decayed = p.weight_decay != 0.0;
  c.decay = static_cast<float>(1.0 - p.lr * p.weight_decay);
  c.beta1 = static_cast<float>(p.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - p.beta1);
  c.beta2 = static_cast<float>(p.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  c.sqrt_bc2 = static_cast<float>(std::sqrt(p.bc2));
  c.eps = static_cast<float>(p.eps);
  c.step = static_cast<float>(-p.lr / p.bc1);
  const cudaError_t status = btx::kernels::cuda::fused_adamw(w.data_ptr<float>(), g.data_ptr<float>(),
                                                             m.data_ptr<float>(), v.data_ptr<float>(), w.numel(), c,
                                                             at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "fused_adamw kernel: ", cudaGetErrorString(status));
}

}  // namespace btx::kernels::detail
