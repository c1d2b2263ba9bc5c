// Sixteen floats as one vector (GCC / Clang vector extensions: one AVX-512 register, two AVX2 ones, or what the
// target has), sums across lanes and the lane-wise exponential, shared by the cache read (kv_decode.cpp), the
// few-row linear layer (small_linear.cpp) and the whole-step decode (decode_step.cpp).

#pragma once

#include <cstdint>
#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace qkvlab {

typedef float Vec16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t Int16 __attribute__((vector_size(16 * sizeof(int32_t))));

// Lanes of two vectors picked by constant indices (0-15 from a, 16-31 from b); GCC before 12 spells it otherwise.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, qkvlab::Int16{__VA_ARGS__})
#endif

// Fixed lane permutations, named. With AVX-512 each is one shuffle of a register, written with the vector
// extensions. With AVX2 but not AVX-512 a Vec16 is two ymm registers, and GCC 12 builds 16-lane shuffles lane by
// lane (vinsertps chains through the stack: the cache read ran at 5-14 % of `x.sum()`'s rate on a Zen 1 EPYC), so
// there they are spelled on the two halves with AVX intrinsics.
#if defined(__AVX2__) && !defined(__AVX512F__)
#define QKVLAB_HALVES 1
struct Halves {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
inline Halves halves(Vec16 v) {
  Halves h;
  __builtin_memcpy(&h, &v, sizeof v);  // a register pair: no memory once inlined
  return h;
}
inline Vec16 joined(__m256 lo, __m256 hi) {
  const Halves h{lo, hi};
  Vec16 v;
  __builtin_memcpy(&v, &h, sizeof v);
  return v;
}
template <int kImm>
inline Vec16 permute_within_fours(Vec16 v) {  // the same 4-lane permutation in each group of four lanes
  const Halves h = halves(v);
  return joined(_mm256_permute_ps(h.lo, kImm), _mm256_permute_ps(h.hi, kImm));
}
#endif

inline Vec16 load16(const float* p) {  // unaligned
#ifdef QKVLAB_HALVES
  return joined(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
#else
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
#endif
}

// Unaligned. With AVX2 alone, stored half by half: GCC 12 copied a 64-byte vector's memcpy through
// general-purpose registers.
inline void store16(float* p, Vec16 v) {
#ifdef QKVLAB_HALVES
  const Halves h = halves(v);
  _mm256_storeu_ps(p, h.lo);
  _mm256_storeu_ps(p + 8, h.hi);
#else
  __builtin_memcpy(p, &v, sizeof v);
#endif
}

// x in every lane. Write it where a float meets a vector in a hot loop: with AVX2 alone GCC 12 spelled `x * v` as
// sixteen scalar stores and a vector load (a failed store-to-load forward each time).
inline Vec16 splat(float x) {
#ifdef QKVLAB_HALVES
  const __m256 h = _mm256_set1_ps(x);
  return joined(h, h);
#else
  return Vec16{} + x;
#endif
}

// (v0, v0, v2, v2, ...): each pair's first lane in both (a rotation table's cosines).
inline Vec16 dup_even(Vec16 v) {
#ifdef QKVLAB_HALVES
  const Halves h = halves(v);
  return joined(_mm256_moveldup_ps(h.lo), _mm256_moveldup_ps(h.hi));
#else
  return SHUFFLE(v, v, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
#endif
}

// (v1, v1, v3, v3, ...): each pair's second lane in both (a rotation table's sines).
inline Vec16 dup_odd(Vec16 v) {
#ifdef QKVLAB_HALVES
  const Halves h = halves(v);
  return joined(_mm256_movehdup_ps(h.lo), _mm256_movehdup_ps(h.hi));
#else
  return SHUFFLE(v, v, 1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15);
#endif
}

// (v1, v0, v3, v2, ...): the lanes of each pair swapped.
inline Vec16 swap_pairs(Vec16 v) {
#ifdef QKVLAB_HALVES
  return permute_within_fours<0xB1>(v);
#else
  return SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#endif
}

// (v2, v3, v0, v1, ...): the pairs of each four swapped.
inline Vec16 swap_twos(Vec16 v) {
#ifdef QKVLAB_HALVES
  return permute_within_fours<0x4E>(v);
#else
  return SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
#endif
}

// (v4-v7, v0-v3, v12-v15, v8-v11): the fours of each eight swapped.
inline Vec16 swap_fours(Vec16 v) {
#ifdef QKVLAB_HALVES
  const Halves h = halves(v);
  return joined(_mm256_permute2f128_ps(h.lo, h.lo, 1), _mm256_permute2f128_ps(h.hi, h.hi, 1));
#else
  return SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
#endif
}

// (v8-v15, v0-v7): the two eights swapped.
inline Vec16 swap_eights(Vec16 v) {
#ifdef QKVLAB_HALVES
  const Halves h = halves(v);
  return joined(h.hi, h.lo);
#else
  return SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
}

// Pairwise lane sums of a and b: lanes 0-7 hold a's, lanes 8-15 b's (each in lane order).
inline Vec16 fold(Vec16 a, Vec16 b) {
#ifdef QKVLAB_HALVES
  const Halves x = halves(a), y = halves(b);
  // hadd of a's halves: (a0+a1, a2+a3, a8+a9, a10+a11 | a4+a5, a6+a7, a12+a13, a14+a15); 64-bit lanes 0, 2, 1, 3
  const auto in_order = [](__m256 s) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8)); };
  return joined(in_order(_mm256_hadd_ps(x.lo, x.hi)), in_order(_mm256_hadd_ps(y.lo, y.hi)));
#else
  return SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#endif
}

// Lane j of the result: the sum of the 16 lanes of row j of `rows` (16 rows of 16 floats). Arrays of vectors that
// live in memory are kept as floats, written by store16: with AVX2 alone GCC 12 copied Vec16 array elements through
// general-purpose registers.
inline Vec16 sum16(const float* rows) {
  Vec16 w[8], x[4];
  for (int i = 0; i < 8; ++i) w[i] = fold(load16(rows + 32 * i), load16(rows + 32 * i + 16));  // 8 partial sums
  for (int i = 0; i < 4; ++i) x[i] = fold(w[2 * i], w[2 * i + 1]);  // 4 of each
  return fold(fold(x[0], x[1]), fold(x[2], x[3]));  // 2 of each, then 1
}

// exp of each lane for x <= 0 (softmax weights; 0 below -87, so exp(-inf) = 0): Cody-Waite reduction to
// r in about [-ln2/2, ln2/2] and Cephes' degree-6 polynomial (tested against float64: the cache read's softmax,
// the native step's activations).
inline Vec16 vexp(Vec16 x) {
  const Vec16 zero{};
  const Vec16 lo = zero - 87.f;
  const Vec16 xc = x < lo ? lo : x;
  const Int16 n = __builtin_convertvector(xc * 1.44269504f - 0.5f, Int16);  // round(x / ln2), x <= 0
  const Vec16 nf = __builtin_convertvector(n, Vec16);
  const Vec16 r = (xc - nf * 0.693359375f) - nf * -2.12194440e-4f;
  Vec16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const Int16 bits = (n + 127) << 23;  // 2^n
  Vec16 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  const Vec16 e = p * scale;
  return x < lo ? zero : e;
}

}  // namespace qkvlab
