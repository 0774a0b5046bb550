#include "btx/model/llama.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <memory>

#ifdef BTX_HAVE_KERNELS
#include "btx/kernels/attention.h"
#include "btx/kernels/checkpoint.h"
#include "btx/kernels/moe.h"
#endif

namespace btx::model {

bool KernelsAvailable() {
#ifdef BTX_HAVE_KERNELS
  return true;
#else
  return false;
#endif
}

namespace {
std::string L(int64_t l) { return "model.layers." + std::to_string(l) + "."; }

// What a layer reports besides its output and aux losses (not differentiable, so not through checkpointing).
struct LayerSide {
  at::Tensor ffn_input, expert_counts;
};

// The attention kernel ForwardOptions::attention selects; the naive path is CausalAttention below.
at::Tensor Attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionKind kind, int64_t window) {
#ifdef BTX_HAVE_KERNELS
  kernels::AttentionOptions ao;
  ao.impl = kind == AttentionKind::kNaive     ? kernels::AttentionImpl::kNaive
            : kind == AttentionKind::kChunked ? kernels::AttentionImpl::kChunked
                                              : kernels::AttentionImpl::kAuto;
  ao.window = window;
  if (kernels::resolve_attention(ao.impl, q.size(2)) != kernels::AttentionImpl::kNaive)
    return kernels::causal_attention(q, k, v, ao);
#else
  TORCH_CHECK(kind != AttentionKind::kChunked, "attention 'chunked' needs the btx kernels library");
  (void)window;
#endif
  // Sequences never exceed the sliding window here (ModelConfig::CheckSeqLen), so the plain causal mask is exact.
  return CausalAttention(q, k, v);
}
}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> LlamaModel::Layout(const ModelConfig& c) {
  const int64_t D = c.hidden_size, F = c.intermediate_size, hd = c.head_dim();
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads, E = c.num_local_experts;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, D}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = L(l);
    out.push_back({p + "input_layernorm.weight", {D}});
    out.push_back({p + "self_attn.q_proj.weight", {H * hd, D}});
    out.push_back({p + "self_attn.k_proj.weight", {Hkv * hd, D}});
    out.push_back({p + "self_attn.v_proj.weight", {Hkv * hd, D}});
    out.push_back({p + "self_attn.o_proj.weight", {D, H * hd}});
    if (c.qkv_bias) {
      out.push_back({p + "self_attn.q_proj.bias", {H * hd}});
      out.push_back({p + "self_attn.k_proj.bias", {Hkv * hd}});
      out.push_back({p + "self_attn.v_proj.bias", {Hkv * hd}});
    }
    if (c.o_bias) out.push_back({p + "self_attn.o_proj.bias", {D}});
    out.push_back({p + "post_attention_layernorm.weight", {D}});
    if (c.is_moe()) {
      out.push_back({p + "block_sparse_moe.gate.weight", {E, D}});
      out.push_back({p + "block_sparse_moe.experts.w1", {E, F, D}});
      out.push_back({p + "block_sparse_moe.experts.w3", {E, F, D}});
      out.push_back({p + "block_sparse_moe.experts.w2", {E, D, F}});
    } else {
      out.push_back({p + "mlp.gate_proj.weight", {F, D}});
      out.push_back({p + "mlp.up_proj.weight", {F, D}});
      out.push_back({p + "mlp.down_proj.weight", {D, F}});
    }
  }
  out.push_back({"model.norm.weight", {D}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, D}});
  return out;
}

StatusOr<LlamaModel> LlamaModel::Init(const ModelConfig& cfg, uint64_t seed) {
  BTX_RETURN_IF_ERROR(cfg.Validate());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<std::pair<std::string, at::Tensor>> t;
  for (auto& [name, shape] : Layout(cfg)) {
    // Norm weights start at one and biases at zero, as transformers initialises them; Gemma's norms scale by
    // (1 + weight), so theirs start at zero.
    at::Tensor x = shape.size() > 1                      ? at::normal(0.0, cfg.initializer_range, shape, gen, at::kFloat)
                   : name.ends_with(".bias") || cfg.is_gemma() ? at::zeros(shape, at::kFloat)
                                                       : at::ones(shape, at::kFloat);
    t.emplace_back(name, x);
  }
  return FromTensors(cfg, std::move(t));
}

