// One-token attention over a KV cache in a single pass. K = V: keys rotated on the fly (or read as stored),
// values the same unrotated vectors; separate keys and values (QKV, GQA) from two streams. A bfloat16 cache is
// widened as it is read (its bits shifted into a float32's). A quantised cache
// (int8, or float8 codes read through a 256-entry table) with one bfloat16 scale per (row, head, token) is
// dequantised as it is read, with keys and values from one stream (K = V) or from their own streams (QKV, GQA).
//
// A work item takes one range of key positions for every row and head and streams those keys once, in blocks
// small enough to stay in L1: the block's scores (q . rot_t(k) = sum_d k[d] (cos[t,d] q[d] + sin[t,d] qs[d]),
// qs the pair-swapped query, each pair's cos and sin from one table (T, D) of (cos, sin) pairs), an online
// softmax (running max m, sum l) and the weighted sum of the same keys as values. Float32 caches with heads of
// 32, 64 or 128 take `attend_vec` (16 keys per vector of scores, each (row, key head) in order; rotary keys
// with one query head a key: `attend_streams`, two (row, key head) streams sharing the table; two, three, four or
// six query heads a key of up to 64 dims, rotary or not: `attend_heads`, each key (rotated in registers) scored
// for all of them at once; other groups `attend_group`); bfloat16 and quantised caches of those head sizes widen
// a chunk of positions at a time into float32 scratch and read it through the same loops (`attend_widened`);
// other head sizes `attend_range` (four keys at a time without a table; with one, rows and heads inner, so each
// block of the table is read once for all of them). Ranges (flash-decoding's split) give
// every thread work at batch 1 and are merged by log-sum-exp; short caches split the rows and heads as well.
// Plain C++ and OpenMP, no PyTorch headers: built at first use with the system compiler and called through
// ctypes (qkvlab/nn/kv_decode.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vec16.h"

namespace {

using qkvlab::Int16, qkvlab::Vec16, qkvlab::load16, qkvlab::store16, qkvlab::sum16, qkvlab::vexp;
using qkvlab::select, qkvlab::splat, qkvlab::swap_eights, qkvlab::swap_fours, qkvlab::swap_pairs, qkvlab::swap_twos;

// Whether a Vec16 is two AVX2 registers (16 of them) rather than one of AVX-512's 32: loops hold fewer vectors.
#ifdef QKVLAB_HALVES  // vec16.h: a Vec16 is two AVX2 registers
constexpr bool kNarrow = true;
using qkvlab::Vec8, qkvlab::join_halves, qkvlab::sum4_halves;
#else
constexpr bool kNarrow = false;
#endif
constexpr int64_t kBlock = 32;  // keys per block: 32 x D floats stay in L1 between scoring and summing
// Rotary reads ask for keys and table rows this far ahead, into L2 only (locality 2): L1's few miss buffers stay
// free for the loads. Into L1 (locality 3), 32 keys ahead: 0.8-0.9x on the grouped rotary read (cache read alone,
// caches flushed); 32-64 keys ahead within the noise of each other, 128-512 slower.
constexpr int64_t kPrefetchKeys = 48;

inline void prefetch_l2(const float* p) { __builtin_prefetch(p, 0, 2); }
// Keys ahead, read once: with AVX2 (measured on a Zen 1 EPYC) as non-temporal (locality 0: 1.02-1.05x into L2),
// elsewhere into L2 as measured before.
inline void prefetch_keys(const float* p) {
  if constexpr (kNarrow) __builtin_prefetch(p, 0, 0);
  else prefetch_l2(p);
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

struct Partial {  // one work item's softmax state for every (row, query head)
  std::vector<float> m, l, acc;  // (B * H * G), (B * H * G), (B * H * G, D)

  void start(int64_t rows, int64_t D) {  // nothing attended yet
    m.assign(rows, -INFINITY);
    l.assign(rows, 0.f);
    acc.assign(rows * D, 0.f);
  }
};

// Where a quantised cache's scales are: scale of vector t of head h in row b at data + b * sb + h * sh + t.
struct Scales {
  const uint16_t* data;  // bfloat16 bits; null for a float32 cache
  int64_t sb, sh;
};

// One stored stream: vector t of head h in row b at data + b * sb + h * sh + t * st (its D values contiguous).
template <typename V>
struct Stream {
  const V* data;
  int64_t sb, sh, st;
  Scales scales;
  const float* lut;  // uint8_t streams (float8 bits): the float of each of the 256 codes
};

template <typename V>
inline float load(V x, const float* lut) {
  if constexpr (std::is_same_v<V, uint8_t>) return lut[x];
  else if constexpr (std::is_same_v<V, uint16_t>) return bf16_to_float(x);  // bfloat16 bits
  else return static_cast<float>(x);
}

// Keys t0..t1 of every row from `key`, values from `val` (the same stream when K = V); q, qs (B, H, G, D).
// kD > 0 fixes the head size at compile time (unrolled, about 1.5x faster than a runtime trip count); 0 takes
// `head_dim`. kRotate false: plain scores q . k (rot, qs unread). V: float, uint16_t (bfloat16 bits), or int8_t /
// uint8_t (float8 codes) with scales (a vector is its decoded values times its scale).
template <typename V, int64_t kD, bool kRotate>
void attend_range(const float* q, const float* qs, Stream<V> key, Stream<V> val, const float* rot,
                  const bool* mask, int64_t mask_stride, int64_t B, int64_t H, int64_t G,
                  int64_t head_dim, int64_t t0, int64_t t1, Partial& out) {
  constexpr bool kQuantized = std::is_same_v<V, int8_t> || std::is_same_v<V, uint8_t>;  // with scales
  const int64_t D = kD > 0 ? kD : head_dim;
  const int64_t HG = B * H * G;  // every (row, query head): the block of tables is read once for all of them
  out.m.assign(HG, 0.f);
  out.l.assign(HG, 0.f);
  out.acc.assign(HG * D, 0.f);
  std::vector<char> seen(HG, 0);
  float scores[kBlock];
  float probs[kBlock];
  // One block of n keys from b0 for (row, query head) hg: scores, online softmax, weighted sum of values.
  auto block = [&](int64_t hg, int64_t b0, int64_t n) {
    const int64_t bh = hg / G, b = bh / H, h = bh % H;
    const V* keys = key.data + b * key.sb + h * key.sh;
    const V* vals = val.data + b * val.sb + h * val.sh;
    const uint16_t* key_scales = kQuantized ? key.scales.data + b * key.scales.sb + h * key.scales.sh : nullptr;
    const uint16_t* val_scales = kQuantized ? val.scales.data + b * val.scales.sb + h * val.scales.sh : nullptr;
    const bool* row_mask = mask == nullptr ? nullptr : mask + b * mask_stride;
    const float* qg = q + hg * D;
    const float* qsg = qs + hg * D;
    int64_t j = 0;
    if constexpr (!kRotate) {  // four keys at a time: four independent sums keep the vector units busy
      for (; j + 4 <= n; j += 4) {
        const int64_t t = b0 + j;
        const V* k0 = keys + t * key.st;
        const V* k1 = k0 + key.st;
        const V* k2 = k1 + key.st;
        const V* k3 = k2 + key.st;
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t d = 0; d < D; ++d) {
          const float x = qg[d];
          d0 += load(k0[d], key.lut) * x;
          d1 += load(k1[d], key.lut) * x;
          d2 += load(k2[d], key.lut) * x;
          d3 += load(k3[d], key.lut) * x;
        }
        if constexpr (kQuantized) {
          d0 *= bf16_to_float(key_scales[t]);
          d1 *= bf16_to_float(key_scales[t + 1]);
          d2 *= bf16_to_float(key_scales[t + 2]);
          d3 *= bf16_to_float(key_scales[t + 3]);
        }
        scores[j] = d0;
        scores[j + 1] = d1;
        scores[j + 2] = d2;
        scores[j + 3] = d3;
      }
    }
    for (; j < n; ++j) {  // scores: no branches, so keys overlap in the pipeline
      const int64_t t = b0 + j;
      const V* k = keys + t * key.st;
      float dot = 0.f;
      if constexpr (kRotate) {
        const float* r = rot + t * D;  // (cos, sin) of each pair
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; d += 2)
          dot += load(k[d], key.lut) * (r[d] * qg[d] + r[d + 1] * qsg[d]) +
                 load(k[d + 1], key.lut) * (r[d] * qg[d + 1] + r[d + 1] * qsg[d + 1]);
      } else {
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += load(k[d], key.lut) * qg[d];
      }
      scores[j] = kQuantized ? dot * bf16_to_float(key_scales[t]) : dot;
    }
    if (row_mask != nullptr)
      for (int64_t i = 0; i < n; ++i)
        if (!row_mask[b0 + i]) scores[i] = -INFINITY;
    float block_max = -INFINITY;
    for (int64_t i = 0; i < n; ++i) block_max = std::max(block_max, scores[i]);
    if (block_max == -INFINITY) return;  // every key of the block masked
    float& m = out.m[hg];
    float& l = out.l[hg];
    float* acc = out.acc.data() + hg * D;
    if (!seen[hg] || block_max > m) {
      const float r = seen[hg] ? std::exp(m - block_max) : 0.f;
      l *= r;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] *= r;
      m = block_max;
      seen[hg] = 1;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      probs[i] = std::exp(scores[i] - m);  // masked: exp(-inf) = 0
      sum += probs[i];
    }
    l += sum;
    float local[kD > 0 ? kD : 1];  // the accumulator in registers for a fixed head size
    float* __restrict__ a = kD > 0 ? local : acc;
    if (kD > 0) std::copy(acc, acc + D, local);
    if constexpr (kQuantized) {
      for (int64_t i = 0; i < n; ++i) probs[i] *= bf16_to_float(val_scales[b0 + i]);
    }
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {  // four values per pass over the accumulator
      const V* __restrict__ v0 = vals + (b0 + i) * val.st;
      const V* __restrict__ v1 = v0 + val.st;
      const V* __restrict__ v2 = v1 + val.st;
      const V* __restrict__ v3 = v2 + val.st;
      const float p0 = probs[i], p1 = probs[i + 1], p2 = probs[i + 2], p3 = probs[i + 3];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        a[d] += p0 * load(v0[d], val.lut) + p1 * load(v1[d], val.lut) + p2 * load(v2[d], val.lut) +
                p3 * load(v3[d], val.lut);
    }
    for (; i < n; ++i) {
      const float p = probs[i];
      const V* __restrict__ v = vals + (b0 + i) * val.st;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * load(v[d], val.lut);
    }
    if (kD > 0) std::copy(local, local + D, acc);
  };
  if constexpr (kRotate) {  // rows and heads inner: each block of the tables is read once for all of them
    for (int64_t b0 = t0; b0 < t1; b0 += kBlock)
      for (int64_t hg = 0; hg < HG; ++hg) block(hg, b0, std::min(kBlock, t1 - b0));
  } else {  // no tables: each (row, key head) streams its keys in order, once for the query heads of its group
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t b0 = t0; b0 < t1; b0 += kBlock)
        for (int64_t g = 0; g < G; ++g) block(bh * G + g, b0, std::min(kBlock, t1 - b0));
  }
  for (int64_t hg = 0; hg < HG; ++hg)
    if (!seen[hg]) out.m[hg] = -INFINITY;  // nothing attended in this range
}

