#include "btx/kernels/chunked_loss.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace btx::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t ignore_index) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "cross_entropy: hidden must be [N, D] and weight [V, D], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "cross_entropy: targets must be int64 [", hidden.size(0), "], got ", targets.scalar_type(), " ",
              targets.sizes());
  const at::Tensor bad = targets.ne(ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(weight.size(0))));
  if (targets.numel() > 0 && bad.any().item<bool>()) {
    const int64_t at_row = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, "cross_entropy: target ", targets[at_row].item<int64_t>(), " at row ", at_row,
                " is outside [0, ", weight.size(0), ") and is not ignore_index ", ignore_index);
  }
}

struct ChunkedCrossEntropyFn : public torch::autograd::Function<ChunkedCrossEntropyFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t chunk, int64_t ignore_index) {
    const int64_t N = hidden.size(0);
    const at::ScalarType acc = acc_type(hidden.scalar_type());
    // Under mixed precision the hidden state is bf16 and the head float32: one cast of the head per step.
    const at::Tensor w = weight.to(hidden.scalar_type());
    const at::Tensor valid = targets.ne(ignore_index);
    const at::Tensor safe = targets.masked_fill(valid.logical_not(), 0);
    at::Tensor lse = at::empty({N}, hidden.options().dtype(acc));
    at::Tensor picked = at::empty({N}, hidden.options().dtype(acc));
    for (int64_t c0 = 0; c0 < N; c0 += chunk) {
      const int64_t n = std::min(chunk, N - c0);
      const at::Tensor logits = at::matmul(hidden.narrow(0, c0, n), w.t()).to(acc);
      lse.narrow(0, c0, n).copy_(at::logsumexp(logits, -1));
      picked.narrow(0, c0, n).copy_(logits.gather(1, safe.narrow(0, c0, n).unsqueeze(1)).squeeze(1));
    }
    const at::Tensor count = valid.sum().clamp_min(1).to(acc);
    const at::Tensor loss = ((lse - picked) * valid.to(acc)).sum() / count;
    ctx->save_for_backward({hidden, weight, safe, valid, lse, count});
    ctx->saved_data["chunk"] = chunk;
    return loss;
  }

  // d loss / d logits[r] = valid[r] / count * (softmax(logits[r]) - onehot(target[r])), one chunk at a time.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &hidden = s[0], &weight = s[1], &safe = s[2], &valid = s[3], &lse = s[4], &count = s[5];
    const int64_t chunk = ctx->saved_data["chunk"].toInt(), N = hidden.size(0);
    const at::ScalarType acc = acc_type(hidden.scalar_type());
    const bool want_h = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const at::Tensor w = weight.to(hidden.scalar_type());
    const at::Tensor coef = valid.to(acc) * (grads[0].to(acc) / count);
    at::Tensor grad_h = want_h ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_w = want_w ? at::zeros(weight.sizes(), weight.options().dtype(acc)) : at::Tensor();
    for (int64_t c0 = 0; c0 < N; c0 += chunk) {
      const int64_t n = std::min(chunk, N - c0);
      const at::Tensor h = hidden.narrow(0, c0, n);
      at::Tensor p = at::matmul(h, w.t()).to(acc).sub_(lse.narrow(0, c0, n).unsqueeze(1)).exp_();
      p.scatter_add_(1, safe.narrow(0, c0, n).unsqueeze(1), at::full({n, 1}, -1.0, p.options()));
      p.mul_(coef.narrow(0, c0, n).unsqueeze(1));
      const at::Tensor pc = p.to(hidden.scalar_type());
      if (want_h) grad_h.narrow(0, c0, n).copy_(at::matmul(pc, w));
      if (want_w) {
        if (pc.scalar_type() == acc) {
          grad_w.addmm_(pc.t(), h);
        } else {
          grad_w.add_(at::matmul(pc.t(), h).to(acc));
        }
      }
    }
    return {grad_h, want_w ? grad_w.to(weight.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

CrossEntropyResult chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                         int64_t chunk_tokens, int64_t ignore_index) {
  check_inputs(hidden, weight, targets, ignore_index);
  TORCH_CHECK(chunk_tokens > 0, "cross_entropy: chunk_tokens must be > 0, got ", chunk_tokens);
  CrossEntropyResult r;
  r.count = targets.ne(ignore_index).sum();
  if (hidden.size(0) == 0) {
    r.loss = (hidden.sum() * 0 + weight.sum() * 0).to(acc_type(hidden.scalar_type()));
    return r;
  }
  r.loss = ChunkedCrossEntropyFn::apply(hidden, weight, targets, chunk_tokens, ignore_index);
  return r;
}

CrossEntropyResult naive_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                       int64_t ignore_index) {
  check_inputs(hidden, weight, targets, ignore_index);
  const at::ScalarType acc = acc_type(hidden.scalar_type());
  const at::Tensor logits = at::linear(hidden, weight.to(hidden.scalar_type())).to(acc);
  const at::Tensor valid = targets.ne(ignore_index);
  CrossEntropyResult r;
  r.count = valid.sum();
  const at::Tensor sum = at::nll_loss(at::log_softmax(logits, -1), targets, {}, at::Reduction::Sum, ignore_index);
  r.loss = sum / r.count.clamp_min(1).to(acc);
  return r;
}

}  // namespace btx::kernels
