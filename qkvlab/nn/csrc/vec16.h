// Sixteen floats as one vector, sums across lanes and the lane-wise exponential, shared by the cache read
// (kv_decode.cpp), the few-row linear layer (small_linear.cpp) and the whole-step decode (decode_step.cpp).
//
// With AVX-512 (or any target but the one below) a Vec16 is a GCC / Clang vector of 16 floats: one register.
// With AVX2 but not AVX-512 it is a pair of 8-float vectors with the same operators. GCC 12 lowers a 16-float
// vector there badly: shuffles lane by lane through the stack, a vector that lives across a loop kept in memory and
// copied through general-purpose registers, `float * v` built from sixteen scalar stores. The cache read ran at
// 5-40 % of `x.sum()`'s rate on a Zen 1 EPYC (docs/PERFORMANCE.md). Code using Vec16 writes `select(mask, a, b)`
// for a lane-wise choice and the named shuffles below, which both kinds implement.

#pragma once

#include <cstdint>
#if defined(__AVX2__) && !defined(__AVX512F__)
#define QKVLAB_HALVES 1
#include <immintrin.h>
#endif

namespace qkvlab {

typedef int32_t Int16 __attribute__((vector_size(16 * sizeof(int32_t))));

#ifdef QKVLAB_HALVES
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t Int8 __attribute__((vector_size(8 * sizeof(int32_t))));

struct Mask16 {  // a lane-wise comparison: all ones where true
  Int8 lo, hi;
};

struct Vec16 {
  Vec8 lo, hi;  // lanes 0-7, 8-15

  constexpr Vec16() : lo{}, hi{} {}
  constexpr Vec16(Vec8 l, Vec8 h) : lo(l), hi(h) {}
  constexpr Vec16(float a0, float a1, float a2, float a3, float a4, float a5, float a6, float a7, float a8, float a9,
                  float a10, float a11, float a12, float a13, float a14, float a15)
      : lo{a0, a1, a2, a3, a4, a5, a6, a7}, hi{a8, a9, a10, a11, a12, a13, a14, a15} {}

  float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
  float& operator[](int i) { return reinterpret_cast<float*>(this)[i]; }  // a vector aliases its floats

  Vec16& operator+=(Vec16 b) { lo += b.lo; hi += b.hi; return *this; }
  Vec16& operator-=(Vec16 b) { lo -= b.lo; hi -= b.hi; return *this; }
  Vec16& operator*=(Vec16 b) { lo *= b.lo; hi *= b.hi; return *this; }
};

inline Vec16 splat(float x) {  // x in every lane
  const Vec8 h = Vec8{} + x;
  return {h, h};
}

#define QKVLAB_LANEWISE(op)                                                                             \
  inline Vec16 operator op(Vec16 a, Vec16 b) { return {a.lo op b.lo, a.hi op b.hi}; }                 \
  inline Vec16 operator op(Vec16 a, float b) { return {a.lo op b, a.hi op b}; }                       \
  inline Vec16 operator op(float a, Vec16 b) { return {a op b.lo, a op b.hi}; }
QKVLAB_LANEWISE(+)
QKVLAB_LANEWISE(-)
QKVLAB_LANEWISE(*)
QKVLAB_LANEWISE(/)
#undef QKVLAB_LANEWISE

#define QKVLAB_COMPARE(op)                                                                              \
  inline Mask16 operator op(Vec16 a, Vec16 b) { return {a.lo op b.lo, a.hi op b.hi}; }                \
  inline Mask16 operator op(Vec16 a, float b) { return {a.lo op b, a.hi op b}; }
QKVLAB_COMPARE(<)
QKVLAB_COMPARE(>)
QKVLAB_COMPARE(==)
#undef QKVLAB_COMPARE

inline Vec16 operator-(Vec16 a) { return {-a.lo, -a.hi}; }

inline Vec16 select(Mask16 m, Vec16 a, Vec16 b) { return {m.lo ? a.lo : b.lo, m.hi ? a.hi : b.hi}; }

inline Vec16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }  // unaligned

inline void store16(float* p, Vec16 v) {  // unaligned
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}

// (v0, v0, v2, v2, ...): each pair's first lane in both (a rotation table's cosines).
inline Vec16 dup_even(Vec16 v) { return {_mm256_moveldup_ps(v.lo), _mm256_moveldup_ps(v.hi)}; }
// (v1, v1, v3, v3, ...): each pair's second lane in both (a rotation table's sines).
inline Vec16 dup_odd(Vec16 v) { return {_mm256_movehdup_ps(v.lo), _mm256_movehdup_ps(v.hi)}; }
// (v1, v0, v3, v2, ...): the lanes of each pair swapped.
inline Vec16 swap_pairs(Vec16 v) { return {_mm256_permute_ps(v.lo, 0xB1), _mm256_permute_ps(v.hi, 0xB1)}; }
// (v2, v3, v0, v1, ...): the pairs of each four swapped.
inline Vec16 swap_twos(Vec16 v) { return {_mm256_permute_ps(v.lo, 0x4E), _mm256_permute_ps(v.hi, 0x4E)}; }
// (v4-v7, v0-v3, v12-v15, v8-v11): the fours of each eight swapped.
inline Vec16 swap_fours(Vec16 v) {
  return {_mm256_permute2f128_ps(v.lo, v.lo, 1), _mm256_permute2f128_ps(v.hi, v.hi, 1)};
}
// (v8-v15, v0-v7): the two eights swapped.
inline Vec16 swap_eights(Vec16 v) { return {v.hi, v.lo}; }

