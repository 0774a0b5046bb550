// Language-model cross-entropy without the [N, V] logits: loss = mean over counted tokens of
// CE(hidden @ weightᵀ, targets), computed over chunks of tokens. Forward keeps one logsumexp per token;
// backward recomputes each chunk's softmax and accumulates d hidden and d weight. At vocab 128k and 8k
// tokens the full float32 logits (and their log-softmax for the backward) would be 4 GiB each.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace btx::kernels {

inline constexpr int64_t kIgnoreIndex = -100;  // transformers' / at::nll_loss's "no loss on this token"

struct CrossEntropyResult {
  // Mean over the tokens whose target is not ignore_index (float32; float64 for float64 inputs); 0 when
  // every token is ignored (at::nll_loss gives NaN there), so a rank whose rows are all masked adds nothing.
  at::Tensor loss;
  // How many tokens were counted (int64 scalar): data-parallel ranks weight their means by it.
  at::Tensor count;
};

// hidden [N, D], weight [V, D] (the LM head), targets [N] int64 in [0, V) or ignore_index.
// chunk_tokens > 0 rows per chunk. Gradients flow to hidden and weight.
CrossEntropyResult chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                         int64_t chunk_tokens, int64_t ignore_index = kIgnoreIndex);
// The same through the full logits (at::linear, log_softmax, nll_loss): the baseline of tests and benchmarks.
CrossEntropyResult naive_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                       int64_t ignore_index = kIgnoreIndex);

}  // namespace btx::kernels
