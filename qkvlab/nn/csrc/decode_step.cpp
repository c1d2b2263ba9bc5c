// Every transformer block of a one-token decode step in one call: pre-norm, the fused projection, rotary, the cache
// write, the one-pass cache read, the output projection and the MLP, with the residual adds, for B rows at one
// shared position. The Python path runs the same arithmetic as ~110 small PyTorch operations a layer, whose
// dispatch (1-4 microseconds each) costs more than the arithmetic of a small model's step; here it is plain
// loops over a few thousand floats, and the weight and cache reads go through the kernels the Python path calls
// (qkvlab_small_linear, qkvlab_kv_rotary_decode / qkvlab_kv_decode_pair). Inference only: no dropout.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec16.h"

extern "C" void qkvlab_small_linear(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t N,
                                    int64_t K, int32_t threads);
extern "C" void qkvlab_kv_rotary_decode(const float* q, const float* qs, const float* kv, int64_t sb, int64_t sh,
                                        int64_t st, const float* rot, const uint8_t* mask, int64_t B, int64_t H,
                                        int64_t G, int64_t D, int64_t T, int64_t splits, int32_t threads, float* out);
extern "C" void qkvlab_kv_decode_pair(const float* q, const float* k, int64_t ksb, int64_t ksh, int64_t kst,
                                      const float* v, int64_t vsb, int64_t vsh, int64_t vst, const uint8_t* mask,
                                      int64_t B, int64_t H, int64_t G, int64_t D, int64_t T, int64_t splits,
                                      int32_t threads, float* out);