#else  // one vector of 16 floats

typedef float Vec16 __attribute__((vector_size(16 * sizeof(float))));
typedef Int16 Mask16;

// Lanes of two vectors picked by constant indices (0-15 from a, 16-31 from b); GCC before 12 spells it otherwise.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, qkvlab::Int16{__VA_ARGS__})
#endif

inline Vec16 splat(float x) { return Vec16{} + x; }
inline Vec16 select(Mask16 m, Vec16 a, Vec16 b) { return m ? a : b; }

inline Vec16 load16(const float* p) {  // unaligned
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, Vec16 v) { __builtin_memcpy(p, &v, sizeof v); }  // unaligned

inline Vec16 dup_even(Vec16 v) { return SHUFFLE(v, v, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14); }
inline Vec16 dup_odd(Vec16 v) { return SHUFFLE(v, v, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15); }
inline Vec16 swap_pairs(Vec16 v) { return SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14); }
inline Vec16 swap_twos(Vec16 v) { return SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13); }
inline Vec16 swap_fours(Vec16 v) { return SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11); }
inline Vec16 swap_eights(Vec16 v) { return SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7); }

inline Vec16 fold(Vec16 a, Vec16 b) {
  return SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

#endif

#ifdef QKVLAB_HALVES
// Sums across lanes without horizontal adds (`vhaddps` decodes into many more operations on AMD's Zen 1).
// Lanes j and j + 4 of the result: the sums of lanes 0-3 and of lanes 4-7 of r[j] (four rows; interleaves and adds
// within 128-bit lanes: 9 operations).
inline Vec8 sum4_halves(const Vec8* r) {
  Vec8 s[2];
  for (int i = 0; i < 2; ++i)  // rows 2i, 2i+1: (a0 + a2, b0 + b2, a1 + a3, b1 + b3 | the same of lanes 4-7)
    s[i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]) + _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  return _mm256_shuffle_ps(s[0], s[1], 0x44) + _mm256_shuffle_ps(s[0], s[1], 0xEE);
}

// Two sum4_halves results (rows 0-3, rows 4-7) as the 8 rows' sums: lane j the sum of the 8 lanes of row j.
inline Vec8 join_halves(Vec8 a, Vec8 b) {
  const __m128 lo = _mm256_castps256_ps128(a) + _mm256_extractf128_ps(a, 1);
  const __m128 hi = _mm256_castps256_ps128(b) + _mm256_extractf128_ps(b, 1);
  return _mm256_set_m128(hi, lo);
}

// Lane j: the sum of the 8 lanes of r[j] (21 operations).
inline Vec8 sum8(const Vec8* r) { return join_halves(sum4_halves(r), sum4_halves(r + 4)); }

// Lane j of the result: the sum of the 16 lanes of row j of `rows` (16 rows of 16 floats).
inline Vec16 sum16(const float* rows) {
  Vec8 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_ps(rows + 16 * i) + _mm256_loadu_ps(rows + 16 * i + 8);
  return {sum8(r), sum8(r + 8)};
}
#else
// Lane j of the result: the sum of the 16 lanes of row j of `rows` (16 rows of 16 floats).
inline Vec16 sum16(const float* rows) {
  Vec16 w[8], x[4];
  for (int i = 0; i < 8; ++i) w[i] = fold(load16(rows + 32 * i), load16(rows + 32 * i + 16));  // 8 partial sums
  for (int i = 0; i < 4; ++i) x[i] = fold(w[2 * i], w[2 * i + 1]);  // 4 of each
  return fold(fold(x[0], x[1]), fold(x[2], x[3]));  // 2 of each, then 1
}
#endif

// exp of each lane for x <= 0 (softmax weights; 0 below -87, so exp(-inf) = 0): Cody-Waite reduction to
// r in about [-ln2/2, ln2/2] and Cephes' degree-6 polynomial (tested against float64: the cache read's softmax,
// the native step's activations). V: a float vector, I: the int32 vector of as many lanes.
template <class V, class I>
inline V vexp_lanes(V x) {
  const V zero{};
  const V lo = zero - 87.f;
  const V xc = x < lo ? lo : x;
  const I n = __builtin_convertvector(xc * 1.44269504f - 0.5f, I);  // round(x / ln2), x <= 0
  const V nf = __builtin_convertvector(n, V);
  const V r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const I bits = (n + 127) << 23;  // 2^n
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  const V e = p * scale;
  return x < lo ? zero : e;
}

#ifdef QKVLAB_HALVES
inline Vec16 vexp(Vec16 x) { return {vexp_lanes<Vec8, Int8>(x.lo), vexp_lanes<Vec8, Int8>(x.hi)}; }
#else
inline Vec16 vexp(Vec16 x) { return vexp_lanes<Vec16, Int16>(x); }
#endif

}  // namespace qkvlab
