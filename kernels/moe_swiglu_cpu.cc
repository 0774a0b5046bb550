// CPU back end of moe_swiglu: gather rows into expert order, one BLAS GEMM per expert on its contiguous
// slice (no padding), fused element-wise SwiGLU passes, and a per-token combine that visits the token's
// slots in order so the floating-point sums never depend on thread scheduling.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "internal.h"

namespace btx::kernels::detail {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows per parallel task: enough element work per task that scheduling stays negligible.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)); }

// Calls fn(e, begin, rows) for every non-empty expert. GEMMs run one after another so each uses every
// BLAS thread; per-expert slices are large in the sizes that matter (thousands of rows).
// Weight-gradient buffer: every non-empty expert's slice is overwritten by its GEMM, so only the empty
// experts' slices are zeroed (a full memset of all experts costs as much as a small GEMM).
at::Tensor weight_grad_buffer(const at::Tensor& w, const DispatchPlan& plan) {
  at::Tensor out = at::empty_like(w);
  const int64_t* off = plan.offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e < w.size(0); ++e) {
    if (off[e + 1] == off[e]) out[e].zero_();
  }
  return out;
}

template <typename Fn>
void for_each_expert(const DispatchPlan& plan, Fn&& fn) {
  const int64_t* off = plan.offsets.data_ptr<int64_t>();
  const int64_t experts = plan.offsets.numel() - 1;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = off[e + 1] - off[e];
    if (rows > 0) fn(e, off[e], rows);
  }
}

// dst[i] = src[sorted_assign[i] / k]: the token row of every sorted assignment.
at::Tensor gather_rows(const at::Tensor& src, const DispatchPlan& plan, int64_t k) {
  const int64_t rows = plan.sorted_assign.numel();
  const int64_t width = src.size(1);
  at::Tensor dst = at::empty({rows, width}, src.options());
  const int64_t* sorted = plan.sorted_assign.data_ptr<int64_t>();
  const auto bytes = static_cast<size_t>(width) * src.element_size();
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(d + i * bytes, s + (sorted[i] / k) * bytes, bytes);
  });
  return dst;
}

// out[t] = sum over slots s (in order) of scale(t, s) * rows[row_of[t * k + s]]; dropped slots add nothing.
template <typename scalar_t>
void combine_rows(const at::Tensor& rows, const at::Tensor& row_of_assign, const scalar_t* gates, int64_t k,
                  at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t tokens = out.size(0), width = out.size(1);
  const scalar_t* r = rows.data_ptr<scalar_t>();
  const int64_t* row_of = row_of_assign.data_ptr<int64_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, row_grain(width * k), [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(width);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sum.begin(), sum.end(), acc(0));
      for (int64_t s = 0; s < k; ++s) {
        const int64_t row = row_of[t * k + s];
        if (row < 0) continue;
        const acc g = gates ? static_cast<acc>(gates[t * k + s]) : acc(1);
        const scalar_t* src = r + row * width;
        for (int64_t j = 0; j < width; ++j) sum[j] += g * static_cast<acc>(src[j]);
      }
      scalar_t* dst = o + t * width;
      for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(sum[j]);
    }
  });
}

}  // namespace

SwigluForward moe_swiglu_forward_cpu(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& w1,
                                     const at::Tensor& w3, const at::Tensor& w2, const DispatchPlan& plan,
                                     bool keep_activations) {
  const int64_t tokens = x.size(0), k = gates.size(1), dim = x.size(1), hidden = w1.size(1);
  const int64_t rows = plan.sorted_assign.numel();
  const at::Tensor xs = gather_rows(x, plan, k);
  at::Tensor h1 = at::empty({rows, hidden}, x.options());
  at::Tensor h3 = at::empty({rows, hidden}, x.options());
  at::Tensor act = at::empty({rows, hidden}, x.options());
  at::Tensor ys = at::empty({rows, dim}, x.options());

  for_each_expert(plan, [&](int64_t e, int64_t begin, int64_t n) {
    const at::Tensor xe = xs.narrow(0, begin, n);
    at::Tensor h1e = h1.narrow(0, begin, n), h3e = h3.narrow(0, begin, n);
    at::mm_out(h1e, xe, w1[e].t());
    at::mm_out(h3e, xe, w3[e].t());
  });

  // ATen's vectorised silu beats a scalar exp loop several times over.
  at::silu_out(act, h1);
  act.mul_(h3);

  for_each_expert(plan, [&](int64_t e, int64_t begin, int64_t n) {
    at::Tensor ye = ys.narrow(0, begin, n);
    at::mm_out(ye, act.narrow(0, begin, n), w2[e].t());
  });

  at::Tensor y = at::empty({tokens, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moe_swiglu_combine_cpu", [&] {
    combine_rows<scalar_t>(ys, plan.row_of_assign, gates.data_ptr<scalar_t>(), k, y);
  });
  if (!keep_activations) return {y, {}, {}};
  return {y, h1, h3};
}