// Float32 keys (no scales), head size kD (a multiple of 16): the same read with the scores of 16 keys in one
// vector. A key's dot product with the query is kD / 16 vector multiply-adds and a sum across lanes; the sums of
// 16 keys are taken together (a transposing reduction, 45 vector operations) instead of one by one, and the
// accumulator of each query head stays in registers (measured: 1.3-3x the general loop above, which the other
// cases keep: quantised caches, other head sizes). Vectors of 16 floats: vec16.h.

// A vector of 8 pairs' (cos, sin) from the rotation table, as each dim's cosine and each dim's sine.
inline Vec16 coses(Vec16 t) { return qkvlab::dup_even(t); }
inline Vec16 sines(Vec16 t) { return qkvlab::dup_odd(t); }

constexpr Vec16 kSigns{-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};  // each pair's first lane negated

// Each pair (k0, k1) of k turned by its (cos, sin) in t (a table vector): (k0 cos - k1 sin, k1 cos + k0 sin).
inline Vec16 rotate_pairs(Vec16 k, Vec16 t) {
  const Vec16 swapped = swap_pairs(k);
#ifdef __AVX512F__
  return reinterpret_cast<Vec16>(_mm512_fmaddsub_ps(reinterpret_cast<__m512>(k), reinterpret_cast<__m512>(coses(t)),
                                                   reinterpret_cast<__m512>(swapped * sines(t))));
#else
  return k * coses(t) + swapped * (sines(t) * kSigns);
#endif
}

inline Vec16 vmax(Vec16 a, Vec16 b) { return select(a > b, a, b); }

#ifdef QKVLAB_HALVES
// Across lanes within registers. The generic versions below, and lanes written one by one into a Vec16, went
// through the stack with AVX2 (GCC 12: a vector stored, one lane stored over it, the vector loaded back, three
// times a reduction: store-to-load forwarding fails on each): the softmax of six heads a key cost 40 multiply-add
// times a key, 26 this way; whole decode steps at 8k, batch 4, Zen 1: Q-MQA 1.04x (rotary) / 1.06x (learned),
// QKV rotary 1.06x.
inline float hmax(Vec16 v) {  // the largest lane
  const Vec8 x = _mm256_max_ps(v.lo, v.hi);
  __m128 y = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  y = _mm_max_ps(y, _mm_movehl_ps(y, y));
  return _mm_cvtss_f32(_mm_max_ss(y, _mm_movehdup_ps(y)));
}

inline float hsum(Vec16 v) {  // the sum of the lanes
  const Vec8 x = v.lo + v.hi;
  __m128 y = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  y = _mm_add_ps(y, _mm_movehl_ps(y, y));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
}
#else
inline float hmax(Vec16 v) {  // the largest lane
  v = vmax(v, swap_eights(v));
  v = vmax(v, swap_fours(v));
  v = vmax(v, swap_twos(v));
  v = vmax(v, swap_pairs(v));
  return v[0];
}

inline float hsum(Vec16 v) {  // the sum of the lanes
  v += swap_eights(v);
  v += swap_fours(v);
  v += swap_twos(v);
  v += swap_pairs(v);
  return v[0];
}
#endif

// acc[g] (kC vectors) = acc[g] * r[g] + sum_j probs[g][j] v_j over the n values of a block, for kGN query heads at
// once: each value is loaded once for all of them and the accumulators stay in registers. With AVX2 alone (16
// registers of 8 floats, `kNarrow`) the heads' accumulators a few 16-dim columns at a time, so that they still fit
// (all of them at once spill).
template <int64_t kC, int kGN, int64_t kP = 16>
inline void accumulate(const float* vals, int64_t st, int64_t n, const float* probs, const float* r,
                       float* const* acc) {
  // Accumulator vectors a head holds per pass over the values: with AVX2, as many as leave the heads' and the
  // value's vectors within 14 of the 16 registers; one head holds all of its (up to 8 registers), each value vector
  // a multiply-add's memory operand (against two columns a pass, QKV and K = V reads: 1.00-1.03x).
  constexpr int64_t kCols = !kNarrow || (kGN + 1) * kC <= 7 || (kGN == 1 && kC <= 4) ? kC
                             : (kGN + 1) * 2 <= 7 ? 2 : 1;
  for (int64_t c0 = 0; c0 < kC; c0 += kCols) {
    Vec16 a[kGN][kCols];
    for (int g = 0; g < kGN; ++g)
      for (int64_t c = 0; c < kCols; ++c) a[g][c] = load16(acc[g] + 16 * (c0 + c)) * splat(r[g]);
    for (int64_t j = 0; j < n; ++j) {
      const float* v = vals + j * st + 16 * c0;
      Vec16 vv[kCols];
      for (int64_t c = 0; c < kCols; ++c) vv[c] = load16(v + 16 * c);
      for (int g = 0; g < kGN; ++g) {
        const Vec16 p = splat(probs[g * kP + j]);
        for (int64_t c = 0; c < kCols; ++c) a[g][c] += p * vv[c];
      }
    }
    for (int g = 0; g < kGN; ++g)
      for (int64_t c = 0; c < kCols; ++c) store16(acc[g] + 16 * (c0 + c), a[g][c]);
  }
}

