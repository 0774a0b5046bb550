#include "btx/kernels/attention.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/version.h>

#include <cmath>
#include <limits>

namespace btx::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, heads, T, head_dim], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3), "attention: q ", q.sizes(),
              " does not match k ", k.sizes(), " in batch, length or head_dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention: ", q.size(1),
              " query heads are not a multiple of ", k.size(1), " key/value heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must share a dtype");
  TORCH_CHECK(window >= 0, "attention: window must be >= 0, got ", window);
}

double resolve_scale(double scale, int64_t head_dim) {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// Scores, softmax statistics and accumulators: float64 stays float64, everything else runs in float32.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [nq, nk] bool, true where key k0 + c is hidden from query q0 + r; undefined when the block is fully visible
// (most blocks below the diagonal, which then skip the masking pass).
at::Tensor block_mask(int64_t q0, int64_t nq, int64_t k0, int64_t nk, int64_t window, c10::Device dev) {
  const bool causal_cut = k0 + nk - 1 > q0;
  const bool window_cut = window > 0 && (q0 + nq - 1) - k0 >= window;
  if (!causal_cut && !window_cut) return {};
  const auto opts = at::TensorOptions().dtype(at::kLong).device(dev);
  const at::Tensor qi = at::arange(q0, q0 + nq, opts).unsqueeze(1), kj = at::arange(k0, k0 + nk, opts).unsqueeze(0);
  at::Tensor hidden = kj.gt(qi);
  if (window > 0) hidden = hidden.logical_or((qi - kj).ge(window));
  return hidden;
}

// First key any query of [q0, q0 + nq) can see.
int64_t first_key(int64_t q0, int64_t window) { return window > 0 ? std::max<int64_t>(0, q0 - window + 1) : 0; }

// Layout shared by forward and backward: queries grouped by their key/value head, [B, Hkv, g, T, hd], so one
// block product [B, Hkv, g * nq, hd] x [B, Hkv, hd, nk] serves all g query heads of a kv head without copying k/v.
struct Geometry {
  int64_t B, H, Hkv, g, T, hd;
  Geometry(const at::Tensor& q, const at::Tensor& k)
      : B(q.size(0)), H(q.size(1)), Hkv(k.size(1)), g(q.size(1) / k.size(1)), T(q.size(2)), hd(q.size(3)) {}
  // Rows q0..q0+nq of a [B, H, T, X] tensor viewed as [B, Hkv, g, T, X]: [B, Hkv, g * nq, X] (a copy).
  at::Tensor rows(const at::Tensor& grouped, int64_t q0, int64_t nq) const {
    return grouped.narrow(3, q0, nq).reshape({B, Hkv, g * nq, grouped.size(4)});
  }
};

// Block scores from pre-scaled queries, masked, in the accumulation dtype: [B, Hkv, g * nq, nk].
at::Tensor block_scores(const Geometry& G, const at::Tensor& qb, const at::Tensor& kb, int64_t q0, int64_t nq, int64_t k0,
                        int64_t nk, int64_t window) {
  at::Tensor s = at::matmul(qb, kb.transpose(-2, -1));
  const at::Tensor hidden = block_mask(q0, nq, k0, nk, window, s.device());
  if (hidden.defined()) s.view({G.B, G.Hkv, G.g, nq, nk}).masked_fill_(hidden, kNegInf);
  return s;
}

// Forward over the blocks of q [B, H, T, hd], k / v [B, Hkv, T, hd] (contiguous), writing out [B, Hkv, g, T, hd]
// and lse [B, Hkv, g, T] (accumulation dtype; views of larger tensors are fine).
void forward_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, double scale,
                    int64_t block_q, int64_t block_k, const at::Tensor& out, const at::Tensor& lse) {
  const at::ScalarType acc = out.scalar_type();
  const Geometry G(q, k);
  const at::Tensor qg = q.view({G.B, G.Hkv, G.g, G.T, G.hd});
  for (int64_t q0 = 0; q0 < G.T; q0 += block_q) {
    const int64_t nq = std::min(block_q, G.T - q0);
    const at::Tensor qb = G.rows(qg, q0, nq).to(acc).mul(scale);  // scaled once per row (a new tensor: rows() may be a view of q)
    at::Tensor m = at::full({G.B, G.Hkv, G.g * nq, 1}, kNegInf, qb.options());
    at::Tensor l = at::zeros_like(m);
    at::Tensor o = at::zeros({G.B, G.Hkv, G.g * nq, G.hd}, qb.options());
    at::Tensor m_safe;
    for (int64_t k0 = first_key(q0, window); k0 < q0 + nq; k0 += block_k) {
      const int64_t nk = std::min(block_k, q0 + nq - k0);
      const at::Tensor kb = k.narrow(2, k0, nk).to(acc), vb = v.narrow(2, k0, nk).to(acc);
      const at::Tensor s = block_scores(G, qb, kb, q0, nq, k0, nk, window);
      const at::Tensor m_new = at::maximum(m, s.amax(-1, true));
      // With a window a row may have seen only hidden keys so far and keep max -inf; shifting by 0 then avoids
      // inf - inf. Without one, key 0 (in the first block) is visible to every row.
      m_safe = window > 0 ? m_new.masked_fill(m_new.eq(kNegInf), 0.0) : m_new;
      const at::Tensor p = (s - m_safe).exp_();
      const at::Tensor alpha = (m - m_safe).exp_();
      l = l.mul_(alpha).add_(p.sum(-1, true));
      o = o.mul_(alpha).add_(at::matmul(p, vb));
      m = m_new;
    }
    // Every query sees at least itself, so l > 0 and m is finite here.
    out.narrow(3, q0, nq).copy_(o.div_(l).view({G.B, G.Hkv, G.g, nq, G.hd}));
    lse.narrow(3, q0, nq).copy_((m_safe + l.log()).view({G.B, G.Hkv, G.g, nq}));
  }
}

