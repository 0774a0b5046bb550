// Activation checkpointing for LibTorch C++ (which has no torch.utils.checkpoint), and peak-memory probes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace btx::kernels {

using CheckpointFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Runs fn(inputs) keeping none of its intermediate activations, only `inputs`; the backward runs fn again
// with gradients enabled, under the forward's RNG state (CPU, and the inputs' CUDA device) and CPU / CUDA
// autocast state, and backpropagates through that re-run. Gradients flow to `inputs` only, so everything fn must
// differentiate — parameters included — has to be passed in `inputs`, not captured. fn is called again after
// checkpoint() returns: it must capture by value. Outputs must be floating-point tensors computed by fn
// (not inputs returned as they are). Under no-grad mode this is just fn(inputs).
std::vector<at::Tensor> checkpoint(const CheckpointFn& fn, const std::vector<at::Tensor>& inputs);

// Peak resident memory of this process in bytes (Linux VmHWM, else getrusage's ru_maxrss); -1 if unknown.
int64_t host_peak_bytes();
// Peak bytes allocated by the CUDA caching allocator on `device`; -1 without a CUDA LibTorch.
int64_t cuda_peak_allocated_bytes(int64_t device);

}  // namespace btx::kernels