// kS (row, key head) streams from bh0 (bh = b * H + h): where each one's keys, values and row mask start.
template <int kS>
struct Streams {
  const float* keys[kS];
  const float* vals[kS];
  const bool* mask[kS];

  Streams(Stream<float> key, Stream<float> val, const bool* masks, int64_t mask_stride, int64_t H, int64_t bh0) {
    for (int s = 0; s < kS; ++s) {
      const int64_t b = (bh0 + s) / H, h = (bh0 + s) % H;
      keys[s] = key.data + b * key.sb + h * key.sh;
      vals[s] = val.data + b * val.sb + h * val.sh;
      mask[s] = masks == nullptr ? nullptr : masks + b * mask_stride;
    }
  }

  // The block of n <= 16 keys from b0: each stream's lanes 0 or -inf (past the range or masked) in keep, whether
  // it attends to any of them in any; returns whether some stream does.
  bool block(int64_t b0, int64_t n, Vec16* keep, bool* any) const {
    const Vec16 lane{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    bool some = false;
    for (int s = 0; s < kS; ++s) {
      keep[s] = select(lane < static_cast<float>(n), Vec16{}, Vec16{} - INFINITY);
      if (mask[s] != nullptr)
        for (int64_t j = 0; j < n; ++j)
          if (!mask[s][b0 + j]) keep[s][j] = -INFINITY;
      any[s] = mask[s] == nullptr || hmax(keep[s]) > -INFINITY;
      some = some || any[s];
    }
    return some;
  }
};

// The online softmax over one block's scores s of query head hg (-inf where not attended): m and l updated; returns
// the block's weights, and in r the factor that rescales the head's accumulator.
inline Vec16 softmax_block(Vec16 s, Partial& out, int64_t hg, float& r) {
  float& m = out.m[hg];
  const float m_new = std::max(m, hmax(s));
  r = m == -INFINITY ? 0.f : m_new > m ? std::exp(m - m_new) : 1.f;
  const Vec16 p = vexp(s - m_new);  // masked and missing keys: 0
  out.l[hg] = out.l[hg] * r + hsum(p);
  m = m_new;
  return p;
}

// The online softmax of kG query heads (or streams) over a block of 16 * kV keys: s[g][v] their scores (-inf where
// not attended) become the weights; m, l (kG) updated; lane g of the result rescales head g's accumulator.
template <int kG, int kV>
inline Vec16 softmax_heads(Vec16 (*s)[kV], float* m, float* l) {
  alignas(64) float olds[16] = {}, news[16] = {};  // built as floats: a lane written into a vector goes through memory
  for (int g = 0; g < kG; ++g) {
    Vec16 x = s[g][0];
    for (int v = 1; v < kV; ++v) x = vmax(x, s[g][v]);
    olds[g] = m[g];
    news[g] = std::max(m[g], hmax(x));
  }
  const Vec16 m_old = load16(olds), m_new = load16(news);
  // A head with no key attended yet (its streams' own masks): subtract 0 instead, weights exp(-inf) = 0, m stays -inf.
  const Vec16 shift = select(m_new == Vec16{} - INFINITY, Vec16{}, m_new);
  const Vec16 r = vexp(m_old - shift);  // a head's first block: exp(-inf) = 0
  for (int g = 0; g < kG; ++g) {
    Vec16 total{};
    for (int v = 0; v < kV; ++v) {
      s[g][v] = vexp(s[g][v] - shift[g]);
      total += s[g][v];
    }
    l[g] = l[g] * r[g] + hsum(total);
    m[g] = m_new[g];
  }
  return r;
}

// The products of kGN query heads from hg0 with the block's keys (rotated: `rotated`; else read from keys at
// stride st from b0): part[g][j] holds key j's kD / 16 partial products with head g, lanes to be summed (sum16); keys
// past n give 0. Each key vector is loaded once for the kGN heads.
template <int64_t kD, bool kRotate, int kGN>
inline void scores(const float* q, const float* keys, int64_t st, const float (*rotated)[kD], int64_t b0,
                   int64_t n, int64_t hg0, float (*part)[16][16]) {
  constexpr int64_t kC = kD / 16;
  Vec16 qv[kGN][kC];
  for (int g = 0; g < kGN; ++g)
    for (int64_t c = 0; c < kC; ++c) qv[g][c] = load16(q + (hg0 + g) * kD + 16 * c);
  for (int64_t j = 0; j < 16; ++j) {
    Vec16 sc[kGN] = {};
    if (j < n) {
      for (int64_t c = 0; c < kC; ++c) {
        // Keys as stored, with AVX2: asked for ahead (QKV 1.09-1.10x, K = V 1.10-1.15x; values too: 0.96x).
        if constexpr (kNarrow && !kRotate) prefetch_keys(keys + (b0 + j + kPrefetchKeys) * st + 16 * c);
        const Vec16 k = load16(kRotate ? rotated[j] + 16 * c : keys + (b0 + j) * st + 16 * c);
        for (int g = 0; g < kGN; ++g) sc[g] += qv[g][c] * k;
      }
    }
    for (int g = 0; g < kGN; ++g) store16(part[g][j], sc[g]);
  }
}

// The scores s[g][v] (16 keys each) of kG query heads (qv: kC vectors each) with the n <= 16 * kV keys from
// `keys` (stride st; kRotate: rotated in registers by their rows of the table from `rot`), one key at a time: each
// key vector loaded once for every head; keys past n score 0.
template <int64_t kD, int kG, int kV, bool kRotate>
inline void scores_each(const Vec16 (*qv)[kD / 16], const float* keys, int64_t st, const float* rot, int64_t n,
                        Vec16 (*s)[kV]) {
  constexpr int64_t kC = kD / 16;
  float part[kG][16 * kV][16];
  for (int64_t j = 0; j < 16 * kV; ++j) {
    if (j >= n) {
      for (int g = 0; g < kG; ++g) store16(part[g][j], Vec16{});
      continue;
    }
    const float* k = keys + j * st;
    Vec16 kv[kC];
    for (int64_t c = 0; c < kC; ++c) {
      if constexpr (kNarrow || kRotate) prefetch_keys(k + kPrefetchKeys * st + 16 * c);
      kv[c] = load16(k + 16 * c);
      if constexpr (kRotate) {  // pair (k0, k1) -> (k0 cos - k1 sin, k1 cos + k0 sin)
        const float* r = rot + j * kD;
        prefetch_l2(r + kPrefetchKeys * kD + 16 * c);
        kv[c] = rotate_pairs(kv[c], load16(r + 16 * c));
      }
    }
    if constexpr (kNarrow) {  // one head's sum at a time: the key (kC vectors) and one sum in registers
      for (int g = 0; g < kG; ++g) {
        Vec16 sc = qv[g][0] * kv[0];
        for (int64_t c = 1; c < kC; ++c) sc += qv[g][c] * kv[c];
        store16(part[g][j], sc);
      }
    } else {  // every head's sum at once, each key vector multiplied into all of them as it is ready
      Vec16 sc[kG] = {};
      for (int64_t c = 0; c < kC; ++c)
        for (int g = 0; g < kG; ++g) sc[g] += qv[g][c] * kv[c];
      for (int g = 0; g < kG; ++g) store16(part[g][j], sc[g]);
    }
  }
  for (int g = 0; g < kG; ++g)
    for (int v = 0; v < kV; ++v) s[g][v] = sum16(part[g][16 * v]);
}

#ifdef QKVLAB_HALVES
// Keys 0..n-1 from `keys` (stride st) rotated to their positions by their rows of the table from `rot`, into out.
// Each 16 dims come out de-interleaved (their eight pairs' first halves, then their second halves): they turn by two
// multiplies and two multiply-adds after two shuffles of the key and two of the table, where turning them in place
// (rotate_pairs) takes six shuffles and six multiplies or multiply-adds. Queries scored against these keys are
// de-interleaved the same way (`split_query`), which leaves every dot product as it was (Q-MQA rotary step at 8k
// tokens, batch 4, Zen 1: 1.04x; the table held in L1 instead, answers aside: 1.04x too, so its bytes cost little).
template <int64_t kD>
inline void rotate_block(const float* keys, int64_t st, const float* rot, int64_t n, float (*out)[kD]) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < kD / 16; ++c) {
      const float* k = keys + j * st + 16 * c;
      const float* r = rot + j * kD + 16 * c;
      prefetch_keys(k + kPrefetchKeys * st);
      prefetch_l2(r + kPrefetchKeys * kD);
      const __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8);
      const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + 8);
      const __m256 x = _mm256_shuffle_ps(k0, k1, 0x88), y = _mm256_shuffle_ps(k0, k1, 0xDD);  // pairs' (x, y)
      const __m256 cos = _mm256_shuffle_ps(r0, r1, 0x88), sin = _mm256_shuffle_ps(r0, r1, 0xDD);
      _mm256_store_ps(out[j] + 16 * c, _mm256_fmsub_ps(x, cos, _mm256_mul_ps(y, sin)));  // x cos - y sin
      _mm256_store_ps(out[j] + 16 * c + 8, _mm256_fmadd_ps(x, sin, _mm256_mul_ps(y, cos)));  // x sin + y cos
    }
}

