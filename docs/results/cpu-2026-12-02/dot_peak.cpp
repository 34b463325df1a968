// Peak issue rate of one core for vpdpbusd (zmm / ymm) and vdpbf16ps (zmm), 24 independent accumulators.
// g++ -O2 -mavx512f -mavx512bw -mavx512vnni -mavx512bf16 -mavx512vl dot_peak.cpp -o dot_peak && ./dot_peak
// (README "What bounds batched decode on this CPU", 2026-12-02)
#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main() {
  const long iters = 200000000;
  __m512i a[24]; __m512 f[24];
  for (int i = 0; i < 24; ++i) { a[i] = _mm512_set1_epi32(i); f[i] = _mm512_set1_ps(i); }
  __m512i x = _mm512_set1_epi8(1), y = _mm512_set1_epi8(2);
  __m512bh xb = (__m512bh)_mm512_set1_epi16(0x3f80), yb = xb;
  auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < iters; n += 24) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) { a[i] = _mm512_dpbusd_epi32(a[i], x, y); asm volatile("" : "+v"(a[i])); }
  }
  auto t1 = std::chrono::steady_clock::now();
  for (long n = 0; n < iters; n += 24) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) { f[i] = _mm512_dpbf16_ps(f[i], xb, yb); asm volatile("" : "+v"(f[i])); }
  }
  auto t2 = std::chrono::steady_clock::now();
  __m256i c[24]; for (int i = 0; i < 24; ++i) c[i] = _mm256_set1_epi32(i);
  __m256i x2 = _mm256_set1_epi8(1), y2 = _mm256_set1_epi8(2);
  for (long n = 0; n < iters; n += 24) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) { c[i] = _mm256_dpbusd_epi32(c[i], x2, y2); asm volatile("" : "+v"(c[i])); }
  }
  auto t3 = std::chrono::steady_clock::now();
  double d1 = std::chrono::duration<double>(t1 - t0).count(), d2 = std::chrono::duration<double>(t2 - t1).count(), d3 = std::chrono::duration<double>(t3 - t2).count();
  int s = 0; for (int i = 0; i < 24; ++i) s += _mm512_reduce_add_epi32(a[i]) + (int)_mm512_reduce_add_ps(f[i]) + _mm256_extract_epi32(c[i], 0);
  printf("vpdpbusd zmm: %.2f G/s  vdpbf16ps zmm: %.2f G/s  vpdpbusd ymm: %.2f G/s (%d)\n", iters / d1 / 1e9, iters / d2 / 1e9, iters / d3 / 1e9, s);
}
