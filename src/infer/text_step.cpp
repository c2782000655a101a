#include "omnilite/infer/text_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "omnilite/modules/attention.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/quant/gemv.h"
#include "omnilite/quant/nf4.h"

namespace omnilite {
namespace {

bool cpu_fp32(const torch::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous();
}

// float32 or bf16, contiguous on the CPU: the weights a step reads (bf16 ones widened exactly).
bool cpu_float(const torch::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.is_contiguous() &&
         (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16);
}

// A small weight (norm, router, bias) as float32: the tensor itself, or a widened copy of a bf16 one.
torch::Tensor as_f32(const torch::Tensor& t) { return t.to(torch::kFloat32).contiguous(); }

// Rows [o0, o1) of y = W x with W float32 or bf16 [out, in] (quant/gemv.h).
void matvec_rows(const torch::Tensor& w, const float* x, int64_t in, int64_t o0, int64_t o1, float* y) {
  if (w.scalar_type() == torch::kBFloat16)
    quant::matvec_rows_cpu(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), x, in, o0, o1, y);
  else
    quant::matvec_rows_cpu(w.data_ptr<float>(), x, in, o0, o1, y);
}

// A projection as raw buffers: y = W x (+ b) (+ scaling * B A x).
struct Proj {
  int64_t in = 0, out = 0;
  bool is_nf4 = false;
  torch::Tensor weight;       // plain: [out, in] float32 or bf16
  quant::Nf4Tensor nf4;       // NF4: the buffers, contiguous (kept alive for `view`)
  quant::Nf4View view{};      // NF4: raw pointers into `nf4`
  quant::Nf4Activations activations = quant::Nf4Activations::Float32;  // the Nf4Linear's choice
  torch::Tensor bias;         // [out] float32 (a bf16 bias widened), undefined without bias
  torch::Tensor lora_a;       // [r, in] float32, undefined without an adapter
  torch::Tensor lora_b;       // [out, r] float32
  float scaling = 0.f;        // alpha / r, as the float the module multiplies by
};

// Why `l` cannot become a Proj ("" when it can).
std::string proj_obstacle(const LinearBaseImpl* l, const std::string& name) {
  if (const auto* lora = dynamic_cast<const LoRALinearImpl*>(l)) {
    if (!cpu_fp32(lora->lora_A->weight) || !cpu_fp32(lora->lora_B->weight))
      return name + ": LoRA weights are not contiguous float32 on the CPU";
    return proj_obstacle(lora->base_layer.get(), name + ".base_layer");
  }
  if (const auto* q = dynamic_cast<const Nf4LinearImpl*>(l)) {
    if (!q->weight_packed.device().is_cpu()) return name + ": NF4 weights are not on the CPU";
    if (q->in_ % quant::kNf4BlockSize != 0) return name + ": NF4 input width is not a multiple of 64";
    if (q->bias.defined() && !q->bias.device().is_cpu()) return name + ": bias is not on the CPU";
    return {};
  }
  if (const auto* p = dynamic_cast<const PlainLinearImpl*>(l)) {
    if (!cpu_float(p->weight)) return name + ": weight is not contiguous float32 or bf16 on the CPU";
    if (p->bias.defined() && !cpu_float(p->bias)) return name + ": bias is not float32 or bf16 on the CPU";
    return {};
  }
  return name + ": a projection of another kind than plain, NF4 or LoRA";
}

Proj make_proj(const LinearBaseImpl* l) {
  Proj p;
  p.in = l->in_features();
  p.out = l->out_features();
  if (const auto* lora = dynamic_cast<const LoRALinearImpl*>(l)) {
    Proj base = make_proj(lora->base_layer.get());
    base.lora_a = lora->lora_A->weight;
    base.lora_b = lora->lora_B->weight;
    base.scaling = static_cast<float>(lora->scaling);
    return base;
  }
  if (const auto* q = dynamic_cast<const Nf4LinearImpl*>(l)) {
    const auto w = q->weight_nf4();
    p.is_nf4 = true;
    p.nf4 = {w.packed.contiguous(), w.absmax_q.contiguous(), w.absmax_scale.to(torch::kFloat32).contiguous(),
             w.absmax_mean, w.shape};
    p.view = quant::nf4_view(p.nf4);
    p.activations = q->activations;
    if (q->bias.defined()) p.bias = as_f32(q->bias);
    return p;
  }
  const auto* pl = static_cast<const PlainLinearImpl*>(l);
  p.weight = pl->weight;
  if (pl->bias.defined()) p.bias = as_f32(pl->bias);
  return p;
}

struct Layer {
  torch::Tensor input_norm;  // [D] float32
  torch::Tensor post_norm;   // [D] float32
  Proj q, k, v, o;           // attention projections
  torch::Tensor router;      // [E, D] the MoE gate, float32 or bf16
  std::vector<Proj> w1, w2, w3;  // per expert: D -> F, F -> D, D -> F
};

// One product of a parallel region: y = p x, x prepared once per input for NF4 (`row`).
struct Job {
  const Proj* p;
  const float* x;                    // [p->in]
  const quant::Nf4RowInput* row;     // NF4: x prepared for the kernel; null otherwise
  float* y;                          // [p->out]
};

// Runs the jobs' rows end to end in one parallel region, then their bias and LoRA terms (small, serial), in the
// order the modules add them: (W x + b) + (B (A x)) * scaling.
void run_jobs(const std::vector<Job>& jobs) {
  int64_t total = 0;
  for (const auto& j : jobs) total += j.p->out;
  at::parallel_for(0, total, 16, [&](int64_t a, int64_t b) {
    int64_t base = 0;
    for (const auto& j : jobs) {
      const int64_t lo = std::max(a, base), hi = std::min(b, base + j.p->out);
      if (lo < hi) {
        if (j.p->is_nf4) quant::nf4_matvec_rows(j.p->view, *j.row, lo - base, hi - base, j.y);
        else matvec_rows(j.p->weight, j.x, j.p->in, lo - base, hi - base, j.y);
      }
      base += j.p->out;
    }
  });
  for (const auto& j : jobs) {
    const Proj& p = *j.p;
    if (p.bias.defined()) {
      const float* b = p.bias.data_ptr<float>();
      for (int64_t o = 0; o < p.out; ++o) j.y[o] = j.y[o] + b[o];
    }
    if (p.lora_a.defined()) {
      const int64_t r = p.lora_a.size(0);
      std::vector<float> t(static_cast<size_t>(r)), u(static_cast<size_t>(p.out));
      quant::matvec_rows_cpu(p.lora_a.data_ptr<float>(), j.x, p.in, 0, r, t.data());
      quant::matvec_rows_cpu(p.lora_b.data_ptr<float>(), t.data(), r, 0, p.out, u.data());
      for (int64_t o = 0; o < p.out; ++o) j.y[o] = j.y[o] + u[static_cast<size_t>(o)] * p.scaling;
    }
  }
}

// x [D] -> out [D]: w * (x * rsqrt(mean(x^2) + eps)), as RMSNormImpl in float32.
void rms_norm(const float* x, const float* w, int64_t D, double eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float ms = static_cast<float>(ss / static_cast<double>(D));
  const float r = 1.0f / std::sqrt(ms + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i) out[i] = w[i] * (x[i] * r);
}

// heads x [n, Dh] rotated in place over their first rope_dim values: x * cos + rotate_half(x) * sin (apply_rope).
void rope(float* x, int64_t n, int64_t Dh, int64_t rope_dim, const float* cos, const float* sin) {
  const int64_t half = rope_dim / 2;
  std::vector<float> r(static_cast<size_t>(rope_dim));
  for (int64_t h = 0; h < n; ++h) {
    float* xh = x + h * Dh;
    for (int64_t i = 0; i < rope_dim; ++i) r[static_cast<size_t>(i)] = i < half ? -xh[i + half] : xh[i - half];
    for (int64_t i = 0; i < rope_dim; ++i) xh[i] = xh[i] * cos[i] + r[static_cast<size_t>(i)] * sin[i];
  }
}

}  // namespace