// q's kG heads (kD dims each) de-interleaved as rotate_block's keys are, into out.
template <int64_t kD, int kG>
inline void split_query(const float* q, float (*out)[kD]) {
  for (int g = 0; g < kG; ++g)
    for (int64_t c = 0; c < kD / 16; ++c) {
      const __m256 a = _mm256_loadu_ps(q + g * kD + 16 * c), b = _mm256_loadu_ps(q + g * kD + 16 * c + 8);
      _mm256_storeu_ps(out[g] + 16 * c, _mm256_shuffle_ps(a, b, 0x88));
      _mm256_storeu_ps(out[g] + 16 * c + 8, _mm256_shuffle_ps(a, b, 0xDD));
    }
}

// AVX2, keys as stored: the scores s[g][v] (16 keys each) of kG query heads from q (their kD-dim vectors in order)
// with the n <= 16 * kV keys from `keys` (stride st); keys past n score 0. Blocked in registers: the 8-lane sums of
// three (or two) heads with four keys, each 8-float slice of a query and of a key loaded once a block (12 multiply-
// adds for 7 loads; scores_each, one key at a time: 8 for about 9, and two 8-float stores a head and key, reloaded
// by sum16). Each head's four sums are folded into one vector before they leave the registers (sum4_halves).
template <int64_t kD, int kG, int kV, bool kPrefetch = true>
inline void scores_blocked(const float* q, const float* keys, int64_t st, int64_t n, Vec16 (*s)[kV]) {
  constexpr int kHB = kG % 3 == 0 ? 3 : kG % 2 == 0 ? 2 : 1;  // heads a block
  constexpr int64_t kY = kD / 8;  // 8-float slices a vector
  alignas(32) static const float zeros[kD] = {};  // the keys past n
  alignas(32) float quarters[kG][4 * kV][8];  // per head and four keys: each key's sums of lanes 0-3 | 4-7
  for (int64_t j0 = 0; j0 < 16 * kV; j0 += 4) {
    const float* k[4];
    for (int j = 0; j < 4; ++j) k[j] = j0 + j < n ? keys + (j0 + j) * st : zeros;
    for (int g0 = 0; g0 < kG; g0 += kHB) {
      Vec8 acc[kHB][4] = {};
      for (int64_t c = 0; c < kY; ++c) {
        if (kPrefetch && g0 == 0 && c % 2 == 0)
          for (int j = 0; j < 4; ++j) prefetch_keys(keys + (j0 + j + kPrefetchKeys) * st + 8 * c);
        Vec8 qv[kHB];
        for (int h = 0; h < kHB; ++h) qv[h] = _mm256_loadu_ps(q + (g0 + h) * kD + 8 * c);
        for (int j = 0; j < 4; ++j) {
          const Vec8 kv = _mm256_loadu_ps(k[j] + 8 * c);
          for (int h = 0; h < kHB; ++h) acc[h][j] += qv[h] * kv;
        }
      }
      for (int h = 0; h < kHB; ++h) _mm256_store_ps(quarters[g0 + h][j0 / 4], sum4_halves(acc[h]));
    }
  }
  for (int g = 0; g < kG; ++g)
    for (int v = 0; v < kV; ++v) {
      const float(*t)[8] = quarters[g] + 4 * v;
      s[g][v] = {join_halves(_mm256_load_ps(t[0]), _mm256_load_ps(t[1])),
                 join_halves(_mm256_load_ps(t[2]), _mm256_load_ps(t[3]))};
    }
}
#endif