StatusOr<LlamaModel> LlamaModel::FromTensors(const ModelConfig& cfg, std::vector<std::pair<std::string, at::Tensor>> t) {
  BTX_RETURN_IF_ERROR(cfg.Validate());
  std::unordered_map<std::string, at::Tensor> by_name;
  for (auto& [n, x] : t) by_name[n] = x;
  LlamaModel m;
  m.cfg_ = cfg;
  for (auto& [name, shape] : Layout(cfg)) {
    auto it = by_name.find(name);
    if (it == by_name.end()) return NotFound("missing tensor '" + name + "'");
    if (it->second.sizes().vec() != shape)
      return InvalidArgument("tensor '" + name + "' has shape " + c10::str(it->second.sizes()) + ", config expects " +
                             c10::str(c10::IntArrayRef(shape)));
    at::Tensor x = it->second.to(at::kFloat).contiguous();
    m.index_[name] = m.params_.size();
    m.params_.emplace_back(name, x);
    by_name.erase(it);
  }
  if (!by_name.empty()) return InvalidArgument("unexpected tensor '" + by_name.begin()->first + "' for this config");
  return m;
}

const at::Tensor& LlamaModel::param(const std::string& name) const {
  auto it = index_.find(name);
  TORCH_CHECK(it != index_.end(), "no parameter ", name);
  return params_[it->second].second;
}

void LlamaModel::To(c10::Device device) {
  for (auto& [n, p] : params_) {
    bool rg = p.requires_grad();
    p = p.detach().to(device);
    if (rg) p.requires_grad_(true);
  }
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor var = xf.pow(2).mean(-1, true);
  return weight * (xf * at::rsqrt(var + eps)).to(x.scalar_type());
}

at::Tensor GemmaRmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // As transformers' GemmaRMSNorm: the whole product in float32, cast back once.
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor var = xf.pow(2).mean(-1, true);
  return (xf * at::rsqrt(var + eps) * (1.0 + weight.to(at::kFloat))).to(x.scalar_type());
}

at::Tensor Activation(const at::Tensor& x, const std::string& act) {
  if (act == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (act == "gelu") return at::gelu(x);
  return at::silu(x);
}

std::pair<at::Tensor, at::Tensor> RopeTables(int64_t seq_len, int64_t head_dim, double theta, c10::Device device) {
  return RopeTables(seq_len, head_dim, theta, RopeScaling{}, 0, device);
}

// Inverse frequencies as transformers' modeling_rope_utils computes them for each rope_type.
std::pair<at::Tensor, at::Tensor> RopeTables(int64_t seq_len, int64_t head_dim, double theta, const RopeScaling& rs,
                                             int64_t max_position_embeddings, c10::Device device) {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  const double dim = static_cast<double>(head_dim);
  if (rs.type == "dynamic" && seq_len > max_position_embeddings) {
    // NTK-aware: the base grows with the sequence once it is longer than the trained context.
    const double len = static_cast<double>(seq_len), max_pos = static_cast<double>(max_position_embeddings);
    theta *= std::pow(rs.factor * len / max_pos - (rs.factor - 1), dim / (dim - 2));
  }
  at::Tensor inv = 1.0 / at::pow(theta, at::arange(0, head_dim, 2, opts) / dim);
  if (rs.type == "linear") inv = inv / rs.factor;
  if (rs.type == "llama3") {
    const double old_len = static_cast<double>(rs.original_max_position_embeddings);
    const double low_wavelen = old_len / rs.low_freq_factor, high_wavelen = old_len / rs.high_freq_factor;
    at::Tensor wavelen = 2 * M_PI / inv;
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv / rs.factor, inv);
    at::Tensor smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled;
    at::Tensor medium = wavelen.ge(high_wavelen).logical_and(wavelen.le(low_wavelen));
    inv = at::where(medium, smoothed, scaled);
  }
  at::Tensor freqs = at::outer(at::arange(seq_len, opts), inv);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos().to(at::kFloat).to(device), emb.sin().to(at::kFloat).to(device)};
}