struct TextStep::Impl {
  OmniLiteImpl* model;
  TextOptions t;
  MoEOptions m;
  int64_t image_id, gen_image_id;
  std::vector<Layer> layers;
  torch::Tensor embed;       // [V, D] float32 or bf16
  torch::Tensor final_norm;  // [D] float32
  torch::Tensor head;        // [V, D] float32 or bf16
  // scratch, sized once
  std::vector<float> h, xn, q, k, v, attn, proj, router, gate[2], up[2], act[2], down[2];
};

std::string text_step_obstacle(OmniLiteImpl& model) {
  auto& text = *model.text;
  if (text.gate) return "text decoder: parameters are sharded (train.zero = 3)";
  if (!cpu_float(text.embed_tokens->weight))
    return "text.embed_tokens: weight is not contiguous float32 or bf16 on the CPU";
  if (!cpu_float(text.norm->weight)) return "text.norm: weight is not float32 or bf16 on the CPU";
  const auto& head = model.lm_head->table();
  if (!(head.device().is_cpu() && head.is_contiguous() &&
        (head.scalar_type() == torch::kFloat32 || head.scalar_type() == torch::kBFloat16)))
    return "lm_head: weight is not contiguous float32 or bf16 on the CPU";
  if (model.cfg.text.rope_dim % 2 != 0) return "model.text.rope_dim is odd";
  for (size_t i = 0; i < text.layers->size(); ++i) {
    const std::string name = "text.layers." + std::to_string(i);
    auto* l = text.layers[i]->as<DecoderLayerImpl>();
    if (!cpu_float(l->input_layernorm->weight) || !cpu_float(l->post_attention_layernorm->weight))
      return name + ": norm weights are not float32 or bf16 on the CPU";
    if (!cpu_float(l->moe->gate->weight)) return name + ".moe.gate: weight is not float32 or bf16 on the CPU";
    const auto& a = *l->self_attn;
    for (const auto& [p, n] : {std::pair{a.q_proj.get(), "q_proj"}, {a.k_proj.get(), "k_proj"},
                                {a.v_proj.get(), "v_proj"}, {a.o_proj.get(), "o_proj"}})
      if (auto why = proj_obstacle(p, name + ".self_attn." + n); !why.empty()) return why;
    for (size_t e = 0; e < l->moe->experts->size(); ++e) {
      auto* ex = l->moe->experts[e]->as<SwiGLUExpertImpl>();
      const std::string en = name + ".moe.experts." + std::to_string(e);
      for (const auto& [p, n] : {std::pair{ex->w1.get(), "w1"}, {ex->w2.get(), "w2"}, {ex->w3.get(), "w3"}})
        if (auto why = proj_obstacle(p, en + "." + n); !why.empty()) return why;
    }
  }
  return {};
}