// kS (row, key head) streams starting at bh0, each streaming its keys once for its G query heads; rotary keys
// are rotated once per block for all G heads, each table vector loaded and spread over its pair's dims once for
// the kS streams. probs (G x 16), rescale (G), accs (G): scratch.
template <int64_t kD, bool kRotate, int kS>
void attend_group(const float* q, Stream<float> key, Stream<float> val, const float* rot, const bool* mask,
                  int64_t mask_stride, int64_t H, int64_t G, int64_t t0, int64_t t1, int64_t bh0, Partial& out,
                  float* probs, float* rescale, float** accs) {
  constexpr int64_t kC = kD / 16;  // vectors per head
  constexpr int kHeads = kC >= 8 ? 2 : 4;  // query heads per pass over the values: their accumulators in registers
  float rotated[kS][16][kD];  // rotary: this block's keys at their positions
  constexpr int kScoreHeads = kRotate ? 1 : kHeads;
  float parts[kScoreHeads][16][16];  // a pass's heads' products of the block's 16 keys, summed across lanes by sum16
  const Streams<kS> streams(key, val, mask, mask_stride, H, bh0);
  const auto& keys = streams.keys;
  for (int64_t b0 = t0; b0 < t1; b0 += 16) {
    const int64_t n = std::min<int64_t>(16, t1 - b0);
    Vec16 keep[kS];
    bool any[kS];
    if (!streams.block(b0, n, keep, any)) continue;  // every key of the block masked
    // Rotary (grouped heads): the block's keys rotated once, for every query head of the group (measured
    // 1.07-1.3x the query-side rotation per head at six heads a key).
    if constexpr (kRotate) {
      for (int64_t j = 0; j < n; ++j) {
        const float* r = rot + (b0 + j) * kD;
        for (int64_t c = 0; c < kC; ++c) {  // pair (k0, k1) -> (k0 cos - k1 sin, k1 cos + k0 sin)
          const Vec16 t = load16(r + 16 * c), cs = coses(t), sn = sines(t);
          for (int s = 0; s < kS; ++s) {
            const float* k = keys[s] + (b0 + j) * key.st;
            prefetch_keys(k + kPrefetchKeys * key.st + 16 * c);
            const Vec16 kv = load16(k + 16 * c);
            const Vec16 swapped = swap_pairs(kv) * kSigns;  // (-k1, k0, -k3, k2, ...)
            store16(rotated[s][j] + 16 * c, kv * cs + swapped * sn);
          }
        }
      }
    }
    for (int s = 0; s < kS; ++s) {
      if (!any[s]) continue;
      const int64_t bh = bh0 + s;
      // Scores and softmax weights, several query heads a pass over the keys as read (measured 1.05-1.08x one head a
      // pass); rotated keys one head a pass (several: 0.93x).
      for (int64_t g0 = 0; g0 < G; g0 += kScoreHeads) {
        const int gn = static_cast<int>(std::min<int64_t>(kScoreHeads, G - g0));
        switch (gn) {
          case 1: scores<kD, kRotate, 1>(q, keys[s], key.st, rotated[s], b0, n, bh * G + g0, parts); break;
          case 2: scores<kD, kRotate, 2>(q, keys[s], key.st, rotated[s], b0, n, bh * G + g0, parts); break;
          case 3: scores<kD, kRotate, 3>(q, keys[s], key.st, rotated[s], b0, n, bh * G + g0, parts); break;
          default: scores<kD, kRotate, 4>(q, keys[s], key.st, rotated[s], b0, n, bh * G + g0, parts); break;
        }
        for (int i = 0; i < gn; ++i) {
          const int64_t g = g0 + i, hg = bh * G + g;
          store16(probs + g * 16, softmax_block(sum16(parts[i][0]) + keep[s], out, hg, rescale[g]));
          accs[g] = out.acc.data() + hg * kD;
        }
      }
      const float* block_vals = streams.vals[s] + b0 * val.st;
      int64_t g = 0;
      for (; g + kHeads <= G; g += kHeads)
        accumulate<kC, kHeads>(block_vals, val.st, n, probs + g * 16, rescale + g, accs + g);
      if constexpr (kHeads >= 3) {
        if (G - g == 3) {  // three heads left (six query heads over two key heads): one pass
          accumulate<kC, 3>(block_vals, val.st, n, probs + g * 16, rescale + g, accs + g);
          g += 3;
        }
      }
      for (; g + 2 <= G; g += 2)
        accumulate<kC, 2>(block_vals, val.st, n, probs + g * 16, rescale + g, accs + g);
      for (; g < G; ++g)
        accumulate<kC, 1>(block_vals, val.st, n, probs + g * 16, rescale + g, accs + g);
    }
  }
}

// kG = 2, 3, 4 or 6 query heads a key head (GQA, MQA of six heads; with K = V: Q-GQA, Q-MQA) and heads of up to 64
// dims (with six heads some query vectors are read from L1 by the multiply-adds), keys rotary (kRotate: K = V, the
// keys rotated on the fly) or read as stored, values from `val` (the same stream when K = V): each key (rotated in
// registers by `rotate_pairs`) multiplied into every head's scores at once; the block's values read for the weighted
// sums of all kG heads in one pass; the softmax state of all kG heads in registers, their block maxima and
// rescaling factors computed together (`softmax_heads`). Rotary keys: against the rotated block that attend_group
// keeps, Q-GQA-2's read (three heads a key) 1.10-1.41x, six heads 1.06-1.32x (in two passes of three, each
// rotating again: 0.98-1.01x); the softmax of all heads together and the pair swap's sign in a multiply-add-subtract
// 1.05-1.09x more at three heads a key, 1.06x at six (blocks of 32 keys from four heads up; at three: 0.96-1.00x).
// Keys as stored (GQA-2, MQA; the read alone, caches flushed, against attend_group): three heads a key 1.12-1.29x,
// six 1.20-1.42x (blocks of 32 keys there: 0.7-0.8x). With AVX2, keys as stored are scored register-blocked
// (scores_blocked; the read alone against scores_each, Zen 1: Q-MQA 1.15-1.46x, Q-GQA-2 0.91-1.01x); rotary keys
// with four or more heads a key are rotated into L1 a block at a time and scored the same way (Q-MQA rotary
// 1.08-1.12x; at three heads 0.95x, and 0.99-1.01x once the rotation was de-interleaved: kept in registers; QKV
// and Q-K=V through this loop with one head: 0.78-0.85x, and scores_blocked for one head inside attend_group:
// 0.74-0.82x; both kept as they were; rotary keys turned by a multiply-add-subtract with AVX2 as with AVX-512:
// 0.995x). Other group sizes keep attend_group.
template <int64_t kD, int kG, bool kRotate>
void attend_heads(const float* q, Stream<float> key, Stream<float> val, const float* rot, const bool* mask,
                  int64_t mask_stride, int64_t H, int64_t t0, int64_t t1, int64_t bh, Partial& out) {
  constexpr int64_t kC = kD / 16;  // vectors per head
  // Score vectors (of 16 keys) a block. With AVX2 blocks of 32 keys at every group size, where the softmax's
  // per-block work (maxima and sums across lanes) costs more: MQA keys as stored 1.20x, rotary three heads 1.09x.
  constexpr int kV = kNarrow || (kRotate && kG >= 4) ? 2 : 1;
  const Streams<1> streams(key, val, mask, mask_stride, H, bh);
  const float* keys = streams.keys[0];
  const float* vals = streams.vals[0];
  Vec16 qv[kG][kC];
  float* accs[kG];
  float m[kG], l[kG];
  for (int g = 0; g < kG; ++g) {
    for (int64_t c = 0; c < kC; ++c) qv[g][c] = load16(q + (bh * kG + g) * kD + 16 * c);
    accs[g] = out.acc.data() + (bh * kG + g) * kD;
    m[g] = out.m[bh * kG + g];
    l[g] = out.l[bh * kG + g];
  }
#ifdef QKVLAB_HALVES
  alignas(32) float split[kRotate && kG >= 4 ? kG : 1][kD];  // rotary: the queries as rotate_block lays out keys
  if constexpr (kRotate && kG >= 4) split_query<kD, kG>(q + bh * kG * kD, split);
#endif
  for (int64_t b0 = t0; b0 < t1; b0 += 16 * kV) {
    const int64_t n = std::min<int64_t>(16 * kV, t1 - b0);
    Vec16 keep[kV];
    bool any[kV], some = false;
    for (int v = 0; v < kV; ++v) {
      const int64_t nv = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * v));
      some = streams.block(b0 + 16 * v, nv, keep + v, any + v) || some;  // none past n: all -inf
    }
    if (!some) continue;  // every key of the block masked
    Vec16 s[kG][kV];
#ifdef QKVLAB_HALVES
    if constexpr (!kRotate) {
      scores_blocked<kD, kG, kV>(q + bh * kG * kD, keys + b0 * key.st, key.st, n, s);
    } else if constexpr (kG >= 4) {  // the block's keys rotated into L1 first, then scored as stored keys are
      alignas(32) float rotated[16 * kV][kD];
      rotate_block<kD>(keys + b0 * key.st, key.st, rot + b0 * kD, n, rotated);
      scores_blocked<kD, kG, kV, false>(split[0], rotated[0], kD, n, s);
    } else
#endif
    {
      scores_each<kD, kG, kV, kRotate>(qv, keys + b0 * key.st, key.st, kRotate ? rot + b0 * kD : nullptr, n, s);
    }
    for (int g = 0; g < kG; ++g)
      for (int v = 0; v < kV; ++v) s[g][v] += keep[v];
    const Vec16 r = softmax_heads<kG, kV>(s, m, l);
    float probs[kG * 16 * kV], rescale[kG];
    for (int g = 0; g < kG; ++g) {
      rescale[g] = r[g];
      for (int v = 0; v < kV; ++v) store16(probs + g * 16 * kV + 16 * v, s[g][v]);
    }
    accumulate<kC, kG, 16 * kV>(vals + b0 * val.st, val.st, n, probs, rescale, accs);
  }
  for (int g = 0; g < kG; ++g) {
    out.m[bh * kG + g] = m[g];
    out.l[bh * kG + g] = l[g];
  }
}