at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rot = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.to(x.scalar_type()) + rot * sin.to(x.scalar_type());
}

at::Tensor CausalAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t H = q.size(1), Hkv = k.size(1), T = q.size(2), hd = q.size(3);
  at::Tensor kk = H == Hkv ? k : k.repeat_interleave(H / Hkv, 1);
  at::Tensor vv = H == Hkv ? v : v.repeat_interleave(H / Hkv, 1);
  at::Tensor scores = at::matmul(q, kk.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
  at::Tensor future = at::ones({T, T}, at::TensorOptions().dtype(at::kBool).device(q.device())).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  at::Tensor probs = at::softmax(scores.to(at::kFloat), -1).to(q.scalar_type());
  return at::matmul(probs, vv);
}

ReferenceMoeOut ReferenceMoe(const at::Tensor& x, const at::Tensor& logits, int64_t top_k, const at::Tensor& w1,
                             const at::Tensor& w3, const at::Tensor& w2, const std::string& act) {
  at::Tensor probs = at::softmax(logits.to(at::kFloat), -1);
  auto [vals, idx] = probs.topk(top_k, -1);
  at::Tensor gates = (vals / vals.sum(-1, true)).to(x.scalar_type());
  return {ReferenceExperts(x, idx, gates, w1, w3, w2, act), probs, idx};
}

at::Tensor ReferenceExperts(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& gates, const at::Tensor& w1,
                            const at::Tensor& w3, const at::Tensor& w2, const std::string& act) {
  const int64_t E = w1.size(0);
  at::Tensor y = at::zeros_like(x);
  for (int64_t e = 0; e < E; ++e) {
    at::Tensor hit = idx.eq(e);
    at::Tensor rows = hit.any(-1).nonzero().flatten();
    if (rows.numel() == 0) continue;
    at::Tensor g = (gates * hit.to(gates.scalar_type())).sum(-1).index_select(0, rows);
    at::Tensor xe = x.index_select(0, rows);
    at::Tensor he = Activation(at::matmul(xe, w1[e].t()), act) * at::matmul(xe, w3[e].t());
    y = y.index_add(0, rows, at::matmul(he, w2[e].t()) * g.unsqueeze(1));
  }
  return y;
}