TextStep::TextStep(OmniLiteImpl& model) : impl_(std::make_unique<Impl>()) {
  if (auto why = text_step_obstacle(model); !why.empty())
    throw std::runtime_error("TextStep: " + why + "; hint: decode through OmniLite::forward");
  auto& s = *impl_;
  s.model = &model;
  s.t = model.cfg.text;
  s.m = model.cfg.moe;
  s.image_id = model.cfg.tokens.image_id;
  s.gen_image_id = model.cfg.tokens.gen_image_id;
  auto& text = *model.text;
  s.embed = text.embed_tokens->weight;
  s.final_norm = as_f32(text.norm->weight);
  s.head = model.lm_head->table();
  for (size_t i = 0; i < text.layers->size(); ++i) {
    auto* l = text.layers[i]->as<DecoderLayerImpl>();
    Layer L;
    L.input_norm = as_f32(l->input_layernorm->weight);
    L.post_norm = as_f32(l->post_attention_layernorm->weight);
    L.q = make_proj(l->self_attn->q_proj.get());
    L.k = make_proj(l->self_attn->k_proj.get());
    L.v = make_proj(l->self_attn->v_proj.get());
    L.o = make_proj(l->self_attn->o_proj.get());
    L.router = l->moe->gate->weight;
    for (size_t e = 0; e < l->moe->experts->size(); ++e) {
      auto* ex = l->moe->experts[e]->as<SwiGLUExpertImpl>();
      L.w1.push_back(make_proj(ex->w1.get()));
      L.w2.push_back(make_proj(ex->w2.get()));
      L.w3.push_back(make_proj(ex->w3.get()));
    }
    s.layers.push_back(std::move(L));
  }
  const auto D = static_cast<size_t>(s.t.hidden_size), F = static_cast<size_t>(s.m.expert_hidden);
  const auto H = static_cast<size_t>(s.t.num_heads * s.t.head_dim);
  const auto KV = static_cast<size_t>(s.t.num_kv_heads * s.t.head_dim);
  s.h.resize(D);
  s.xn.resize(std::max(D, H));
  s.q.resize(H);
  s.k.resize(KV);
  s.v.resize(KV);
  s.attn.resize(H);
  s.proj.resize(D);
  s.router.resize(static_cast<size_t>(s.m.num_experts));
  for (int e = 0; e < 2; ++e) {
    s.gate[e].resize(F);
    s.up[e].resize(F);
    s.act[e].resize(F);
    s.down[e].resize(D);
  }
}

