// y (M, N) = x (M, K) W^T + b for a few rows of x (decoding: one token per sequence), W (N, K) row-major.
//
// Output columns are split over OpenMP threads in chunks of 64 (64 weight rows, contiguous); each weight row is
// read once for every row of x (eight at a time with AVX-512, then four) while the rows of x stay in L1. At these
// shapes the step is bound by reading the weight (measured on a 2-core AMD EPYC: 2-4.5x PyTorch's F.linear, whose
// BLAS matrix-vector path reads weights at 5-8 GB/s there).
//
// A whole chunk (K a multiple of 16) is read as four sequential streams of 16 weight rows each (`streams`:
// AVX-512; elsewhere one row of x), one vector of each stream per step, and the 16 dot products of each stream's
// rows are summed across lanes together (vec16.h's sum16). Measured against reading the chunk's rows one after
// another (the loops kept below for partial chunks), a six-layer d_model 384 step's 25 weights from memory:
// 1.3-1.7x at four rows of x, 1.2x at two, 1.05-1.3x at one. One stream at a time runs ahead of the hardware
// prefetcher's reach when each of its vectors takes four multiply-adds (with the weights in cache: 1.25-1.3x).

#include <algorithm>
#include <cstdint>

#include "vec16.h"

namespace {

using qkvlab::load16, qkvlab::store16, qkvlab::sum16, qkvlab::Vec16;

constexpr int64_t kLanes = 16;  // partial sums per dot product: one AVX-512 register, or two AVX2 ones
constexpr int64_t kChunk = 64;  // output columns per work item
// Weight rows read side by side in a whole chunk (each stream kChunk / streams rows) for kM rows of x; 0: the
// row-by-row loops. Without AVX-512 only one row of x takes the streams: built for AVX2 and run on the same CPU,
// two to four rows ran at half the row-by-row loops' speed (their sums do not fit in 16 registers), one row 2.2x.
template <int kM>
constexpr int streams() {
#if defined(__AVX512F__)
  return kM == 8 ? 2 : 4;  // eight rows of x: two streams (16 sums in registers; four streams spill)
#else
  return kM == 1 ? 4 : 0;
#endif
}

// How far ahead of its reads (floats) each weight stream asks for lines into L2 (locality 2), so each 16-row
// stream of a chunk starts in cache rather than waiting for the hardware prefetcher to find it again. Against no
// software prefetch, the 25 weights of a six-layer d_model 384 step from memory: four rows of x 1.09x (`x.sum()`
// at 34 GB/s) and 1.28x (at 56 GB/s, 1,024 ahead), one row 1.03-1.04x; 2,048 ahead or 1,024 at one or two rows:
// 0.89-1.0x. (Into L1, 256-1,024 ahead, an earlier session measured 0.92-1.00x.)
template <int kM>
constexpr int64_t kAhead() { return kM >= 3 ? 1024 : 256; }

// kM rows of x against the kChunk weight rows from n0 (all present; K a multiple of 16), kStreams at a time.
template <int kM, int kStreams>
void chunk(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n0) {
  constexpr int64_t per = kChunk / kStreams;  // rows per stream, a multiple of 16
  for (int64_t j0 = 0; j0 < per; j0 += 16) {
    float part[kStreams][kM][16][16];  // each stream's 16 rows' partial sums, summed across lanes at the end
    for (int64_t j = 0; j < 16; ++j) {
      const float* rows[kStreams];
      for (int s = 0; s < kStreams; ++s) rows[s] = w + (n0 + s * per + j0 + j) * K;
      Vec16 acc[kStreams][kM] = {};
      for (int64_t k = 0; k < K; k += 16) {
        Vec16 xv[kM];
        for (int m = 0; m < kM; ++m) xv[m] = load16(x + m * K + k);
        for (int s = 0; s < kStreams; ++s) {
          __builtin_prefetch(rows[s] + k + kAhead<kM>(), 0, 2);  // into L2
          Vec16 wv = load16(rows[s] + k);
#if defined(__AVX512F__)
          asm("" : "+v"(wv));  // one load for the kM products (GCC would fold it into each multiply-add)
#endif
          for (int m = 0; m < kM; ++m) acc[s][m] += wv * xv[m];
        }
      }
      for (int s = 0; s < kStreams; ++s)
        for (int m = 0; m < kM; ++m) store16(part[s][m][j], acc[s][m]);
    }
    for (int s = 0; s < kStreams; ++s) {
      const int64_t n = n0 + s * per + j0;
      const Vec16 bias = b == nullptr ? Vec16{} : load16(b + n);
      for (int m = 0; m < kM; ++m) store16(y + m * N + n, sum16(part[s][m][0]) + bias);
    }
  }
}

// One row of x, rows of W one after another (partial chunks): the partial sums as explicit vector registers
// (measured 1.1-1.5x the array form below, which is the faster one for two to four rows).
void column_one(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    Vec16 part{};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) part += load16(wn + k) * load16(x + k);
    float s = b == nullptr ? 0.f : b[n];
    for (int64_t i = 0; i < kLanes; ++i) s += part[i];
    for (int64_t r = k; r < K; ++r) s += wn[r] * x[r];
    y[n] = s;
  }
}