// Flash-attention backward: per (query block, key block) the probabilities are recomputed from the saved
// logsumexp, P = exp(S - lse); dV += Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ += scale dS K,
// dK += scale dSᵀ Q. dO and out [B, H, T, hd]; dq [B, Hkv, g, T, hd], dk / dv [B, Hkv, T, hd] (zeroed).
void backward_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const at::Tensor& dO_in, int64_t window, double scale, int64_t block_q,
                     int64_t block_k, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const at::ScalarType acc = dq.scalar_type();
  const Geometry G(q, k);
  const at::Tensor dO = dO_in.view({G.B, G.Hkv, G.g, G.T, G.hd});
  const at::Tensor delta = (dO * out.to(acc).view({G.B, G.Hkv, G.g, G.T, G.hd})).sum(-1, true);
  const at::Tensor qg = q.view({G.B, G.Hkv, G.g, G.T, G.hd});
  const at::Tensor lseg = lse.unsqueeze(-1);
  for (int64_t q0 = 0; q0 < G.T; q0 += block_q) {
    const int64_t nq = std::min(block_q, G.T - q0);
    const at::Tensor qb = G.rows(qg, q0, nq).to(acc).mul(scale), dOb = G.rows(dO, q0, nq);
    const at::Tensor lseb = G.rows(lseg, q0, nq), deltab = G.rows(delta, q0, nq);
    at::Tensor dqb = at::zeros_like(qb);
    for (int64_t k0 = first_key(q0, window); k0 < q0 + nq; k0 += block_k) {
      const int64_t nk = std::min(block_k, q0 + nq - k0);
      const at::Tensor kb = k.narrow(2, k0, nk).to(acc), vb = v.narrow(2, k0, nk).to(acc);
      const at::Tensor p = block_scores(G, qb, kb, q0, nq, k0, nk, window).sub_(lseb).exp_();
      dv.narrow(2, k0, nk).add_(at::matmul(p.transpose(-2, -1), dOb));
      const at::Tensor ds = at::matmul(dOb, vb.transpose(-2, -1)).sub_(deltab).mul_(p);
      dqb.add_(at::matmul(ds, kb), scale);
      dk.narrow(2, k0, nk).add_(at::matmul(ds.transpose(-2, -1), qb));  // qb carries the scale
    }
    dq.narrow(3, q0, nq).copy_(dqb.view({G.B, G.Hkv, G.g, nq, G.hd}));
  }
}

