// Where a grouped cache read's time goes on this CPU (benchmarks/read_parts.py builds and runs this): one thread,
// keys in the CPU's caches, each part of kv_decode.cpp's six-heads-a-key read (Q-MQA at 6 heads, 64 dims) timed
// per key in units of one 8-float multiply-add at full rate (an "FMA time": a loop of independent multiply-adds
// timed before and after each part, so a VM whose clock moves between runs still gives comparable numbers).
// The parts (AVX2 builds: the loops of QKVLAB_HALVES; other builds time the whole read only): scoring a block of
// 32 keys for six heads (`scores_blocked`, 48 multiply-adds a key), their softmax (`softmax_heads`), the values'
// weighted sum (`accumulate`, 48), turning a block of rotary keys (`rotate_block`), and the whole read
// (`attend_heads`) over `keys` keys, learned and rotary.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include KV_DECODE  // the kernel's source: its functions are this program's

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

typedef float F8 __attribute__((vector_size(32)));  // eight floats: the unit's width whatever the build
#ifdef __AVX__
#define KEEP(x) __asm__ volatile("" : "+x"(x))  // in a register, not computed away
#else  // no 8-float registers: through memory, so the unit is slower than the CPU's peak there
#define KEEP(x) __asm__ volatile("" : "+m"(x))
#endif

// Seconds per 8-float multiply-add at full rate: ten independent chains held in registers.
double fma_seconds() {
  const F8 b = F8{} + 0.999f, c = F8{} + 1e-4f;
  F8 a0 = F8{} + 0.1f, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
  const long n = 2000000;
  const auto t0 = Clock::now();
  for (long k = 0; k < n; ++k) {
    a0 = a0 * b + c; a1 = a1 * b + c; a2 = a2 * b + c; a3 = a3 * b + c; a4 = a4 * b + c;
    a5 = a5 * b + c; a6 = a6 * b + c; a7 = a7 * b + c; a8 = a8 * b + c; a9 = a9 * b + c;
    KEEP(a0); KEEP(a1); KEEP(a2); KEEP(a3); KEEP(a4); KEEP(a5); KEEP(a6); KEEP(a7); KEEP(a8); KEEP(a9);
  }
  volatile float sink = a0[0] + a9[0];
  (void)sink;
  return seconds_since(t0) / (n * 10.0);
}

// The median over `rounds` of (seconds per call of fn / calls' keys) in FMA times.
template <class Fn>
double fma_times_per_key(Fn fn, int64_t keys_per_call, int rounds) {
  const int calls = static_cast<int>(std::max<int64_t>(1, 2000000 / keys_per_call / 32));
  std::vector<double> r;
  for (int i = 0; i < rounds; ++i) {
    const double before = fma_seconds();
    const auto t0 = Clock::now();
    for (int k = 0; k < calls; ++k) {
      fn();
      __asm__ volatile("" ::: "memory");
    }
    const double t = seconds_since(t0) / calls / keys_per_call;
    r.push_back(t / ((before + fma_seconds()) / 2));
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 512;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 7;
  if (T < 32 || T % 32 != 0 || rounds < 1) {
    std::fprintf(stderr, "read_parts: keys must be a multiple of 32 (>= 32) and rounds >= 1, got %lld and %d\n",
                 static_cast<long long>(T), rounds);
    return 2;
  }
  constexpr int64_t D = 64;
  constexpr int G = 6;
  // 64-byte aligned, as PyTorch allocates a cache (a std::vector's 16 bytes split 8-float loads across lines)
  std::vector<float> kv_buf(T * D + 16), q_buf(G * D + 16), rot_buf(T * D + 16);
  const auto aligned = [](std::vector<float>& b) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(b.data()) + 63) & ~uintptr_t{63});
  };
  struct View {
    float* p;
    float* data() const { return p; }
  } kv{aligned(kv_buf)}, q{aligned(q_buf)}, rot{aligned(rot_buf)};
  std::srand(0);
  for (int64_t i = 0; i < T * D; ++i) kv.p[i] = std::rand() / float(RAND_MAX) - 0.5f;
  for (int64_t i = 0; i < G * D; ++i) q.p[i] = (std::rand() / float(RAND_MAX) - 0.5f) / 8;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < D / 2; ++i) {
      const float angle = t * std::pow(10000.f, -2.f * i / D);
      rot.p[t * D + 2 * i] = std::cos(angle);
      rot.p[t * D + 2 * i + 1] = std::sin(angle);
    }
  std::printf("six query heads a key, 64 dims, one thread, keys in cache; per key, in FMA times (one 8-float "
              "multiply-add at full rate); medians of %d rounds\n", rounds);
#ifdef QKVLAB_HALVES
  {
    alignas(32) static float rotated[32][D], probs[G * 32], acc[G][D];
    Vec16 s[G][2];
    float m[G] = {}, l[G] = {}, rescale[G] = {1, 1, 1, 1, 1, 1};
    float* accs[G];
    for (int g = 0; g < G; ++g) accs[g] = acc[g];
    for (auto& p : probs) p = 1e-3f;
    std::printf("  scores_blocked (32 keys, 48 multiply-adds a key)   %6.1f\n",
                fma_times_per_key([&] { scores_blocked<D, G, 2, false>(q.data(), kv.data(), D, 32, s); }, 32, rounds));
    std::printf("  softmax_heads                                       %6.1f\n", fma_times_per_key([&] {
                  for (int g = 0; g < G; ++g)
                    for (int v = 0; v < 2; ++v) s[g][v] = load16(kv.data() + g * 32 + 16 * v);
                  softmax_heads<G, 2>(s, m, l);
                }, 32, rounds));
    std::printf("  accumulate (32 values, 48 multiply-adds a key)      %6.1f\n",
                fma_times_per_key([&] { accumulate<D / 16, G, 32>(kv.data(), D, 32, probs, rescale, accs); }, 32,
                                  rounds));
    std::printf("  rotate_block (32 keys)                              %6.1f\n",
                fma_times_per_key([&] { rotate_block<D>(kv.data(), D, rot.data(), 32, rotated); }, 32, rounds));
  }
#endif
  Stream<float> stream{kv.data(), T * D, T * D, D};
  Partial out;
  out.acc.resize(G * D);
  for (const bool rotary : {false, true}) {
    const double t = fma_times_per_key([&] {
      out.m.assign(G, -INFINITY);
      out.l.assign(G, 0.f);
      std::fill(out.acc.begin(), out.acc.end(), 0.f);
      if (rotary) attend_heads<D, G, true>(q.data(), stream, stream, rot.data(), nullptr, 0, 1, 0, T, 0, out);
      else attend_heads<D, G, false>(q.data(), stream, stream, nullptr, nullptr, 0, 1, 0, T, 0, out);
    }, T, rounds);
    std::printf("  attend_heads, %-7s (%lld keys)                   %6.1f\n", rotary ? "rotary" : "learned",
                static_cast<long long>(T), t);
  }
  return 0;
}