// kRotate: K = V keys rotated on the fly by the table, for G > 1 query heads a key (one head a key:
// attend_streams); each (row, key head) still streams its keys in order, the table of the whole range re-read from
// the CPU's cache for each (measured 1.25-1.4x the loop that reads every row and head per block of positions, which
// shares each block of the table but interleaves B x H streams of keys; blocks of 128-1024 positions: 0.91-0.96x),
// two streams at a time sharing each table vector (heads up to 64 dims: their rotated blocks stay in L1; whole
// steps against one stream: Q-GQA-2 1.06-1.11x, Q-MQA 1.03-1.08x, an unchanged QKV step 0.97-1.03x). The table
// holds each pair's (cos, sin) once, spread over the pair's dims by two shuffles: half the bytes of separate
// cosine and sine tables per dim (measured 1.28x on the one-head-a-key read, 1.06x at six).
template <int64_t kD, bool kRotate>
void attend_vec(const float* q, const float* /*qs*/, Stream<float> key, Stream<float> val, const float* rot,
                const bool* mask, int64_t mask_stride, int64_t B, int64_t H, int64_t G, int64_t t0,
                int64_t t1, int64_t bh0, int64_t bh1, Partial& out) {
  constexpr int kS = kRotate && kD <= 64 ? 2 : 1;
  const int64_t HG = B * H * G;
  out.start(HG, kD);
  std::vector<float> probs(G * 16), rescale(G);  // a block's softmax weights and accumulator rescaling per head
  std::vector<float*> accs(G);
  if constexpr (kD <= 64) {
    if ((G >= 2 && G <= 4) || G == 6) {
      for (int64_t bh = bh0; bh < bh1; ++bh) {
        if (G == 2) attend_heads<kD, 2, kRotate>(q, key, val, rot, mask, mask_stride, H, t0, t1, bh, out);
        else if (G == 3) attend_heads<kD, 3, kRotate>(q, key, val, rot, mask, mask_stride, H, t0, t1, bh, out);
        else if (G == 4) attend_heads<kD, 4, kRotate>(q, key, val, rot, mask, mask_stride, H, t0, t1, bh, out);
        else attend_heads<kD, 6, kRotate>(q, key, val, rot, mask, mask_stride, H, t0, t1, bh, out);
      }
      return;
    }
  }
  int64_t bh = bh0;
  for (; bh + kS <= bh1; bh += kS)
    attend_group<kD, kRotate, kS>(q, key, val, rot, mask, mask_stride, H, G, t0, t1, bh, out, probs.data(),
                                  rescale.data(), accs.data());
  for (; bh < bh1; ++bh)
    attend_group<kD, kRotate, 1>(q, key, val, rot, mask, mask_stride, H, G, t0, t1, bh, out, probs.data(),
                                 rescale.data(), accs.data());
}

// Rotary K = V keys with one query head per key head (G = 1: Q-K=V, Q=K-V): kS (row, key head) streams at a time,
// so each block's table vectors are loaded and spread over their pairs' dims once for all of them. A score is the
// key against the query rotated to the key's position, sum_d k[d] (cos[t,d] q[d] + sin[t,d] qs[d]). Two streams
// against one, whole Q-K=V decode steps (6 layers, d_model 384, batch 4 / 1, 8,192 cached): 1.24x / 1.19x, 2,048
// cached: 1.16x, 512: 1.03x; three streams against two: 0.94-1.03x. The streams' softmax states in registers, one
// pass for both (`softmax_heads`; a stream may have attended nothing yet): the read alone 1.01-1.08x, whole Q-K=V
// steps 0.99-1.04x (kept: one softmax for every all-heads loop). Keys asked for into L2, kPrefetchKeys ahead: whole
// Q-K=V steps (Zen 1, after the softmax's lane reads left the stack) 8,192 cached, batch 4 / 1: 1.14x / 1.03x,
// Llama shape 2,048 batch 4: 1.08x, 512 batch 1: 1.04x (non-temporal into L1: 0.90x / 1.07x; twice or half as far
// ahead: 0.94-1.01x; measured 0.84-1.01x before the softmax change). A first try of attend_heads with one head
// (keys rotated) ran 0.76x with the data in cache and was not pursued.
template <int64_t kD, int kS>
void attend_streams(const float* q, const float* qs, Stream<float> key, Stream<float> val, const float* rot,
                    const bool* mask, int64_t mask_stride, int64_t H, int64_t t0, int64_t t1, int64_t bh0,
                    Partial& out) {
  constexpr int64_t kC = kD / 16;  // vectors per head
  const Streams<kS> streams(key, val, mask, mask_stride, H, bh0);
  const auto& keys = streams.keys;
  Vec16 qv[kS][kC], qsv[kS][kC];
  float m[kS], l[kS];
  for (int s = 0; s < kS; ++s) {
    m[s] = out.m[bh0 + s];
    l[s] = out.l[bh0 + s];
  }
  for (int s = 0; s < kS; ++s)
    for (int64_t c = 0; c < kC; ++c) {
      qv[s][c] = load16(q + (bh0 + s) * kD + 16 * c);
      qsv[s][c] = load16(qs + (bh0 + s) * kD + 16 * c);
    }
  for (int64_t b0 = t0; b0 < t1; b0 += 16) {
    const int64_t n = std::min<int64_t>(16, t1 - b0);
    Vec16 keep[kS];
    bool any[kS];
    if (!streams.block(b0, n, keep, any)) continue;  // every key of the block masked
    float part[kS][16][16];
    for (int64_t j = 0; j < 16; ++j) {
      Vec16 sc[kS] = {};
      if (j < n) {
        const float* r = rot + (b0 + j) * kD;
        for (int64_t c = 0; c < kC; ++c) {
          const Vec16 t = load16(r + 16 * c), cs = coses(t), sn = sines(t);
          for (int s = 0; s < kS; ++s) {
            if constexpr (kNarrow)  // measured with AVX2 (Zen 1) only
              prefetch_l2(keys[s] + (b0 + j + kPrefetchKeys) * key.st + 16 * c);
            sc[s] += load16(keys[s] + (b0 + j) * key.st + 16 * c) * (cs * qv[s][c] + sn * qsv[s][c]);
          }
        }
      }
      for (int s = 0; s < kS; ++s) store16(part[s][j], sc[s]);
    }
    Vec16 sv[kS][1];
    for (int s = 0; s < kS; ++s) sv[s][0] = any[s] ? sum16(part[s][0]) + keep[s] : Vec16{} - INFINITY;
    const Vec16 r = softmax_heads<kS, 1>(sv, m, l);
    for (int s = 0; s < kS; ++s) {
      if (!any[s]) continue;  // every key of the block masked for this stream
      float rescale = r[s], probs[16];
      store16(probs, sv[s][0]);
      float* acc = out.acc.data() + (bh0 + s) * kD;
      accumulate<kC, 1>(streams.vals[s] + b0 * val.st, val.st, n, probs, &rescale, &acc);
    }
  }
  for (int s = 0; s < kS; ++s) {
    out.m[bh0 + s] = m[s];
    out.l[bh0 + s] = l[s];
  }
}