struct ChunkedAttentionFn : public torch::autograd::Function<ChunkedAttentionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            int64_t window, double scale, int64_t block_q, int64_t block_k) {
    const at::ScalarType acc = acc_type(q_in.scalar_type());
    const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const Geometry G(q, k);
    at::Tensor out = at::empty({G.B, G.Hkv, G.g, G.T, G.hd}, q.options().dtype(acc));
    at::Tensor lse = at::empty({G.B, G.Hkv, G.g, G.T}, q.options().dtype(acc));
    // All heads batched in every block op. (One CPU task per kv head with single-threaded block ops was tried:
    // with OpenBLAS's own threads, calls from several tasks at once serialise and ran slower on 2 shared cores.)
    forward_blocks(q, k, v, window, scale, block_q, block_k, out, lse);
    at::Tensor result = out.view({G.B, G.H, G.T, G.hd}).to(q.scalar_type());
    ctx->save_for_backward({q, k, v, result, lse});
    ctx->saved_data["window"] = window;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["block_q"] = block_q;
    ctx->saved_data["block_k"] = block_k;
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const int64_t window = ctx->saved_data["window"].toInt(), block_q = ctx->saved_data["block_q"].toInt(),
                  block_k = ctx->saved_data["block_k"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const at::ScalarType acc = acc_type(q.scalar_type());
    const Geometry G(q, k);
    const at::Tensor dO = grads[0].to(acc).contiguous();
    at::Tensor dq = at::empty({G.B, G.Hkv, G.g, G.T, G.hd}, dO.options());
    at::Tensor dk = at::zeros({G.B, G.Hkv, G.T, G.hd}, dO.options()), dv = at::zeros_like(dk);
    // Serial loops, fixed reduction order: deterministic on CPU.
    backward_blocks(q, k, v, out, lse, dO, window, scale, block_q, block_k, dq, dk, dv);
    return {dq.view({G.B, G.H, G.T, G.hd}).to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

#if TORCH_VERSION_MAJOR >= 2
at::Tensor sdpa_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window, double scale) {
  const int64_t H = q.size(1), Hkv = k.size(1), T = q.size(2), hd = q.size(3);
  // GQA by repetition: enable_gqa only exists from 2.5 on.
  const at::Tensor kk = H == Hkv ? k : k.repeat_interleave(H / Hkv, 1);
  const at::Tensor vv = H == Hkv ? v : v.repeat_interleave(H / Hkv, 1);
  // 2.0 has no `scale` argument; its fixed 1/sqrt(hd) is corrected on q instead.
  const double natural = 1.0 / std::sqrt(static_cast<double>(hd));
  const at::Tensor qq = std::abs(scale - natural) > 1e-12 * natural ? q * (scale / natural) : q;
  if (window > 0 && window < T) {
    const auto opts = at::TensorOptions().dtype(at::kLong).device(q.device());
    const at::Tensor i = at::arange(T, opts).unsqueeze(1), j = at::arange(T, opts).unsqueeze(0);
    const at::Tensor allowed = j.le(i).logical_and((i - j).lt(window));  // true = takes part
    return at::scaled_dot_product_attention(qq, kk, vv, allowed, 0.0, false);
  }
  return at::scaled_dot_product_attention(qq, kk, vv, c10::nullopt, 0.0, true);
}
#endif

}  // namespace

bool parse_attention_impl(const std::string& name, AttentionImpl* out) {
  for (AttentionImpl i : {AttentionImpl::kAuto, AttentionImpl::kNaive, AttentionImpl::kChunked, AttentionImpl::kSdpa}) {
    if (name == attention_impl_name(i)) {
      *out = i;
      return true;
    }
  }
  return false;
}

const char* attention_impl_name(AttentionImpl impl) {
  switch (impl) {
    case AttentionImpl::kAuto: return "auto";
    case AttentionImpl::kNaive: return "naive";
    case AttentionImpl::kChunked: return "chunked";
    case AttentionImpl::kSdpa: return "sdpa";
  }
  return "?";
}

bool sdpa_available() {
#if TORCH_VERSION_MAJOR >= 2
  return true;
#else
  return false;
#endif
}

AttentionImpl resolve_attention(AttentionImpl impl, int64_t seq_len) {
  if (impl != AttentionImpl::kAuto) return impl;
  if (sdpa_available()) return AttentionImpl::kSdpa;
  return seq_len >= kChunkedMinSeq ? AttentionImpl::kChunked : AttentionImpl::kNaive;
}

at::Tensor naive_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                                  double scale) {
  check_inputs(q, k, v, window);
  const int64_t H = q.size(1), Hkv = k.size(1), T = q.size(2);
  const at::Tensor kk = H == Hkv ? k : k.repeat_interleave(H / Hkv, 1);
  const at::Tensor vv = H == Hkv ? v : v.repeat_interleave(H / Hkv, 1);
  at::Tensor scores = at::matmul(q, kk.transpose(-2, -1)) * resolve_scale(scale, q.size(3));
  const auto opts = at::TensorOptions().dtype(at::kLong).device(q.device());
  const at::Tensor i = at::arange(T, opts).unsqueeze(1), j = at::arange(T, opts).unsqueeze(0);
  at::Tensor hidden = j.gt(i);
  if (window > 0) hidden = hidden.logical_or((i - j).ge(window));
  scores = scores.masked_fill(hidden, kNegInf);
  const at::Tensor probs = at::softmax(scores.to(acc_type(q.scalar_type())), -1).to(q.scalar_type());
  return at::matmul(probs, vv);
}