template <int kM>
void columns(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n0,
             int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wn = w + n * K;
    float part[kM][kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes)
      for (int m = 0; m < kM; ++m) {
        const float* xm = x + m * K + k;
#pragma omp simd
        for (int64_t i = 0; i < kLanes; ++i) part[m][i] += wn[k + i] * xm[i];
      }
    for (int m = 0; m < kM; ++m) {
      float s = b == nullptr ? 0.f : b[n];
      for (int64_t i = 0; i < kLanes; ++i) s += part[m][i];
      for (int64_t r = k; r < K; ++r) s += wn[r] * x[m * K + r];
      y[m * N + n] = s;
    }
  }
}

#ifdef QKVLAB_HALVES
using qkvlab::Vec8;

// AVX2 alone, two to four rows of x: weight rows two at a time, half the range apart (two memory streams: against
// the row-by-row loop 1.2x at two rows, 1.5x at four; adjacent rows 0.86x / 1.18x), the 2 x kM dot products as
// 8-lane partial sums in registers (8 of the 16 for four rows), each weight vector loaded once for the kM rows of
// x, each x vector once for both weight rows; the 8 partial sums of a pair summed across lanes together (sum8).
template <int kM>
void pairs(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int kW = 2;  // weight rows at a time, each its own stream (four for two rows of x: the same speed)
  const int64_t h = (n1 - n0) / kW;  // rows n0 + i, n0 + h + i, ...
  for (int64_t i = 0; i < h; ++i) {
    const float* wr[kW];
    for (int r = 0; r < kW; ++r) wr[r] = w + (n0 + r * h + i) * K;
    Vec8 acc[kW * kM] = {};  // (weight row, row of x)
    for (int64_t k = 0; k < K; k += 8) {
      Vec8 wv[kW];
      for (int r = 0; r < kW; ++r) {
        __builtin_prefetch(wr[r] + k + kAhead<kM>(), 0, 2);  // into L2
        wv[r] = _mm256_loadu_ps(wr[r] + k);
      }
      for (int m = 0; m < kM; ++m) {
        const Vec8 xv = _mm256_loadu_ps(x + m * K + k);
        for (int r = 0; r < kW; ++r) acc[r * kM + m] += wv[r] * xv;
      }
    }
    Vec8 rows8[8];
    for (int j = 0; j < 8; ++j) rows8[j] = j < kW * kM ? acc[j] : Vec8{};
    float sums[8];
    _mm256_storeu_ps(sums, qkvlab::sum8(rows8));
    for (int r = 0; r < kW; ++r) {
      const int64_t n = n0 + r * h + i;
      for (int m = 0; m < kM; ++m) y[m * N + n] = sums[r * kM + m] + (b == nullptr ? 0.f : b[n]);
    }
  }
  if (n0 + kW * h < n1) columns<kM>(x, w, b, y, N, K, n0 + kW * h, n1);
}
#endif

template <int kM>
void rows(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int kStreams = streams<kM>();
  if (kStreams > 0 && n1 - n0 == kChunk && K % 16 == 0)
    chunk<kM, std::max(kStreams, 1)>(x, w, b, y, N, K, n0);
#ifdef QKVLAB_HALVES
  else if (kM >= 2 && K % 8 == 0)
    pairs<kM>(x, w, b, y, N, K, n0, n1);
#endif
  else if (kM == 1)
    column_one(x, w, b, y, K, n0, n1);
  else
    columns<kM>(x, w, b, y, N, K, n0, n1);
}

}  // namespace

// x (M, K), w (N, K), b (N) or null, y (M, N): all float32, contiguous.
extern "C" void qkvlab_small_linear(const float* x, const float* w, const float* b, float* y, int64_t M,
                                    int64_t N, int64_t K, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < (N + kChunk - 1) / kChunk; ++c) {
    const int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
    int64_t m0 = 0;
#if defined(__AVX512F__)
    // Eight rows of x at a time where there are eight: eight multiply-adds per weight vector loaded. Against four
    // at a time (the 42 weights of a six-layer d_model 384 step from memory, two threads): 8 rows 1.19x, 16 rows
    // 1.12x, 32 1.09x, 64 1.08x; with one stream 1.02-1.10x, with four 1.01-1.10x.
    for (; m0 + 8 <= M; m0 += 8) rows<8>(x + m0 * K, w, b, y + m0 * N, N, K, n0, n1);
#endif
    for (; m0 < M; m0 += 4) {
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: rows<1>(xm, w, b, ym, N, K, n0, n1); break;
        case 2: rows<2>(xm, w, b, ym, N, K, n0, n1); break;
        case 3: rows<3>(xm, w, b, ym, N, K, n0, n1); break;
        default: rows<4>(xm, w, b, ym, N, K, n0, n1); break;
      }
    }
  }
}