TextStep::~TextStep() = default;
TextStep::TextStep(TextStep&&) noexcept = default;
TextStep& TextStep::operator=(TextStep&&) noexcept = default;

bool TextStep::accepts(int64_t token, const KVCache& cache) const {
  const auto& s = *impl_;
  if (token < 0 || token >= s.t.vocab_size || token == s.image_id || token == s.gen_image_id) return false;
  if (!cache.append || s.m.top_k > 2) return false;
  if (cache.length() + 1 > s.t.max_position_embeddings) return false;
  if (!cache.layers.empty() && cache.layers.size() != s.layers.size()) return false;
  if (cache.length() == 0) return true;  // storage of another shape or dtype is replaced by LayerKV::write
  const auto& k = cache.layers[0].k;
  return k.size(0) == 1 && k.device().is_cpu() &&
         (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16);
}

namespace {

// A bf16 cache (a bf16 model's prompt ran through the modules) widened to float32 in place, once: the step keeps
// float32 keys and values, as its activations are float32. The module path converts back if it runs again.
void widen_cache(KVCache& cache) {
  for (auto& l : cache.layers) {
    if (!l.k_store.defined() || l.k_store.scalar_type() == torch::kFloat32) continue;
    const int64_t S = l.k.size(2);
    l.k_store = l.k_store.to(torch::kFloat32).contiguous();
    l.v_store = l.v_store.to(torch::kFloat32).contiguous();
    l.k = l.k_store.narrow(2, 0, S);
    l.v = l.v_store.narrow(2, 0, S);
  }
}

}  // namespace