SwigluGrads moe_swiglu_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gates,
                                    const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
                                    const DispatchPlan& plan, const at::Tensor& h1, const at::Tensor& h3,
                                    const SwigluNeeds& needs) {
  const int64_t tokens = x.size(0), k = gates.size(1), hidden = w1.size(1);
  const int64_t rows = plan.sorted_assign.numel();
  const bool need_hidden_grad = needs.x || needs.w1 || needs.w3;
  SwigluGrads grads;

  // dys: upstream gradient of every sorted row, not yet scaled by its gate.
  at::Tensor dys = gather_rows(dy, plan, k);
  // g = dys W2: gradient w.r.t. the gated activation, per unit gate. Overwritten in place by dh1 below.
  at::Tensor g = at::empty({rows, hidden}, x.options());
  for_each_expert(plan, [&](int64_t e, int64_t begin, int64_t n) {
    at::Tensor ge = g.narrow(0, begin, n);
    at::mm_out(ge, dys.narrow(0, begin, n), w2[e]);
  });

  // One fused pass per row recomputes the activation (cheaper than storing it) and produces everything
  // that depends on it: dgate, the gated activation for dW2, and dh1 / dh3.
  at::Tensor act_gated = needs.w2 ? at::empty({rows, hidden}, x.options()) : at::Tensor();
  at::Tensor dh3 = need_hidden_grad ? at::empty({rows, hidden}, x.options()) : at::Tensor();
  at::Tensor dgate_rows = at::zeros({rows}, x.options().dtype(at::kDouble));
  // The exponentials go through ATen's vectorised sigmoid; the fused loop below is then exp-free.
  const at::Tensor sig = at::sigmoid(h1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moe_swiglu_bwd_act_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* sp = sig.data_ptr<scalar_t>();
    const scalar_t* gate = gates.data_ptr<scalar_t>();
    const int64_t* sorted = plan.sorted_assign.data_ptr<int64_t>();
    const scalar_t* a1 = h1.data_ptr<scalar_t>();
    const scalar_t* a3 = h3.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* ag = needs.w2 ? act_gated.data_ptr<scalar_t>() : nullptr;
    scalar_t* d3 = need_hidden_grad ? dh3.data_ptr<scalar_t>() : nullptr;
    double* dgate = dgate_rows.data_ptr<double>();
    at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc gv = static_cast<acc>(gate[sorted[i]]);
        const int64_t base = i * hidden;
        acc dot = 0;
        for (int64_t f = base; f < base + hidden; ++f) {
          const acc v1 = static_cast<acc>(a1[f]), v3 = static_cast<acc>(a3[f]), sg = static_cast<acc>(sp[f]);
          dot += static_cast<acc>(gp[f]) * v1 * sg * v3;
        }
        dgate[i] = static_cast<double>(dot);
        // Separate loops without branches inside so the compiler can vectorise each.
        if (ag) {
          for (int64_t f = base; f < base + hidden; ++f) {
            ag[f] = static_cast<scalar_t>(gv * static_cast<acc>(a1[f]) * static_cast<acc>(sp[f]) * static_cast<acc>(a3[f]));
          }
        }
        if (d3) {
          for (int64_t f = base; f < base + hidden; ++f) {
            const acc v1 = static_cast<acc>(a1[f]), v3 = static_cast<acc>(a3[f]), sg = static_cast<acc>(sp[f]);
            const acc da = gv * static_cast<acc>(gp[f]);
            d3[f] = static_cast<scalar_t>(da * v1 * sg);
            gp[f] = static_cast<scalar_t>(da * v3 * sg * (acc(1) + v1 * (acc(1) - sg)));
          }
        }
      }
    });
  });

  if (needs.w2) {
    grads.dw2 = weight_grad_buffer(w2, plan);
    for_each_expert(plan, [&](int64_t e, int64_t begin, int64_t n) {
      at::Tensor dw = grads.dw2[e];
      at::mm_out(dw, dys.narrow(0, begin, n).t(), act_gated.narrow(0, begin, n));
    });
  }
  if (needs.gates) {
    grads.dgates = at::zeros({tokens, k}, gates.options());
    if (rows > 0) {
      grads.dgates.view({-1}).index_put_({plan.sorted_assign}, dgate_rows.to(gates.scalar_type()));
    }
  }
  if (!need_hidden_grad) return grads;

  const at::Tensor& dh1 = g;
  if (needs.w1 || needs.w3) {
    const at::Tensor xs = gather_rows(x, plan, k);
    if (needs.w1) grads.dw1 = weight_grad_buffer(w1, plan);
    if (needs.w3) grads.dw3 = weight_grad_buffer(w3, plan);
    for_each_expert(plan, [&](int64_t e, int64_t begin, int64_t n) {
      const at::Tensor xe = xs.narrow(0, begin, n);
      if (needs.w1) {
        at::Tensor dw = grads.dw1[e];
        at::mm_out(dw, dh1.narrow(0, begin, n).t(), xe);
      }
      if (needs.w3) {
        at::Tensor dw = grads.dw3[e];
        at::mm_out(dw, dh3.narrow(0, begin, n).t(), xe);
      }
    });
  }
  if (needs.x) {
    at::Tensor& dxs = dys;  // dys is no longer needed: reuse its storage for the per-row input gradient
    for_each_expert(plan, [&](int64_t e, int64_t begin, int64_t n) {
      at::Tensor out = dxs.narrow(0, begin, n);
      at::mm_out(out, dh1.narrow(0, begin, n), w1[e]);
      out.addmm_(dh3.narrow(0, begin, n), w3[e]);
    });
    grads.dx = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moe_swiglu_bwd_combine_cpu", [&] {
      combine_rows<scalar_t>(dxs, plan.row_of_assign, nullptr, k, grads.dx);
    });
  }
  return grads;
}

}  // namespace btx::kernels::detail