ForwardOutput LlamaModel::Forward(const at::Tensor& tokens, const ForwardOptions& opts) const {
  const ModelConfig& c = cfg_;
  const int64_t B = tokens.size(0), T = tokens.size(1), D = c.hidden_size, hd = c.head_dim();
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const double eps = c.rms_norm_eps;
  ForwardOutput out;
  TORCH_CHECK(c.CheckSeqLen(T).ok(), c.CheckSeqLen(T).message());
  at::Tensor x = at::embedding(P("model.embed_tokens.weight"), tokens);
  // Gemma scales embeddings by sqrt(D) rounded to their dtype, as transformers does.
  if (c.is_gemma()) x = x * at::scalar_tensor(std::sqrt(static_cast<double>(D)), x.options());
  auto norm = [&](const at::Tensor& t, const at::Tensor& w) {
    return c.is_gemma() ? GemmaRmsNorm(t, w, eps) : RmsNorm(t, w, eps);
  };
  auto [cos, sin] = RopeTables(T, hd, c.rope_theta, c.rope_scaling, c.max_position_embeddings, x.device());
  at::Tensor lb_sum, z_sum;
  // One decoder layer: input and parameters in, {output} (dense) or {output, lb, z} (MoE) out; routing counts and
  // the FFN input go to `side`. Activation checkpointing calls it again in the backward, after Forward returned:
  // it captures by value, and reads parameters through `w` (the re-run's differentiable inputs) when given.
  auto layer = [this, cos = cos, sin = sin, opts, B, T, D, H, Hkv, hd, eps](
                   int64_t l, at::Tensor x, const std::unordered_map<std::string, at::Tensor>* w,
                   LayerSide* side) -> std::vector<at::Tensor> {
    const ModelConfig& c = cfg_;
    auto P = [&](const std::string& name) -> const at::Tensor& {
      if (w != nullptr) {
        auto it = w->find(name);
        if (it != w->end()) return it->second;
      }
      return param(name);
    };
    auto norm = [&](const at::Tensor& t, const at::Tensor& weight) {
      return c.is_gemma() ? GemmaRmsNorm(t, weight, eps) : RmsNorm(t, weight, eps);
    };
    auto bias = [&](const std::string& name) { return index_.count(name) ? P(name) : at::Tensor(); };
    at::Tensor lb_out, z_out;
    const std::string p = L(l);
    at::Tensor h = norm(x, P(p + "input_layernorm.weight"));
    at::Tensor q = at::linear(h, P(p + "self_attn.q_proj.weight"), bias(p + "self_attn.q_proj.bias"))
                       .view({B, T, H, hd}).transpose(1, 2);
    at::Tensor k = at::linear(h, P(p + "self_attn.k_proj.weight"), bias(p + "self_attn.k_proj.bias"))
                       .view({B, T, Hkv, hd}).transpose(1, 2);
    at::Tensor v = at::linear(h, P(p + "self_attn.v_proj.weight"), bias(p + "self_attn.v_proj.bias"))
                       .view({B, T, Hkv, hd}).transpose(1, 2);
    q = ApplyRope(q, cos, sin);
    k = ApplyRope(k, cos, sin);
    at::Tensor a = Attend(q, k, v, opts.attention, c.sliding_window).transpose(1, 2).reshape({B, T, H * hd});
    x = x + at::linear(a, P(p + "self_attn.o_proj.weight"), bias(p + "self_attn.o_proj.bias"));
    h = norm(x, P(p + "post_attention_layernorm.weight"));
    if (opts.collect_ffn_inputs) side->ffn_input = h.detach();
    at::Tensor y;
    if (!c.is_moe()) {
      y = at::linear(Activation(at::linear(h, P(p + "mlp.gate_proj.weight")), c.hidden_act) *
                         at::linear(h, P(p + "mlp.up_proj.weight")),
                     P(p + "mlp.down_proj.weight"));
    } else {
      const int64_t E = c.num_local_experts;
      const int64_t top_k = opts.top_k >= 1 ? opts.top_k : c.num_experts_per_tok;
      at::Tensor h2 = h.reshape({B * T, D});
      at::Tensor logits = at::linear(h2, P(p + "block_sparse_moe.gate.weight"));
      const at::Tensor& w1 = P(p + "block_sparse_moe.experts.w1");
      const at::Tensor& w3 = P(p + "block_sparse_moe.experts.w3");
      const at::Tensor& w2 = P(p + "block_sparse_moe.experts.w2");
      at::Tensor idx, lb, z;
      if (opts.backend == MoeBackend::kKernels && KernelsAvailable()) {
#ifdef BTX_HAVE_KERNELS
        kernels::RoutingOptions ro;
        ro.top_k = top_k;
        ro.kind = c.router == "sparsemixer" ? kernels::RouterKind::kSparseMixer : kernels::RouterKind::kSoftmaxTopK;
        ro.training = opts.training;
        kernels::Routing r = kernels::route(logits, ro);
        // The grouped kernels are SwiGLU only; other activations (Gemma's GeGLU) take the per-expert loop.
        y = c.hidden_act == "silu" ? kernels::moe_swiglu(h2, r.expert_index, r.gates, w1, w3, w2)
                                   : ReferenceExperts(h2, r.expert_index, r.gates, w1, w3, w2, c.hidden_act);
        idx = r.expert_index;
        lb = kernels::load_balancing_loss(r.probs, r.expert_index, E);
        z = kernels::router_z_loss(logits);
#endif
      } else {
        TORCH_CHECK(c.router == "softmax_topk", "router '", c.router, "' needs the btx kernels library");
        ReferenceMoeOut r = ReferenceMoe(h2, logits, top_k, w1, w3, w2, c.hidden_act);
        y = r.y;
        idx = r.expert_index;
        at::Tensor f = at::bincount(idx.flatten(), {}, E).to(at::kFloat) / static_cast<double>(idx.numel());
        lb = static_cast<double>(E) * (f * r.probs.mean(0)).sum();
        z = at::logsumexp(logits.to(at::kFloat), -1).pow(2).mean();
      }
      side->expert_counts = at::bincount(idx.flatten().cpu(), {}, E);
      lb_out = lb;
      z_out = z;
      y = y.reshape({B, T, D});
    }
    x = x + y;
    if (!c.is_moe()) return {x};
    return {x, lb_out, z_out};
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerSide side;
    std::vector<at::Tensor> r;
    if (opts.layer_runner) {
      auto shared = std::make_shared<LayerSide>();
      r = opts.layer_runner(l, x, [layer, l, shared](const at::Tensor& in, const std::unordered_map<std::string, at::Tensor>& w) {
        return layer(l, in, &w, shared.get());
      });
      side = *shared;
    } else if (opts.activation_checkpointing && at::GradMode::is_enabled()) {
#ifdef BTX_HAVE_KERNELS
      // The layer's parameters become checkpoint inputs, so that their gradients flow through the re-run.
      const std::string prefix = L(l);
      std::vector<std::string> names;
      std::vector<at::Tensor> inputs = {x};
      for (const auto& [name, t] : params_) {
        if (name.starts_with(prefix)) {
          names.push_back(name);
          inputs.push_back(t);
        }
      }
      auto shared = std::make_shared<LayerSide>();
      r = kernels::checkpoint(
          [layer, l, names, shared](const std::vector<at::Tensor>& in) {
            std::unordered_map<std::string, at::Tensor> w;
            for (size_t i = 0; i < names.size(); ++i) w.emplace(names[i], in[i + 1]);
            return layer(l, in[0], &w, shared.get());
          },
          inputs);
      side = *shared;
#else
      TORCH_CHECK(false, "activation checkpointing needs the btx kernels library");
#endif
    } else {
      r = layer(l, x, nullptr, &side);
    }
    x = r[0];
    if (opts.collect_ffn_inputs) out.ffn_inputs.push_back(side.ffn_input);
    if (c.is_moe()) {
      out.expert_counts.push_back(side.expert_counts);
      lb_sum = lb_sum.defined() ? lb_sum + r[1] : r[1];
      z_sum = z_sum.defined() ? z_sum + r[2] : r[2];
    }
  }
  x = norm(x, P("model.norm.weight"));
  if (opts.return_hidden) {
    out.hidden = x;  // the caller applies lm_head() (chunked cross-entropy)
  } else {
    out.logits = at::linear(x, lm_head());
  }
  if (c.is_moe()) {
    const double n = static_cast<double>(c.num_hidden_layers);
    out.load_balance_loss = lb_sum / n;
    out.z_loss = z_sum / n;
    out.aux_loss = lb_sum * c.router_aux_loss_coef + z_sum * c.router_z_loss_coef;
  } else {
    out.aux_loss = at::zeros({}, x.options().dtype(at::kFloat));
  }
  return out;
}

}  // namespace btx::model