torch::Tensor TextStep::logits(int64_t token, KVCache& cache) {
  TORCH_CHECK(accepts(token, cache), "TextStep: token ", token, " after a cache of ", cache.length(),
              " positions needs the module path (an image placeholder, a batched, CUDA or half cache, or a full "
              "context)");
  auto& s = *impl_;
  const int64_t D = s.t.hidden_size, H = s.t.num_heads, Hkv = s.t.num_kv_heads, Dh = s.t.head_dim;
  const int64_t F = s.m.expert_hidden, E = s.m.num_experts, K = s.m.top_k;
  const int64_t S = cache.length();
  if (cache.layers.empty()) cache.layers.resize(s.layers.size());
  widen_cache(cache);
  // the tables the module path uses for this position
  const auto tables = rope_tables(torch::full({1}, S, torch::kInt64), s.t.rope_dim, s.t.rope_theta, torch::kFloat32);
  const auto cos_t = tables.cos.contiguous(), sin_t = tables.sin.contiguous();
  const float *cos = cos_t.data_ptr<float>(), *sin = sin_t.data_ptr<float>();
  if (s.embed.scalar_type() == torch::kBFloat16) {
    const auto* e = s.embed.data_ptr<at::BFloat16>() + token * D;
    for (int64_t i = 0; i < D; ++i) s.h[static_cast<size_t>(i)] = static_cast<float>(e[i]);
  } else {
    const float* e = s.embed.data_ptr<float>() + token * D;
    std::copy(e, e + D, s.h.begin());
  }
  // One prepared NF4 input per (row, activations) in use: the projections of one layer input share it.
  auto prepare = [](const float* x, int64_t n, const std::vector<const Proj*>& ps,
                    std::vector<quant::Nf4RowInput>& rows) {
    rows.clear();
    rows.reserve(2);
    for (const auto* p : ps)
      if (p->is_nf4 && std::none_of(rows.begin(), rows.end(), [&](const auto& r) {
            return r.activations == p->activations; }))
        rows.push_back(quant::nf4_row_input(x, n, p->activations));
  };
  auto row_for = [](const Proj& p, const std::vector<quant::Nf4RowInput>& rows) -> const quant::Nf4RowInput* {
    if (!p.is_nf4) return nullptr;
    for (const auto& r : rows)
      if (r.activations == p.activations) return &r;
    return nullptr;
  };
  std::vector<quant::Nf4RowInput> rows, rows2[2];
  std::vector<float> probs(static_cast<size_t>(E));
  std::vector<int64_t> ids(static_cast<size_t>(E));
  for (size_t li = 0; li < s.layers.size(); ++li) {
    Layer& L = s.layers[li];
    // attention: x + o_proj(attention(rope(q), rope(k), v))
    rms_norm(s.h.data(), L.input_norm.data_ptr<float>(), D, s.t.rms_norm_eps, s.xn.data());
    prepare(s.xn.data(), D, {&L.q, &L.k, &L.v}, rows);
    run_jobs({{&L.q, s.xn.data(), row_for(L.q, rows), s.q.data()},
              {&L.k, s.xn.data(), row_for(L.k, rows), s.k.data()},
              {&L.v, s.xn.data(), row_for(L.v, rows), s.v.data()}});
    rope(s.q.data(), H, Dh, s.t.rope_dim, cos, sin);
    rope(s.k.data(), Hkv, Dh, s.t.rope_dim, cos, sin);
    LayerKV& kv = cache.layers[li];
    const bool fits = kv.k_store.defined() && kv.k_store.size(0) == 1 && kv.k_store.size(2) >= S + 1 &&
                      kv.k_store.scalar_type() == torch::kFloat32 && kv.k_store.device().is_cpu() &&
                      kv.k_store.is_contiguous() && kv.v_store.is_contiguous();
    if (fits) {
      const int64_t cap = kv.k_store.size(2);
      float *ks = kv.k_store.data_ptr<float>(), *vs = kv.v_store.data_ptr<float>();
      for (int64_t j = 0; j < Hkv; ++j) {
        std::memcpy(ks + (j * cap + S) * Dh, s.k.data() + j * Dh, sizeof(float) * static_cast<size_t>(Dh));
        std::memcpy(vs + (j * cap + S) * Dh, s.v.data() + j * Dh, sizeof(float) * static_cast<size_t>(Dh));
      }
      kv.k = kv.k_store.narrow(2, 0, S + 1);
      kv.v = kv.v_store.narrow(2, 0, S + 1);
    } else {  // no storage yet, a full one, or one of another shape: LayerKV allocates or grows it
      kv.write(torch::from_blob(s.k.data(), {1, Hkv, 1, Dh}), torch::from_blob(s.v.data(), {1, Hkv, 1, Dh}),
               s.t.max_position_embeddings, true);
    }
    const int64_t cap = kv.k_store.size(2);
    one_query_attention_cpu(s.q.data(), kv.k_store.data_ptr<float>(), kv.v_store.data_ptr<float>(), H, Hkv, S + 1,
                            Dh, cap * Dh, s.attn.data());
    prepare(s.attn.data(), H * Dh, {&L.o}, rows);
    run_jobs({{&L.o, s.attn.data(), row_for(L.o, rows), s.proj.data()}});
    for (size_t i = 0; i < s.h.size(); ++i) s.h[i] = s.h[i] + s.proj[i];

    // MoE: softmax over the router logits, top-k renormalised, the experts summed in ascending id order
    rms_norm(s.h.data(), L.post_norm.data_ptr<float>(), D, s.t.rms_norm_eps, s.xn.data());
    matvec_rows(L.router, s.xn.data(), D, 0, E, s.router.data());
    const float mx = *std::max_element(s.router.begin(), s.router.end());
    float sum = 0.f;
    for (size_t e = 0; e < probs.size(); ++e) sum += (probs[e] = std::exp(s.router[e] - mx));
    for (auto& p : probs) p /= sum;
    std::iota(ids.begin(), ids.end(), int64_t{0});
    std::partial_sort(ids.begin(), ids.begin() + K, ids.end(), [&](int64_t a, int64_t b) {
      return probs[static_cast<size_t>(a)] > probs[static_cast<size_t>(b)] ||
             (probs[static_cast<size_t>(a)] == probs[static_cast<size_t>(b)] && a < b);
    });
    std::sort(ids.begin(), ids.begin() + K);
    float wsum = 0.f;
    for (int64_t k = 0; k < K; ++k) wsum += probs[static_cast<size_t>(ids[static_cast<size_t>(k)])];
    std::vector<const Proj*> ups;
    for (int64_t k = 0; k < K; ++k) {
      ups.push_back(&L.w1[static_cast<size_t>(ids[static_cast<size_t>(k)])]);
      ups.push_back(&L.w3[static_cast<size_t>(ids[static_cast<size_t>(k)])]);
    }
    prepare(s.xn.data(), D, ups, rows);
    std::vector<Job> jobs;
    for (int64_t k = 0; k < K; ++k) {
      const auto e = static_cast<size_t>(ids[static_cast<size_t>(k)]);
      jobs.push_back({&L.w1[e], s.xn.data(), row_for(L.w1[e], rows), s.gate[k].data()});
      jobs.push_back({&L.w3[e], s.xn.data(), row_for(L.w3[e], rows), s.up[k].data()});
    }
    run_jobs(jobs);
    jobs.clear();
    for (int64_t k = 0; k < K; ++k) {
      const auto e = static_cast<size_t>(ids[static_cast<size_t>(k)]);
      float *g = s.gate[k].data(), *u = s.up[k].data(), *a = s.act[k].data();
      for (int64_t i = 0; i < F; ++i) a[i] = (g[i] / (1.0f + std::exp(-g[i]))) * u[i];  // silu(w1 x) * w3 x
      prepare(a, F, {&L.w2[e]}, rows2[k]);
      jobs.push_back({&L.w2[e], a, row_for(L.w2[e], rows2[k]), s.down[k].data()});
    }
    run_jobs(jobs);
    float w[2] = {0.f, 0.f};  // the routing weights, renormalised over the top k
    for (int64_t k = 0; k < K; ++k) w[k] = probs[static_cast<size_t>(ids[static_cast<size_t>(k)])] / wsum;
    for (int64_t i = 0; i < D; ++i) {
      float y = 0.f;  // 0 + w_a y_a + w_b y_b, as the module's index_add sums them
      for (int64_t k = 0; k < K; ++k) y = y + s.down[k][static_cast<size_t>(i)] * w[k];
      s.h[static_cast<size_t>(i)] = s.h[static_cast<size_t>(i)] + y;
    }
  }
  rms_norm(s.h.data(), s.final_norm.data_ptr<float>(), D, s.t.rms_norm_eps, s.xn.data());
  const int64_t V = s.head.size(0);
  auto out = torch::empty({V}, torch::kFloat32);
  float* y = out.data_ptr<float>();
  const float* xn = s.xn.data();
  at::parallel_for(0, V, 16, [&](int64_t o0, int64_t o1) { matvec_rows(s.head, xn, D, o0, o1, y); });
  return out;
}

}  // namespace omnilite