at::Tensor chunked_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                                    double scale, int64_t block_q, int64_t block_k) {
  check_inputs(q, k, v, window);
  TORCH_CHECK(block_q > 0 && block_k > 0, "attention: block sizes must be > 0, got ", block_q, " and ", block_k);
  if (q.size(2) == 0 || q.numel() == 0) return at::empty_like(q);
  return ChunkedAttentionFn::apply(q, k, v, window, resolve_scale(scale, q.size(3)), block_q, block_k);
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& opts) {
  switch (resolve_attention(opts.impl, q.dim() == 4 ? q.size(2) : 0)) {
    case AttentionImpl::kNaive: return naive_causal_attention(q, k, v, opts.window, opts.scale);
    case AttentionImpl::kChunked:
      return chunked_causal_attention(q, k, v, opts.window, opts.scale, opts.block_q > 0 ? opts.block_q : kDefaultBlockQ,
                                      opts.block_k > 0 ? opts.block_k : kDefaultBlockK);
    case AttentionImpl::kSdpa:
#if TORCH_VERSION_MAJOR >= 2
      check_inputs(q, k, v, opts.window);
      return sdpa_attention(q, k, v, opts.window, resolve_scale(opts.scale, q.size(3)));
#else
      TORCH_CHECK(false, "attention 'sdpa' needs LibTorch >= 2.0 (this one is ", TORCH_VERSION_MAJOR, ".",
                  TORCH_VERSION_MINOR, "); use 'auto', 'naive' or 'chunked'");
#endif
    case AttentionImpl::kAuto: break;
  }
  TORCH_CHECK(false, "attention: unresolved implementation");
}

}  // namespace btx::kernels