// The streams bh0..bh1 of a work item (G = 1, rotary), two at a time.
template <int64_t kD>
void attend_pairs(const float* q, const float* qs, Stream<float> key, Stream<float> val, const float* rot,
                  const bool* mask, int64_t mask_stride, int64_t B, int64_t H, int64_t G, int64_t t0, int64_t t1,
                  int64_t bh0, int64_t bh1, Partial& out) {
  out.start(B * H * G, kD);
  int64_t bh = bh0;
  for (; bh + 2 <= bh1; bh += 2) attend_streams<kD, 2>(q, qs, key, val, rot, mask, mask_stride, H, t0, t1, bh, out);
  for (; bh < bh1; ++bh) attend_streams<kD, 1>(q, qs, key, val, rot, mask, mask_stride, H, t0, t1, bh, out);
}

// Caches stored narrower than float32 (bfloat16 bits; int8 or float8 codes with their scales), heads of 32, 64 or
// 128 dims: a work item widens kWiden positions of one or two (row, key head) streams at a time into float32
// scratch (each vector its decoded values times its scale), which stays in L2, and reads that with the float32
// loops above, their softmax state carried from chunk to chunk. Memory gives the narrow bytes; the arithmetic is
// the float32 read's (against `attend_range`'s general loop, which the other head sizes keep).
constexpr int64_t kWiden = 128;

// Vectors t0 .. t0 + n - 1 of stream s's (row b, head h) as floats, into out (n, D).
template <typename V>
inline void widen(const Stream<V>& s, int64_t b, int64_t h, int64_t t0, int64_t n, int64_t D, float* out) {
  constexpr bool kQuantized = std::is_same_v<V, int8_t> || std::is_same_v<V, uint8_t>;
  const V* src = s.data + b * s.sb + h * s.sh + t0 * s.st;
  for (int64_t t = 0; t < n; ++t) {
    const V* x = src + t * s.st;
    float* __restrict__ y = out + t * D;
    if constexpr (std::is_same_v<V, uint16_t>) {  // bfloat16: the bits are a float32's upper half
      const auto* w = reinterpret_cast<const uint16_t*>(x);
      auto* u = reinterpret_cast<uint32_t*>(y);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) u[d] = static_cast<uint32_t>(w[d]) << 16;
    } else if constexpr (kQuantized) {
      const float scale = bf16_to_float(s.scales.data[b * s.scales.sb + h * s.scales.sh + t0 + t]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) y[d] = load(x[d], s.lut) * scale;
    }
  }
}

template <typename V, int64_t kD, bool kRotate>
void attend_widened(const float* q, const float* qs, Stream<V> key, Stream<V> val, const float* rot,
                    const bool* mask, int64_t mask_stride, int64_t B, int64_t H, int64_t G, int64_t t0, int64_t t1,
                    int64_t bh0, int64_t bh1, Partial& out) {
  out.start(B * H * G, kD);
  const bool shared = key.data == val.data && key.sb == val.sb && key.sh == val.sh && key.st == val.st;
  // Scratch for every stream up to bh1 (stream bh at bh * kWiden * kD), so the float32 loops find each (row, key
  // head) where their strides say; only this item's streams are written, two at most a chunk.
  thread_local std::vector<float> kbuf, vbuf;
  const auto size = static_cast<size_t>(bh1 * kWiden * kD);
  if (kbuf.size() < size) kbuf.resize(size);
  if (!shared && vbuf.size() < size) vbuf.resize(size);
  const Stream<float> kf{kbuf.data(), H * kWiden * kD, kWiden * kD, kD, Scales{nullptr, 0, 0}, nullptr};
  const Stream<float> vf = shared ? kf : Stream<float>{vbuf.data(), kf.sb, kf.sh, kD, Scales{nullptr, 0, 0}, nullptr};
  const bool heads = kD <= 64 && ((G >= 2 && G <= 4) || G == 6);  // attend_heads: one stream a call
  const int64_t streams = heads ? 1 : (kRotate && (G == 1 || kD <= 64)) ? 2 : 1;
  std::vector<float> probs(G * 16), rescale(G);  // attend_group's scratch
  std::vector<float*> accs(G);
  for (int64_t bh = bh0; bh < bh1; bh += streams) {
    const int64_t ns = std::min(streams, bh1 - bh);
    for (int64_t c0 = t0; c0 < t1; c0 += kWiden) {
      const int64_t n = std::min(kWiden, t1 - c0);
      for (int64_t s = bh; s < bh + ns; ++s) {
        widen(key, s / H, s % H, c0, n, kD, kbuf.data() + s * kWiden * kD);
        if (!shared) widen(val, s / H, s % H, c0, n, kD, vbuf.data() + s * kWiden * kD);
      }
      const float* r = kRotate ? rot + c0 * kD : nullptr;  // positions from c0: the chunk's 0 .. n - 1
      const bool* mk = mask == nullptr ? nullptr : mask + c0;
      if constexpr (kD <= 64) {
        if (heads) {
          if (G == 2) attend_heads<kD, 2, kRotate>(q, kf, vf, r, mk, mask_stride, H, 0, n, bh, out);
          else if (G == 3) attend_heads<kD, 3, kRotate>(q, kf, vf, r, mk, mask_stride, H, 0, n, bh, out);
          else if (G == 4) attend_heads<kD, 4, kRotate>(q, kf, vf, r, mk, mask_stride, H, 0, n, bh, out);
          else attend_heads<kD, 6, kRotate>(q, kf, vf, r, mk, mask_stride, H, 0, n, bh, out);
          continue;
        }
      }
      if constexpr (kRotate) {
        if (G == 1) {
          if (ns == 2) attend_streams<kD, 2>(q, qs, kf, vf, r, mk, mask_stride, H, 0, n, bh, out);
          else attend_streams<kD, 1>(q, qs, kf, vf, r, mk, mask_stride, H, 0, n, bh, out);
          continue;
        }
      }
      if (ns == 2)
        attend_group<kD, kRotate, 2>(q, kf, vf, r, mk, mask_stride, H, G, 0, n, bh, out, probs.data(),
                                     rescale.data(), accs.data());
      else
        attend_group<kD, kRotate, 1>(q, kf, vf, r, mk, mask_stride, H, G, 0, n, bh, out, probs.data(),
                                     rescale.data(), accs.data());
    }
  }
}

// The work items' partial softmax states merged by log-sum-exp into out (rows = B * H * G, D).
void merge(const std::vector<Partial>& parts, int64_t rows, int64_t D, int32_t threads, float* out) {
  const int64_t splits = static_cast<int64_t>(parts.size());
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    float m = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) m = std::max(m, parts[s].m[i]);
    float l = 0.f;
    float* o = out + i * D;
    std::fill(o, o + D, 0.f);
    for (int64_t s = 0; s < splits; ++s) {
      const Partial& p = parts[s];
      if (p.m[i] == -INFINITY) continue;
      const float r = std::exp(p.m[i] - m);
      l += r * p.l[i];
      const float* acc = p.acc.data() + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] += r * acc[d];
    }
    const float inv = 1.f / l;  // no key attended: 0 * inf = nan, as softmax over nothing
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