namespace {

using qkvlab::load16, qkvlab::select, qkvlab::splat, qkvlab::store16, qkvlab::Vec16, qkvlab::vexp;

// The ABI of the structs below: bumped whenever their fields change (benchmarks/kernel_ab.py loads an older
// revision's library only when its ABI matches).
constexpr int32_t kAbi = 3;

// The model's shape, then the step's rows, position and cache, as the int64 array `cfg` gives them (in this
// order; built by qkvlab/nn/decode_step.py). keys / values: the start of each stored stream (layers, B, H_kv,
// max_len, D), values 0 when K = V; cache_layer: the floats from one layer's slice to the next; vocab: the
// output layer's rows (a whole step; 0 for the blocks alone). rotate_values: rotary values (Rotary.values), keys
// and values stored rotated and each head's output turned back by the new position.
struct Shape {
  int64_t layers, C, H, H_kv, D, q_width, k_width, v_width, q_source, norm, mlp, hidden, rotate_values;
  int64_t B, pos, max_len, splits, keys, values, cache_layer, vocab;
};

// One block's weights, as the int64 array `layers` gives them (12 pointers a block, in this order; 0 = none).
struct Layer {
  const float *norm1_w, *norm1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *norm2_w, *norm2_b, *fc_w, *fc_b, *out_w, *out_b;
};

// What a whole step adds around the blocks, as the int64 array `head` gives it: the token and position
// embeddings (position table null: none, e.g. rotary), the final norm and the output layer (bias null: none).
struct Head {
  const float *tok_emb, *pos_emb, *norm_w, *norm_b, *lm_w, *lm_b;
};

constexpr int64_t kQFromQ = 0, kQFromK = 1, kQFromX = 2;  // where the query comes from (VariantSpec.q_source)
constexpr int64_t kLayerNorm = 0, kRmsNorm = 1;
constexpr int64_t kGelu = 0, kGeluTanh = 1, kSwiGlu = 2;

// y (B, C) = norm(x) * w (+ b), per row: LayerNorm (biased variance) or RMSNorm.
void normalize(const float* x, const float* w, const float* b, float* y, int64_t B, int64_t C, int64_t kind,
               float eps) {
  for (int64_t r = 0; r < B; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    float mean = 0.f;
    if (kind == kLayerNorm) {
      for (int64_t i = 0; i < C; ++i) mean += xr[i];
      mean /= static_cast<float>(C);
    }
    float var = 0.f;
    for (int64_t i = 0; i < C; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.f / std::sqrt(var / static_cast<float>(C) + eps);
    for (int64_t i = 0; i < C; ++i) yr[i] = (xr[i] - mean) * inv * w[i] + (b == nullptr ? 0.f : b[i]);
  }
}

// Each pair (x0, x1) of n heads of D dims rotated by the table row r: (x0 c - x1 s, x1 c + x0 s); back (by the
// opposite angle) when `back`.
void rotate(float* x, int64_t n, int64_t D, const float* r, bool back = false) {
  const float sign = back ? -1.f : 1.f;
  for (int64_t h = 0; h < n; ++h) {
    float* v = x + h * D;
    for (int64_t d = 0; d < D; d += 2) {
      const float x0 = v[d], x1 = v[d + 1], c = r[d], s = sign * r[d + 1];
      v[d] = x0 * c - x1 * s;
      v[d + 1] = x1 * c + x0 * s;
    }
  }
}

// erf of each lane, |error| < 1.5e-7 (Abramowitz and Stegun 7.1.26: 1 - t P(t) exp(-x^2), t = 1 / (1 + p |x|)).
inline Vec16 verf(Vec16 x) {
  const Vec16 ax = select(x < 0.f, -x, x);
  const Vec16 t = 1.f / (1.f + 0.3275911f * ax);
  Vec16 p = 1.061405429f * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const Vec16 y = 1.f - p * t * vexp(-ax * ax);
  return select(x < 0.f, -y, y);
}

// The MLP's activation of one row: a (hidden) from f (hidden, or 2 x hidden for SwiGLU: gate then up), 16 lanes at a
// time through vexp (measured: scalar std::erf took 0.65 ms of a six-layer step at batch 4), the tail scalar.
void activate(const float* f, float* a, int64_t hidden, int64_t kind) {
  int64_t i = 0;
  for (; i + 16 <= hidden; i += 16) {
    const Vec16 v = load16(f + i);
    Vec16 out;
    if (kind == kSwiGlu) {  // silu(gate) * up; sigmoid from exp(-|v|) <= 1
      const Vec16 e = vexp(select(v < 0.f, v, -v));
      out = v * select(v < 0.f, e, splat(1.f)) / (1.f + e) * load16(f + hidden + i);
    } else if (kind == kGeluTanh) {  // tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|)
      const Vec16 u = 0.7978845608f * (v + 0.044715f * v * v * v);
      const Vec16 e = vexp(select(u < 0.f, 2.f * u, -2.f * u));
      const Vec16 th = (1.f - e) / (1.f + e);
      out = 0.5f * v * (1.f + select(u < 0.f, -th, th));
    } else {
      out = 0.5f * v * (1.f + verf(v * 0.7071067812f));
    }
    store16(a + i, out);
  }
  for (; i < hidden; ++i) {
    const float v = f[i];
    if (kind == kSwiGlu) a[i] = v / (1.f + std::exp(-v)) * f[hidden + i];
    else if (kind == kGeluTanh) a[i] = 0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
    else a[i] = 0.5f * v * (1.f + std::erf(v * 0.7071067812f));
  }
}

}  // namespace

// a (rows, hidden) = the MLP's activation of f (rows, hidden; SwiGLU: rows, 2 x hidden, gate then up): kind 0 GELU,
// 1 GELU's tanh form, 2 SwiGLU.
extern "C" void qkvlab_mlp_activation(const float* f, float* a, int64_t rows, int64_t hidden, int64_t kind) {
  const int64_t width = (kind == kSwiGlu ? 2 : 1) * hidden;
  for (int64_t r = 0; r < rows; ++r) activate(f + r * width, a + r * hidden, hidden, kind);
}

namespace {

// h (B, C): the rows' hidden states at the new position, updated in place through every block. rot: the rotation
// table (max positions, D) of (cos, sin) pairs (qkvlab.nn.positions.Rotary.read_table), null without rotary.
void blocks(float* h, const Shape& s, const Layer* layers, const float* rot, float eps, int32_t threads) {
  const int64_t B = s.B, C = s.C, D = s.D, T = s.pos + 1, G = s.H / s.H_kv;
  const int64_t width = s.q_width + s.k_width + s.v_width, fc_width = (s.mlp == kSwiGlu ? 2 : 1) * s.hidden;
  std::vector<float> x(B * C), qkv(B * width), q(B * s.H * D), qs(B * s.H * D), att(B * s.H * D), y(B * C),
      fc(B * fc_width), act(B * s.hidden);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const float* row = rot == nullptr ? nullptr : rot + s.pos * D;  // the new position's rotation
  const int64_t sh = s.max_len * D, sb = s.H_kv * sh;  // a stored stream's strides (row, head); a token's is D
  for (int64_t l = 0; l < s.layers; ++l) {
    const Layer& p = layers[l];
    float* keys = reinterpret_cast<float*>(s.keys) + l * s.cache_layer;
    float* values = s.values == 0 ? nullptr : reinterpret_cast<float*>(s.values) + l * s.cache_layer;
    normalize(h, p.norm1_w, p.norm1_b, x.data(), B, C, s.norm, eps);
    qkvlab_small_linear(x.data(), p.qkv_w, p.qkv_b, qkv.data(), B, width, C, threads);  // (B, [q | k | v])
    for (int64_t r = 0; r < B; ++r) {
      float* qr = q.data() + r * s.H * D;
      float* kr = qkv.data() + r * width + s.q_width;
      const float* src = s.q_source == kQFromQ ? qkv.data() + r * width : s.q_source == kQFromK ? kr : x.data() + r * C;
      std::copy(src, src + s.H * D, qr);
      if (row != nullptr) {
        rotate(qr, s.H, D, row);
        if (s.v_width > 0 || s.rotate_values) rotate(kr, s.H_kv, D, row);  // keys stored rotated
        if (s.v_width > 0 && s.rotate_values) rotate(kr + s.k_width, s.H_kv, D, row);  // values too
      }
      for (int64_t i = 0; i < s.H * D; ++i) qr[i] *= scale;
      for (int64_t i = 0; i < s.H * D; i += 2) {  // the pair-swapped query (q1, -q0), for keys rotated when read
        qs[r * s.H * D + i] = qr[i + 1];
        qs[r * s.H * D + i + 1] = -qr[i];
      }
      for (int64_t hk = 0; hk < s.H_kv; ++hk) {  // the cache write at the new position
        std::copy(kr + hk * D, kr + (hk + 1) * D, keys + r * sb + hk * sh + s.pos * D);
        if (s.v_width > 0) {
          const float* vr = kr + s.k_width + hk * D;
          std::copy(vr, vr + D, values + r * sb + hk * sh + s.pos * D);
        }
      }
    }
    if (s.v_width > 0)
      qkvlab_kv_decode_pair(q.data(), keys, sb, sh, D, values, sb, sh, D, nullptr, B, s.H_kv, G, D, T, s.splits,
                            threads, att.data());
    else  // K = V: rotary keys rotated while read, unless stored rotated (rotary values)
      qkvlab_kv_rotary_decode(q.data(), qs.data(), keys, sb, sh, D, row == nullptr || s.rotate_values ? nullptr : rot,
                              nullptr, B, s.H_kv, G, D, T, s.splits, threads, att.data());
    if (row != nullptr && s.rotate_values)
      for (int64_t r = 0; r < B; ++r) rotate(att.data() + r * s.H * D, s.H, D, row, true);  // outputs turned back
    qkvlab_small_linear(att.data(), p.proj_w, p.proj_b, y.data(), B, C, s.H * D, threads);
    for (int64_t i = 0; i < B * C; ++i) h[i] += y[i];
    normalize(h, p.norm2_w, p.norm2_b, x.data(), B, C, s.norm, eps);
    qkvlab_small_linear(x.data(), p.fc_w, p.fc_b, fc.data(), B, fc_width, C, threads);
    qkvlab_mlp_activation(fc.data(), act.data(), B, s.hidden, s.mlp);
    qkvlab_small_linear(act.data(), p.out_w, p.out_b, y.data(), B, C, s.hidden, threads);
    for (int64_t i = 0; i < B * C; ++i) h[i] += y[i];
  }
}

}  // namespace

extern "C" int32_t qkvlab_step_abi() { return kAbi; }

// h (B, C) through every block at the cache's next position (see `blocks`); the new keys and values written.
extern "C" void qkvlab_decode_layers(float* h, const int64_t* cfg, const int64_t* layers, const float* rot, float eps,
                                     int32_t threads) {
  blocks(h, *reinterpret_cast<const Shape*>(cfg), reinterpret_cast<const Layer*>(layers), rot, eps, threads);
}

// A whole one-token step: tokens (B) -> logits (B, vocab), through the embeddings, every block and the final
// norm and output layer. Returns 1, having written nothing, when a token id is outside 0..vocab-1; else 0.
extern "C" int32_t qkvlab_decode_tokens(const int64_t* tokens, float* logits, const int64_t* cfg,
                                        const int64_t* layers, const int64_t* head, const float* rot, float eps,
                                        int32_t threads) {
  const Shape& s = *reinterpret_cast<const Shape*>(cfg);
  const Head& e = *reinterpret_cast<const Head*>(head);
  const int64_t B = s.B, C = s.C;
  for (int64_t r = 0; r < B; ++r)
    if (tokens[r] < 0 || tokens[r] >= s.vocab) return 1;
  std::vector<float> h(B * C), x(B * C);
  for (int64_t r = 0; r < B; ++r) {
    const float* t = e.tok_emb + tokens[r] * C;
    float* hr = h.data() + r * C;
    std::copy(t, t + C, hr);
    if (e.pos_emb != nullptr)
      for (int64_t i = 0; i < C; ++i) hr[i] += e.pos_emb[s.pos * C + i];
  }
  blocks(h.data(), s, reinterpret_cast<const Layer*>(layers), rot, eps, threads);
  normalize(h.data(), e.norm_w, e.norm_b, x.data(), B, C, s.norm, eps);
  qkvlab_small_linear(x.data(), e.lm_w, e.lm_b, logits, B, s.vocab, C, threads);
  return 0;
}
