// Sixteen floats as one vector (GCC / Clang vector extensions: one AVX-512 register, two AVX2 ones, or what the
// target has), sums across lanes and the lane-wise exponential, shared by the cache read (kv_decode.cpp), the
// few-row linear layer (small_linear.cpp) and the whole-step decode (decode_step.cpp).

#pragma once

#include <cstdint>

namespace qkvlab {

typedef float Vec16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t Int16 __attribute__((vector_size(16 * sizeof(int32_t))));

// Lanes of two vectors picked by constant indices (0-15 from a, 16-31 from b); GCC before 12 spells it otherwise.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, qkvlab::Int16{__VA_ARGS__})
#endif

inline Vec16 load16(const float* p) {
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof v);  // unaligned
  return v;
}

inline void store16(float* p, Vec16 v) { __builtin_memcpy(p, &v, sizeof v); }  // unaligned

// Pairwise lane sums of a and b: lanes 0-7 hold a's, lanes 8-15 b's (each in lane order).
inline Vec16 fold(Vec16 a, Vec16 b) {
  return SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Lane j of the result: the sum of the 16 lanes of v[j].
inline Vec16 sum16(const Vec16* v) {
  Vec16 w[8], x[4];
  for (int i = 0; i < 8; ++i) w[i] = fold(v[2 * i], v[2 * i + 1]);  // 8 partial sums of each
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