// q, q_swap (B, H, G, D) float32 contiguous, already scaled; key, val: the streams (the same one for K = V); rot
// (T, D) contiguous, each pair's (cos, sin) at its two dims, or null for unrotated keys (q_swap unread); mask
// (B, T) bytes (nonzero = attend) or null; splits: key ranges (work items) over `threads` OpenMP threads.
// Writes out (B, H, G, D).
template <typename V>
void decode(const float* q, const float* qs, Stream<V> key, Stream<V> val, const float* rot, const uint8_t* mask,
            int64_t B, int64_t H, int64_t G, int64_t D, int64_t T, int64_t splits, int32_t threads, float* out) {
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, (T + kBlock - 1) / kBlock));
  const int64_t per = (T + splits - 1) / splits;
  std::vector<Partial> parts(splits);
  const bool* mp = reinterpret_cast<const bool*>(mask);
  const bool rotate = rot != nullptr;
  // Narrower caches with one query head a key read as stored (QKV; Q-K=V with learned positions): the general
  // loop. Widening them first measured (Zen 1, the read alone at 8k, batch 4, chunks of 32-128 positions) keys and
  // values apart bf16 0.81-0.95x, int8 0.69-0.78x, float8 0.91x; one K = V stream bf16 0.93-1.15x, int8
  // 0.99-1.19x, but float8 1.50-1.53x (the general loop looks each code up one at a time): widened.
  const bool apart = key.data != val.data || key.sb != val.sb || key.sh != val.sh || key.st != val.st;
  const bool general = !std::is_same_v<V, float> && G == 1 && !rotate && (apart || !std::is_same_v<V, uint8_t>);
  if ((D == 32 || D == 64 || D == 128) && !general) {  // heads of 16-float vectors: 16 keys per vector of scores
    using Read = void (*)(const float*, const float*, Stream<V>, Stream<V>, const float*, const bool*, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, Partial&);
    Read vec;
    if constexpr (std::is_same_v<V, float>)
      vec = rotate && G == 1 ? (D == 64 ? attend_pairs<64> : D == 128 ? attend_pairs<128> : attend_pairs<32>)
            : rotate ? (D == 64 ? attend_vec<64, true> : D == 128 ? attend_vec<128, true> : attend_vec<32, true>)
                     : (D == 64 ? attend_vec<64, false> : D == 128 ? attend_vec<128, false> : attend_vec<32, false>);
    else  // narrower caches: widened a chunk at a time, then read as float32
      vec = rotate ? (D == 64 ? attend_widened<V, 64, true> : D == 128 ? attend_widened<V, 128, true>
                                                                       : attend_widened<V, 32, true>)
                   : (D == 64 ? attend_widened<V, 64, false> : D == 128 ? attend_widened<V, 128, false>
                                                                        : attend_widened<V, 32, false>);
    // Fewer key ranges than threads (short caches): the (row, key head) streams are split too, so every thread
    // reads; a work item's rows outside its group keep m = -inf and the merge skips them.
    const int64_t rows = B * H;
    const int64_t groups = std::min(rows, std::max<int64_t>(1, (threads + splits - 1) / splits));
    parts.resize(splits * groups);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t w = 0; w < splits * groups; ++w) {
      const int64_t s = w / groups, g = w % groups;
      const int64_t t0 = s * per, t1 = std::min(T, t0 + per);
      vec(q, qs, key, val, rot, mp, T, B, H, G, t0, std::max(t0, t1), g * rows / groups, (g + 1) * rows / groups,
          parts[w]);
    }
    merge(parts, B * H * G, D, threads, out);
    return;
  }
  auto attend = rotate ? (D == 64 ? attend_range<V, 64, true> : D == 128 ? attend_range<V, 128, true>
                          : D == 32 ? attend_range<V, 32, true> : attend_range<V, 0, true>)
                       : (D == 64 ? attend_range<V, 64, false> : D == 128 ? attend_range<V, 128, false>
                          : D == 32 ? attend_range<V, 32, false> : attend_range<V, 0, false>);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t t0 = s * per, t1 = std::min(T, t0 + per);
    attend(q, qs, key, val, rot, mp, T, B, H, G, D, t0, std::max(t0, t1), parts[s]);
  }
  merge(parts, B * H * G, D, threads, out);
}

}  // namespace

extern "C" void qkvlab_kv_rotary_decode(const float* q, const float* qs, const float* kv, int64_t sb, int64_t sh,
                                        int64_t st, const float* rot, const uint8_t* mask,
                                        int64_t B, int64_t H, int64_t G, int64_t D, int64_t T, int64_t splits,
                                        int32_t threads, float* out) {
  const Stream<float> shared{kv, sb, sh, st, Scales{nullptr, 0, 0}, nullptr};
  decode<float>(q, qs, shared, shared, rot, mask, B, H, G, D, T, splits, threads, out);
}

// Float32 keys k and values v from their own streams (QKV, GQA: keys stored rotated, so no tables).
extern "C" void qkvlab_kv_decode_pair(const float* q, const float* k, int64_t ksb, int64_t ksh, int64_t kst,
                                      const float* v, int64_t vsb, int64_t vsh, int64_t vst, const uint8_t* mask,
                                      int64_t B, int64_t H, int64_t G, int64_t D, int64_t T, int64_t splits,
                                      int32_t threads, float* out) {
  const Stream<float> key{k, ksb, ksh, kst, Scales{nullptr, 0, 0}, nullptr};
  const Stream<float> val{v, vsb, vsh, vst, Scales{nullptr, 0, 0}, nullptr};
  decode<float>(q, q, key, val, nullptr, mask, B, H, G, D, T, splits, threads, out);
}

// Over an int8 cache: keys k (scales ks: bfloat16 bits, key t of head h in row b at ks + b * kssb + h * kssh + t) and
// values v (scales vs), which are the keys again (same pointers and strides) when K = V.
extern "C" void qkvlab_kv_rotary_decode_int8(const float* q, const float* qs, const int8_t* k, int64_t ksb,
                                             int64_t ksh, int64_t kst, const uint16_t* ks, int64_t kssb,
                                             int64_t kssh, const int8_t* v, int64_t vsb, int64_t vsh, int64_t vst,
                                             const uint16_t* vs, int64_t vssb, int64_t vssh, const float* rot,
                                             const uint8_t* mask, int64_t B, int64_t H, int64_t G,
                                             int64_t D, int64_t T, int64_t splits, int32_t threads, float* out) {
  const Stream<int8_t> key{k, ksb, ksh, kst, Scales{ks, kssb, kssh}, nullptr};
  const Stream<int8_t> val{v, vsb, vsh, vst, Scales{vs, vssb, vssh}, nullptr};
  decode<int8_t>(q, qs, key, val, rot, mask, B, H, G, D, T, splits, threads, out);
}

// Over a bfloat16 cache (no scales): keys k and values v, the same pointers and strides when K = V.
extern "C" void qkvlab_kv_rotary_decode_bf16(const float* q, const float* qs, const uint16_t* k, int64_t ksb,
                                             int64_t ksh, int64_t kst, const uint16_t* v, int64_t vsb, int64_t vsh,
                                             int64_t vst, const float* rot, const uint8_t* mask, int64_t B, int64_t H,
                                             int64_t G, int64_t D, int64_t T, int64_t splits, int32_t threads,
                                             float* out) {
  const Stream<uint16_t> key{k, ksb, ksh, kst, Scales{nullptr, 0, 0}, nullptr};
  const Stream<uint16_t> val{v, vsb, vsh, vst, Scales{nullptr, 0, 0}, nullptr};
  decode<uint16_t>(q, qs, key, val, rot, mask, B, H, G, D, T, splits, threads, out);
}

// The same over a float8 cache, its codes as bytes: lut (256 floats) gives each code's value.
extern "C" void qkvlab_kv_rotary_decode_fp8(const float* q, const float* qs, const uint8_t* k, int64_t ksb,
                                            int64_t ksh, int64_t kst, const uint16_t* ks, int64_t kssb,
                                            int64_t kssh, const uint8_t* v, int64_t vsb, int64_t vsh, int64_t vst,
                                            const uint16_t* vs, int64_t vssb, int64_t vssh, const float* lut,
                                            const float* rot, const uint8_t* mask, int64_t B,
                                            int64_t H, int64_t G, int64_t D, int64_t T, int64_t splits,
                                            int32_t threads, float* out) {
  const Stream<uint8_t> key{k, ksb, ksh, kst, Scales{ks, kssb, kssh}, lut};
  const Stream<uint8_t> val{v, vsb, vsh, vst, Scales{vs, vssb, vssh}, lut};
  decode<uint8_t>(q, qs, key, val, rot, mask, B, H, G, D, T, splits, threads, out);
}
