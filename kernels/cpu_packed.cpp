// CPU kernels over the packed `kgroup8` weights (kernels/layout.py), AVX2. Built by kernels/cpu_packed.py.
//
// Why hand-written: on x86 CPUs without AVX-512 VNNI / AMX, vLLM's CPU build has no packed-weight GEMM
// (`cpu_gemm_wna16` is AVX-512 only) and oneDNN's s8 x s8 GEMM is not exact there; torch has no int2/int4 x
// int8 GEMM at all (`torch._int_mm` needs int8 codes in memory: 1 byte per weight). These kernels read the
// 2/4/8-bit codes in place (0.25 / 0.5 / 1 byte per weight) and unpack them in registers.
//
// Ops (schema in TORCH_LIBRARY below):
//   gemma_mobile::packed_int_mm(xq int8 [M, K], packed int32 [N, Kp*bits/32], bits, k) -> int32 [M, N]
//       acc[m, n] = sum_k xq[m, k] * q[n, k], EXACT (integer arithmetic only, |acc| < 2^31 for K <= 65536).
//   gemma_mobile::packed_float_mm(x f32 [M, K], packed, bits, k) -> f32 [M, N]
//       y[m, n] = sum_k x[m, k] * q[n, k] in f32 (FMA, 8 lanes, then a lane sum): the weight-only lm_head.
//
// kgroup8: word g*8 + w of a row holds in field j (bits [j*b, (j+1)*b)) the code of k = g*GK + j*8 + w,
// offset binary (q + 2^(b-1)). Seen as bytes (little endian), byte w*4 + i of group g holds the 8/b fields
// j = i*(8/b) + p, p = 0 .. 8/b - 1 (p-th b-bit "plane" of the byte). So `(bytes >> p*b) & mask` gives 32 codes
// in one register, for k = g*GK + (i*(8/b) + p)*8 + w at byte position w*4 + i: the activations are permuted
// once per call into that order (`permute_row`), after which every load is contiguous.
//
// (The float path reads the same words as 8 int32 lanes instead, with x in natural order: see dot_float.)
// Integer path: 2/4-bit codes stay unsigned u = q + off (off = 2^(b-1)), `maddubs(u, x)` forms
// u0*x0 + u1*x1 in int16 (|.| <= 2*15*128 = 3840, no saturation; the planes of one group are summed in int16:
// <= 2 planes * 3840 (int4), 4 * 768 (int2), both < 32767), `madd(., 1)` widens to int32, and
// acc = sum(u*x) - off * sum(x). 8-bit codes are made signed (u ^ 0x80) and multiplied in int16 (`madd`).
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// 512-bit integer path for M > 1 (compiled in where the build machine has AVX-512 F / BW / VNNI; see
// kernels/cpu_packed.py): the AVX2 path spends one 256-bit maddubs (+ an int16 add) per 32 codes per activation row
// and uses each unpacked weight vector for one activation row at a time, which on CPUs with AVX-512 BF16 makes it
// slower than oneDNN's bf16 GEMM at M = 16. Here one zmm holds two consecutive kgroup8 groups of a row (64
// contiguous bytes), `vpdpbusd` adds the four u8 x s8 products of each lane to an int32 accumulator (exact, no int16
// stage), and a 4 x 4 register tile (weight rows x activation rows) reuses every unpacked weight vector and every
// activation vector 4 times. Bitwise the same int32 results.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GM_ZMM 1
#else
#define GM_ZMM 0
#endif

// AMX-INT8 path for M >= 12 (compiled in where the build machine has AMX-TILE / AMX-INT8 besides the 512-bit path;
// used at run time when the CPU and the kernel allow tiles, see amx_usable): `tdpbusd` multiplies a 16 x 64 u8 tile
// (16 weight rows, 64 unpacked codes each) by a 64 x 16 s8 tile (16 activation rows, VNNI order) into 16 x 16
// int32 sums, i.e. 16384 exact products per instruction where the 512-bit path's `vpdpbusd` does 64. The weights
// are unpacked once per 32-row strip into an L1 buffer (the same `(bytes >> p*b) & mask` planes as the zmm path)
// and reused for every activation row. Integer sums: bitwise the same int32 results as the other paths.
#if GM_ZMM && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define GM_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <atomic>
#else
#define GM_AMX 0
#endif

namespace {

constexpr int kWG = 8;      // words per group (kernels/layout.py WORDS_PER_GROUP)
constexpr int kGroupBytes = kWG * 4;  // 32 bytes = one AVX2 register per row and group

inline int codes_per_group(int bits) { return (32 / bits) * kWG; }

// x row [k] -> kernel order [kp] (zeros past k).
template <typename T>
void permute_row(const T* x, int64_t k, T* out, int64_t kp, int bits) {
  const int fpb = 8 / bits, gk = codes_per_group(bits);
  for (int64_t g = 0; g < kp / gk; ++g) {
    T* o = out + g * gk;
    const int64_t base = g * gk;
    for (int p = 0; p < fpb; ++p)
      for (int w = 0; w < kWG; ++w)
        for (int i = 0; i < 4; ++i) {
          const int64_t kk = base + (int64_t)(i * fpb + p) * kWG + w;
          o[p * 32 + w * 4 + i] = kk < k ? x[kk] : T(0);
        }
  }
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NR rows (w: first row, row stride rb bytes) . one permuted activation row xp -> NR raw sums (2/4-bit: of u*x).
template <int BITS, int NR>
inline void dot_int(const uint8_t* w, int64_t rb, const int8_t* xp, int64_t ngroups, int32_t* res) {
  constexpr int FPB = 8 / BITS;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_si256();
  if constexpr (BITS == 8) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int64_t g = 0; g < ngroups; ++g) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(xp + g * 32));
      const __m256i xlo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv));
      const __m256i xhi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1));
      for (int r = 0; r < NR; ++r) {
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + r * rb + g * kGroupBytes)), flip);
        const __m256i wlo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
        const __m256i whi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(wlo, xlo), _mm256_madd_epi16(whi, xhi)));
      }
    }
  } else {
    const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
    for (int64_t g = 0; g < ngroups; ++g) {
      __m256i v[NR], s16[NR];
      for (int r = 0; r < NR; ++r) {
        v[r] = _mm256_loadu_si256((const __m256i*)(w + r * rb + g * kGroupBytes));
        s16[r] = _mm256_setzero_si256();
      }
      const int8_t* xg = xp + g * (FPB * 32);
#pragma GCC unroll 4
      for (int p = 0; p < FPB; ++p) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xg + p * 32));
        for (int r = 0; r < NR; ++r) {
          const __m256i u = _mm256_and_si256(_mm256_srli_epi16(v[r], p * BITS), mask);
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(u, xv));
        }
      }
      for (int r = 0; r < NR; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(s16[r], ones));
    }
  }
  for (int r = 0; r < NR; ++r) res[r] = hsum_epi32(acc[r]);
}

// Float path: the kgroup8 words are used as 8 int32 lanes: lane w of group g holds, in field j, the code of
// k = g*GK + j*8 + w, so `(words >> j*b) & mask` gives 8 codes for 8 CONSECUTIVE k (x in its natural order,
// only zero-padded) -- no byte shuffles, one shift / and / sub / convert / FMA per 8 codes.
// NR rows (w: first row, row stride rb bytes) . one f32 activation row -> NR f32 sums of q*x.
template <int BITS, int NR>
inline void dot_float(const uint8_t* w, int64_t rb, const float* x, int64_t ngroups, float* res) {
  constexpr int FPW = 32 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256i off = _mm256_set1_epi32(1 << (BITS - 1));
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i v[NR];
    for (int r = 0; r < NR; ++r) v[r] = _mm256_loadu_si256((const __m256i*)(w + r * rb + g * kGroupBytes));
    const float* xg = x + g * (FPW * kWG);
#pragma GCC unroll 16
    for (int j = 0; j < FPW; ++j) {
      const __m256 xv = _mm256_loadu_ps(xg + j * kWG);
      for (int r = 0; r < NR; ++r) {
        const __m256i q = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(v[r], j * BITS), mask), off);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, acc[r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) res[r] = hsum_ps(acc[r]);
}

// One weight row . MR activation rows (M > 1: the row's codes are unpacked once per group and reused MR times).
template <int BITS, int MR>
inline void dot_int_m(const uint8_t* w, const int8_t* xp, int64_t kp, int64_t ngroups, int32_t* res) {
  constexpr int FPB = 8 / BITS;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  if constexpr (BITS == 8) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int64_t g = 0; g < ngroups; ++g) {
      const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + g * kGroupBytes)), flip);
      const __m256i wlo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
      const __m256i whi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xp + i * kp + g * 32));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_add_epi32(
            _mm256_madd_epi16(wlo, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv))),
            _mm256_madd_epi16(whi, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1)))));
      }
    }
  } else {
    const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
    for (int64_t g = 0; g < ngroups; ++g) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(w + g * kGroupBytes));
      __m256i u[FPB];
      for (int p = 0; p < FPB; ++p) u[p] = _mm256_and_si256(_mm256_srli_epi16(v, p * BITS), mask);
      for (int i = 0; i < MR; ++i) {
        const int8_t* xg = xp + i * kp + g * (FPB * 32);
        __m256i s16 = _mm256_maddubs_epi16(u[0], _mm256_loadu_si256((const __m256i*)xg));
        for (int p = 1; p < FPB; ++p)
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(u[p], _mm256_loadu_si256((const __m256i*)(xg + p * 32))));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(s16, ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i) res[i] = hsum_epi32(acc[i]);
}

template <int BITS, int MR>
inline void dot_float_m(const uint8_t* w, const float* x, int64_t kp, int64_t ngroups, float* res) {
  constexpr int FPW = 32 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256i off = _mm256_set1_epi32(1 << (BITS - 1));
  __m256 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + g * kGroupBytes));
#pragma GCC unroll 16
    for (int j = 0; j < FPW; ++j) {
      const __m256 c = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(v, j * BITS), mask), off));
      const float* xg = x + g * (FPW * kWG) + j * kWG;
      for (int i = 0; i < MR; ++i) acc[i] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xg + i * kp), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) res[i] = hsum_ps(acc[i]);
}

constexpr int kMR = 8;  // activation rows per tile when M > 1

// res[0..mr) for 1 <= mr <= kMR (the remainder of M)
template <int BITS, typename X, typename R>
inline void dot_m_dispatch(const uint8_t* w, const X* xp, int64_t kp, int64_t ng, int64_t mr, R* res) {
#define GM_CASE(MR_)                                                            \
  case MR_:                                                                     \
    if constexpr (std::is_same_v<X, float>) dot_float_m<BITS, MR_>(w, xp, kp, ng, res); \
    else dot_int_m<BITS, MR_>(w, xp, kp, ng, res);                              \
    break;
  switch (mr) { GM_CASE(1) GM_CASE(2) GM_CASE(3) GM_CASE(4) GM_CASE(5) GM_CASE(6) GM_CASE(7) default: GM_CASE(8) }
#undef GM_CASE
}

constexpr int kNR = 4;  // output rows per tile when M == 1 (shares each activation load among 4 weight rows)

void check_args(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t k, at::ScalarType xdt) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "gemma_mobile packed kernels: bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "gemma_mobile packed kernels: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == xdt, "gemma_mobile packed kernels: x must be ", xdt, ", got ", x.scalar_type());
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2, "packed must be int32 [N, Kp*bits/32]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(k > 0 && k <= 65536, "K must be in [1, 65536] (int32 accumulation bound), got ", k);
  const int64_t gk = codes_per_group((int)bits), kp = (k + gk - 1) / gk * gk;
  TORCH_CHECK(packed.size(1) == kp * bits / 32, "packed has ", packed.size(1), " words per row, expected ",
              kp * bits / 32, " for K=", k, " at ", bits, " bits");
}

std::atomic<int64_t> g_prefetch_tiles{4};  // software prefetch distance in tiles of the M == 1 / M > 1 loops (packed_prefetch)

// Software prefetch of the weight bytes [a, min(b, end)) into L1 (one hint per 64-byte line). Both integer loops read
// their thread's tiles (kNR / kZR contiguous rows each) in order and call this for the tile `pd` ahead.
inline void prefetch_bytes(const uint8_t* w, int64_t a, int64_t b, int64_t end) {
  for (int64_t o = a; o < std::min(b, end); o += 64) _mm_prefetch(reinterpret_cast<const char*>(w + o), _MM_HINT_T0);
}

// The tiled loop of both paths, storing through `store(i, r, acc)` (i: activation row, r: output column).
// X = int8_t (raw sums of u*x, see dot_int) or float; M == 1: 4 weight rows share each activation load; M > 1:
// one weight row is unpacked once per group for up to kMR activation rows.
template <int BITS, typename X, typename Store>
void tiled_mm(const X* xp, int64_t m, int64_t kp, const uint8_t* w, int64_t n, const Store& store) {
  using R = std::conditional_t<std::is_same_v<X, float>, float, int32_t>;
  const int64_t rb = kp * BITS / 8, ng = kp / codes_per_group(BITS);
  if (m > 1) {
    // Blocks of mb activation rows (<= ~96 KB, so a block stays in L2 while every weight row of the thread's
    // range passes over it; without blocking, a prefill's whole X streamed from L3/DRAM once per weight row).
    const int64_t mb = std::max<int64_t>(kMR, (int64_t)(96 * 1024) / (kp * (int64_t)sizeof(X)) / kMR * kMR);
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      R res[kMR];
      for (int64_t b0 = 0; b0 < m; b0 += mb) {
        const int64_t b1 = std::min(m, b0 + mb);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t i0 = b0; i0 < b1; i0 += kMR) {
            const int64_t mr = std::min<int64_t>(kMR, b1 - i0);
            dot_m_dispatch<BITS>(w + r * rb, xp + i0 * kp, kp, ng, mr, res);
            for (int64_t i = 0; i < mr; ++i) store(i0 + i, r, res[i]);
          }
      }
    });
    return;
  }
  const int64_t tiles = (n + kNR - 1) / kNR;
  // M == 1 streams the weights once (memory-bound): prefetch `pd` tiles ahead of the one being read (each tile's
  // kNR rows are contiguous), so that a thread's short range -- a 270M layer is 0.3-1.3 MB split over the cores --
  // does not wait for the hardware prefetcher to ramp up at every call. pd = 0: off (g_prefetch_tiles).
  const int64_t pd = g_prefetch_tiles.load(std::memory_order_relaxed);
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    R res[kNR];
    const int64_t tb = kNR * rb, end = std::min<int64_t>(t1 * kNR, n) * rb;  // bytes per tile, end of this range
    if (pd > 0) prefetch_bytes(w, t0 * tb, (t0 + pd) * tb, end);
    for (int64_t t = t0; t < t1; ++t) {
      if (pd > 0) prefetch_bytes(w, (t + pd) * tb, (t + pd + 1) * tb, end);
      const int64_t n0 = t * kNR, nr = std::min<int64_t>(kNR, n - n0);
      if constexpr (std::is_same_v<X, float>) {
        if (nr == kNR) dot_float<BITS, kNR>(w + n0 * rb, rb, xp, ng, res);
        else for (int64_t r = 0; r < nr; ++r) dot_float<BITS, 1>(w + (n0 + r) * rb, rb, xp, ng, res + r);
      } else {
        if (nr == kNR) dot_int<BITS, kNR>(w + n0 * rb, rb, xp, ng, res);
        else for (int64_t r = 0; r < nr; ++r) dot_int<BITS, 1>(w + (n0 + r) * rb, rb, xp, ng, res + r);
      }
      for (int64_t r = 0; r < nr; ++r) store(0, n0 + r, res[r]);
    }
  });
}

#if GM_ZMM
constexpr int kZR = 4;  // weight rows x activation rows of the 512-bit register tile (16 accumulators of 32)

// Kernel-order activations [m, kp] -> pair order: per group pair h and plane p, 64 bytes = plane p of group 2h,
// then plane p of group 2h + 1 (zeros past the last group), so one zmm load matches one weight zmm.
void pair_order(const int8_t* xp, int64_t m, int64_t kp, int fpb, int64_t ng, std::vector<int8_t>& out,
                int64_t& rowb) {
  rowb = (ng + 1) / 2 * fpb * 64;
  out.assign(m * rowb, 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < ng; ++g)
      for (int p = 0; p < fpb; ++p)
        std::memcpy(out.data() + i * rowb + ((g / 2) * fpb + p) * 64 + (g % 2) * 32, xp + i * kp + (g * fpb + p) * 32, 32);
}

// 16 int32 vectors -> one: lane L = the sum of a[L]'s 16 lanes (a transpose-and-add tree: 45 instructions where
// 16 _mm512_reduce_add_epi32 take ~9 each; integer sums, so any order gives the same result).
inline __m512i reduce16(const __m512i* a) {
  __m512i p[8], q[4];
  for (int j = 0; j < 8; ++j)  // per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] of a = a[2j], b = a[2j+1]
    p[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_epi32(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 4; ++j)  // per chunk: the chunk's partial sums of a[4j .. 4j+3]
    q[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * j], p[2 * j + 1]), _mm512_unpackhi_epi64(p[2 * j], p[2 * j + 1]));
  auto fold = [](__m512i x, __m512i y) {  // chunks [x0+x1, x2+x3, y0+y1, y2+y3]
    return _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return fold(fold(q[0], q[1]), fold(q[2], q[3]));  // chunk j = the totals of a[4j .. 4j+3]
}

// NR weight rows (w, row stride rb bytes) x MR activation rows (x2: pair order, row stride rowb) -> res[i * NR + r]
// = sum(u * x) with u the unsigned stored codes (2/4-bit: q + 2^(b-1); 8-bit: the offset-binary byte q + 128).
template <int BITS, int NR, int MR>
inline void dot_zmm(const uint8_t* w, int64_t rb, const int8_t* x2, int64_t rowb, int64_t ng, int32_t* res) {
  constexpr int FPB = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
  __m512i acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[r][i] = _mm512_setzero_si512();
  auto step = [&](const __m512i* wv, int64_t h) {
#pragma GCC unroll 4
    for (int p = 0; p < FPB; ++p) {
      __m512i u[NR];
      for (int r = 0; r < NR; ++r)
        u[r] = BITS == 8 ? wv[r] : _mm512_and_si512(_mm512_srli_epi16(wv[r], p * BITS), mask);
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_loadu_si512(x2 + i * rowb + (h * FPB + p) * 64);
        for (int r = 0; r < NR; ++r) acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], u[r], xv);
      }
    }
  };
  const int64_t full = ng / 2;
  __m512i wv[NR];
  for (int64_t h = 0; h < full; ++h) {
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * rb + h * 64);
    step(wv, h);
  }
  if (ng & 1) {  // the last, unpaired group: a 256-bit load (the row ends there); x's upper half is zeros
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(w + r * rb + full * 64)));
    step(wv, full);
  }
  if constexpr (NR == kZR && MR == kZR) {
    __m512i a[16];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i) a[i * 4 + r] = acc[r][i];
    _mm512_storeu_si512(res, reduce16(a));
  } else {
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MR; ++i) res[i * NR + r] = _mm512_reduce_add_epi32(acc[r][i]);
  }
}

template <int BITS>
inline void dot_zmm_dispatch(int64_t nr, int64_t mr, const uint8_t* w, int64_t rb, const int8_t* x2, int64_t rowb,
                             int64_t ng, int32_t* res) {
  auto go = [&](auto NR_, auto MR_) { dot_zmm<BITS, decltype(NR_)::value, decltype(MR_)::value>(w, rb, x2, rowb, ng, res); };
  auto with_mr = [&](auto NR_) {
    switch (mr) {
      case 1: go(NR_, std::integral_constant<int, 1>{}); break;
      case 2: go(NR_, std::integral_constant<int, 2>{}); break;
      case 3: go(NR_, std::integral_constant<int, 3>{}); break;
      default: go(NR_, std::integral_constant<int, 4>{}); break;
    }
  };
  switch (nr) {
    case 1: with_mr(std::integral_constant<int, 1>{}); break;
    case 2: with_mr(std::integral_constant<int, 2>{}); break;
    case 3: with_mr(std::integral_constant<int, 3>{}); break;
    default: with_mr(std::integral_constant<int, 4>{}); break;
  }
}

// M > 1: store(i, r, sum(u * x)) with u as in dot_zmm (8-bit: already corrected by -128 * sum(x), so that the
// caller's offset handling is the AVX2 path's). Activations blocked like tiled_mm (a block stays in L2).
template <int BITS, typename Store, typename Tile>
void int_mm_zmm(const int8_t* xp, int64_t m, int64_t kp, const int32_t* xsum, const uint8_t* w, int64_t n,
                const Store& store, const Tile& tile) {
  constexpr int FPB = 8 / BITS;
  const int64_t rb = kp * BITS / 8, ng = kp / codes_per_group(BITS);
  std::vector<int8_t> x2;
  int64_t rowb = 0;
  pair_order(xp, m, kp, FPB, ng, x2, rowb);
  const int64_t mb = std::max<int64_t>(kZR, (int64_t)(96 * 1024) / rowb / kZR * kZR);
  const int64_t tiles = (n + kZR - 1) / kZR;
  const int64_t pd = g_prefetch_tiles.load(std::memory_order_relaxed);  // as tiled_mm's M == 1 loop
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    alignas(64) int32_t res[kZR * kZR];
    constexpr int32_t kOff = BITS == 8 ? 128 : (1 << (BITS - 1));  // sum(q * x) = sum(u * x) - kOff * sum(x)
    const int64_t tb = kZR * rb, end = std::min<int64_t>(t1 * kZR, n) * rb;
    for (int64_t b0 = 0; b0 < m; b0 += mb) {
      const int64_t b1 = std::min(m, b0 + mb);
      if (pd > 0) prefetch_bytes(w, t0 * tb, (t0 + pd) * tb, end);
      for (int64_t t = t0; t < t1; ++t) {
        if (pd > 0) prefetch_bytes(w, (t + pd) * tb, (t + pd + 1) * tb, end);
        const int64_t n0 = t * kZR, nr = std::min<int64_t>(kZR, n - n0);
        for (int64_t i0 = b0; i0 < b1; i0 += kZR) {
          const int64_t mr = std::min<int64_t>(kZR, b1 - i0);
          dot_zmm_dispatch<BITS>(nr, mr, w + n0 * rb, rb, x2.data() + i0 * rowb, rowb, ng, res);
          if (nr == kZR && mr == kZR) {
            const __m512i xs = _mm512_permutexvar_epi32(  // lane i*4 + r: xsum[i0 + i]
                _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(xsum + i0))));
            tile(i0, n0, _mm512_sub_epi32(_mm512_load_si512(res), _mm512_mullo_epi32(xs, _mm512_set1_epi32(kOff))));
            continue;
          }
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t r = 0; r < nr; ++r) store(i0 + i, n0 + r, res[i * nr + r] - kOff * xsum[i0 + i]);
        }
      }
    }
  });
}
#endif

#if GM_AMX
// The CPU has AMX-TILE + AMX-INT8 (CPUID.(7,0):EDX bits 24, 25) and Linux grants this process the tile data state
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), process-wide; fails on kernels < 5.16 or without XSAVE
// support, then the 512-bit path runs). Asked once, from the calling thread, before any worker uses a tile.
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
}
std::atomic<bool> g_amx_on{true};  // packed_amx(0 / 1): the switch tests and benchmarks use to compare paths

struct alignas(64) TileConfig {  // ldtilecfg's 64-byte operand, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Below 12 activation rows the 512-bit tile is as fast or faster (one tdpbusd costs the same for 1..16 rows, while
// vpdpbusd work scales with M; measured on a Xeon with AMX, 1 thread: M = 8 zmm wins or ties, M = 12 AMX wins on
// the lm_head 262144 x 640, 15.4 vs 17.6 ms, and ties elsewhere, M = 16: AMX 1.2-1.5x).
constexpr int64_t kAmxMinRows = 12;
constexpr int kAmxSteps = 16;  // 64-code steps per K chunk: 2 x 16 unpacked tiles of 1 KB = 32 KB, fits L1

// Activations in pair order (x2, see pair_order; step s = h * FPB + p is the 64-byte chunk s of a row) -> the B tiles
// of tdpbusd: per block of 16 activation rows and step s, 1 KB, row kk (4 codes), bytes j * 4 + c =
// x2[(blk * 16 + j) * rowb + s * 64 + kk * 4 + c] (zeros for rows past m).
void amx_b_tiles(const int8_t* x2, int64_t m, int64_t rowb, int64_t steps, std::vector<int8_t>& xb) {
  xb.assign((m + 15) / 16 * steps * 1024, 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t s = 0; s < steps; ++s)
      for (int kk = 0; kk < 16; ++kk)
        std::memcpy(xb.data() + (((i / 16) * steps + s) * 16 + kk) * 64 + (i % 16) * 4, x2 + i * rowb + s * 64 + kk * 4, 4);
}

// Steps [s0, s0 + ns) of weight rows n0 .. n0 + 31 -> a[half][s - s0] = the A tile (16 rows x 64 u8 codes, the
// stored unsigned codes u as in dot_zmm; rows past n and the upper half of an unpaired last group are zeros).
template <int BITS>
inline void amx_unpack(const uint8_t* w, int64_t rb, int64_t n, int64_t n0, int64_t ng, int64_t s0, int64_t ns,
                       uint8_t (*a)[kAmxSteps][16][64]) {
  constexpr int FPB = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
  for (int r = 0; r < 32; ++r) {
    uint8_t(*dst)[16][64] = a[r / 16];
    const int rr = r % 16;
    if (n0 + r >= n) {
      for (int64_t s = 0; s < ns; ++s) std::memset(dst[s][rr], 0, 64);
      continue;
    }
    const uint8_t* row = w + (n0 + r) * rb;
    for (int64_t s = s0; s < s0 + ns; s += FPB) {
      const int64_t h = s / FPB;
      const __m512i v = 2 * h + 1 < ng ? _mm512_loadu_si512(row + h * 64)
                                       : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)(row + h * 64)));
      for (int p = 0; p < FPB; ++p)
        _mm512_store_si512(dst[s - s0 + p][rr], BITS == 8 ? v : _mm512_and_si512(_mm512_srli_epi16(v, p * BITS), mask));
    }
  }
}

// M >= kAmxMinRows on AMX: store / tile exactly as int_mm_zmm (sum(q * x), lane i*4 + r of a tile = row i0 + i, column n0 + r).
// Per task 32 weight rows (two A tiles) x pairs of 16-row activation blocks (two B tiles): four 16 x 16 int32
// accumulators in tiles 0-3; K in chunks of kAmxSteps steps (accumulators parked in memory between chunks).
template <int BITS, typename Store, typename Tile>
void int_mm_amx(const int8_t* xp, int64_t m, int64_t kp, const int32_t* xsum, const uint8_t* w, int64_t n,
                const Store& store, const Tile& tile) {
  constexpr int FPB = 8 / BITS;
  static_assert(kAmxSteps % FPB == 0, "a chunk holds whole groups");
  constexpr int32_t kOff = BITS == 8 ? 128 : (1 << (BITS - 1));  // sum(q * x) = sum(u * x) - kOff * sum(x)
  const int64_t rb = kp * BITS / 8, ng = kp / codes_per_group(BITS), steps = (ng + 1) / 2 * FPB;
  std::vector<int8_t> x2, xb;
  int64_t rowb = 0;
  pair_order(xp, m, kp, FPB, ng, x2, rowb);
  amx_b_tiles(x2.data(), m, rowb, steps, xb);
  const int64_t mblk = (m + 15) / 16, pairs = (mblk + 1) / 2, chunks = (steps + kAmxSteps - 1) / kAmxSteps;
  at::parallel_for(0, (n + 31) / 32, 1, [&](int64_t t0, int64_t t1) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    alignas(64) static thread_local uint8_t a[2][kAmxSteps][16][64];
    alignas(64) int32_t c[4][16][16];
    std::vector<int32_t> park(chunks > 1 ? pairs * 4 * 256 : 0);
    const __m512i gidx = _mm512_set_epi32(3 * 16 + 3, 2 * 16 + 3, 16 + 3, 3, 3 * 16 + 2, 2 * 16 + 2, 16 + 2, 2,
                                          3 * 16 + 1, 2 * 16 + 1, 16 + 1, 1, 3 * 16, 2 * 16, 16, 0);  // lane i*4+r: c[r][i]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * 32;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const int64_t s0 = ch * kAmxSteps, ns = std::min<int64_t>(kAmxSteps, steps - s0);
        amx_unpack<BITS>(w, rb, n, n0, ng, s0, ns, a);
        for (int64_t pr = 0; pr < pairs; ++pr) {
          const bool two = 2 * pr + 1 < mblk;
          int32_t* pk = park.data() + pr * 4 * 256;
          if (ch == 0) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          } else {
            _tile_loadd(0, pk, 64); _tile_loadd(1, pk + 256, 64); _tile_loadd(2, pk + 512, 64); _tile_loadd(3, pk + 768, 64);
          }
          const int8_t* b0 = xb.data() + ((2 * pr) * steps + s0) * 1024;
          const int8_t* b1 = b0 + steps * 1024;
          for (int64_t s = 0; s < ns; ++s) {
            _tile_loadd(4, a[0][s], 64);
            _tile_loadd(5, a[1][s], 64);
            _tile_loadd(6, b0 + s * 1024, 64);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(2, 5, 6);
            if (two) {
              _tile_loadd(7, b1 + s * 1024, 64);
              _tile_dpbusd(1, 4, 7);
              _tile_dpbusd(3, 5, 7);
            }
          }
          if (ch + 1 < chunks) {
            _tile_stored(0, pk, 64); _tile_stored(1, pk + 256, 64); _tile_stored(2, pk + 512, 64); _tile_stored(3, pk + 768, 64);
            continue;
          }
          _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
          // c[half * 2 + bsel][r][j]: weight row n0 + half * 16 + r, activation row (2 * pr + bsel) * 16 + j
          for (int half = 0; half < 2; ++half)
            for (int bsel = 0; bsel < (two ? 2 : 1); ++bsel) {
              const int64_t nb = n0 + half * 16, ib = (2 * pr + bsel) * 16;
              const int64_t rv = std::min<int64_t>(16, n - nb), jv = std::min<int64_t>(16, m - ib);
              const int32_t* cc = &c[half * 2 + bsel][0][0];
              for (int64_t j0 = 0; j0 < jv; j0 += 4)
                for (int64_t r0 = 0; r0 < rv; r0 += 4) {
                  if (j0 + 4 <= jv && r0 + 4 <= rv) {
                    const __m512i xs = _mm512_permutexvar_epi32(
                        _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                        _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(xsum + ib + j0))));
                    const __m512i v = _mm512_i32gather_epi32(gidx, cc + r0 * 16 + j0, 4);
                    tile(ib + j0, nb + r0, _mm512_sub_epi32(v, _mm512_mullo_epi32(xs, _mm512_set1_epi32(kOff))));
                    continue;
                  }
                  for (int64_t j = j0; j < std::min<int64_t>(j0 + 4, jv); ++j)
                    for (int64_t r = r0; r < std::min<int64_t>(r0 + 4, rv); ++r)
                      store(ib + j, nb + r, cc[r * 16 + j] - kOff * xsum[ib + j]);
                }
            }
        }
      }
    }
    _tile_release();
  });
}
#endif

// Integer path: exact sum_k x_q * q = sum(u * x) - off * sum(x) (2/4-bit codes are stored as u = q + off).
template <int BITS, typename Store, typename Tile>
void int_mm_impl(const int8_t* xp, int64_t m, int64_t kp, const int32_t* xsum, const uint8_t* w, int64_t n,
                 const Store& store, const Tile& tile) {
  const int32_t off = BITS == 8 ? 0 : (1 << (BITS - 1));
  auto st = [&](int64_t i, int64_t r, int32_t v) { store(i, r, v - off * xsum[i]); };
#if GM_AMX
  if (m >= kAmxMinRows && g_amx_on.load(std::memory_order_relaxed) && amx_usable())
    return int_mm_amx<BITS>(xp, m, kp, xsum, w, n, store, tile);
#endif
#if GM_ZMM
  if (m > 1) return int_mm_zmm<BITS>(xp, m, kp, xsum, w, n, store, tile);
#endif
  (void)tile;
  tiled_mm<BITS>(xp, m, kp, w, n, st);
}

// `tile(i0, n0, v)` (512-bit builds, M > 1): a full 4 x 4 tile of exact sums, lane i*4 + r = row i0 + i, column
// n0 + r (`scalar_tile` by default: through `store`).
template <int BITS, typename Store>
void int_mm_impl(const int8_t* xp, int64_t m, int64_t kp, const int32_t* xsum, const uint8_t* w, int64_t n,
                 const Store& store) {
#if GM_ZMM
  auto tile = [&](int64_t i0, int64_t n0, __m512i v) {
    alignas(64) int32_t t[16];
    _mm512_store_si512(t, v);
    for (int i = 0; i < 4; ++i)
      for (int r = 0; r < 4; ++r) store(i0 + i, n0 + r, t[i * 4 + r]);
  };
  int_mm_impl<BITS>(xp, m, kp, xsum, w, n, store, tile);
#else
  int_mm_impl<BITS>(xp, m, kp, xsum, w, n, store, 0);
#endif
}

template <int BITS, typename Store>
void float_mm_impl(const float* xp, int64_t m, int64_t kp, const uint8_t* w, int64_t n, const Store& store) {
  tiled_mm<BITS>(xp, m, kp, w, n, store);
}

int64_t padded(int64_t k, int64_t bits) {
  const int64_t gk = codes_per_group((int)bits);
  return (k + gk - 1) / gk * gk;
}

// int8 activations [m, k] -> kernel order + row sums
void prepare_int(const int8_t* x, int64_t m, int64_t k, int64_t kp, int bits, std::vector<int8_t>& xp,
                 std::vector<int32_t>& xsum) {
  xp.assign(m * kp, 0);
  xsum.assign(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    permute_row<int8_t>(x + i * k, k, xp.data() + i * kp, kp, bits);
    int32_t s = 0;
    for (int64_t j = 0; j < k; ++j) s += x[i * k + j];
    xsum[i] = s;
  }
}

template <typename F>
void dispatch_bits(int64_t bits, const F& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

at::Tensor packed_int_mm(const at::Tensor& xq_in, const at::Tensor& packed_in, int64_t bits, int64_t k) {
  check_args(xq_in, packed_in, bits, k, at::kChar);
  const at::Tensor xq = xq_in.contiguous(), packed = packed_in.contiguous();
  const int64_t m = xq.size(0), n = packed.size(0), kp = padded(k, bits);
  at::Tensor out = at::empty({m, n}, xq.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  std::vector<int8_t> xp;
  std::vector<int32_t> xsum;
  prepare_int(xq.data_ptr<int8_t>(), m, k, kp, (int)bits, xp, xsum);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  int32_t* o = out.data_ptr<int32_t>();
  dispatch_bits(bits, [&](auto B) {
    int_mm_impl<B.value>(xp.data(), m, kp, xsum.data(), w, n, [&](int64_t i, int64_t r, int32_t v) { o[i * n + r] = v; });
  });
  return out;
}

at::Tensor packed_float_mm(const at::Tensor& x_in, const at::Tensor& packed_in, int64_t bits, int64_t k) {
  check_args(x_in, packed_in, bits, k, at::kFloat);
  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous();
  const int64_t m = x.size(0), n = packed.size(0), kp = padded(k, bits);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  std::vector<float> xp(m * kp, 0.0f);  // natural order, zero-padded to kp (see dot_float)
  for (int64_t i = 0; i < m; ++i) std::copy(x.data_ptr<float>() + i * k, x.data_ptr<float>() + (i + 1) * k, xp.data() + i * kp);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  float* o = out.data_ptr<float>();
  dispatch_bits(bits, [&](auto B) {
    float_mm_impl<B.value>(xp.data(), m, kp, w, n, [&](int64_t i, int64_t r, float v) { o[i * n + r] = v; });
  });
  return out;
}

// The whole wNa8o8 linear in one call, bitwise kernels.reference.linear (this file is compiled with
// -ffp-contract=off so that no multiply-add below is fused into an FMA):
//   input_scale given ([1] f32): x_q = clamp(round_half_even(f32(x) / input_scale), -128, 127)  (IEEE f32 division)
//                     y = f32(x_q @ q^T) * col_scale[n]          (col_scale = f32(input_scale * weight_scale))
//   no input_scale:   y = f32(dtype_x(f32(x) @ q^T in f32)) * col_scale[n]  (weight-only; col_scale =
//                     weight_scale; the product rounded to x's dtype first, as the reference's GEMM in x's dtype)
//   (+ bias[n]); with output_scale ([1] or [N]): t = clamp(round_half_even(y / s_y), -128, 127), y = t * s_y
//   (out_dtype int8: t itself); cast to out_dtype (round to nearest even).
template <typename T>
inline T cast_out(float v) { return static_cast<T>(v); }

#if GM_ZMM
// `epi` of packed_linear on a full 4 x 4 tile (v: exact sums, lane i*4 + r = out[i0 + i, n0 + r]), lane for lane the
// same IEEE operations in the same order (no FMA: -ffp-contract=off), so bitwise the scalar epilogue's results;
// bf16 / f16 outputs rounded to nearest even like c10's casts (finite values).
template <typename T>
inline void epi_tile(T* o, int64_t n, int64_t i0, int64_t n0, __m512i v, const float* cs, const float* bias,
                     const float* os, int64_t os_stride) {
  auto cols = [&](const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p + n0)); };  // lane -> p[n0 + r]
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), cols(cs));
  if (bias) y = _mm512_add_ps(y, cols(bias));
  __m512 t = y;
  if (os) {
    const __m512 s = os_stride ? cols(os) : _mm512_set1_ps(os[0]);
    t = _mm512_roundscale_ps(_mm512_div_ps(y, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-128.0f));
    y = _mm512_mul_ps(t, s);
  }
  if constexpr (std::is_same_v<T, int8_t>) {
    alignas(16) int8_t b[16];
    _mm_store_si128((__m128i*)b, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
    for (int i = 0; i < 4; ++i) std::memcpy(o + (i0 + i) * n + n0, b + 4 * i, 4);
  } else if constexpr (std::is_same_v<T, float>) {
    alignas(64) float b[16];
    _mm512_store_ps(b, y);
    for (int i = 0; i < 4; ++i) std::memcpy(o + (i0 + i) * n + n0, b + 4 * i, 16);
  } else {
    __m256i h;
    if constexpr (std::is_same_v<T, at::Half>) {
      h = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // bf16: round half to even on the f32 bits
      const __m512i bits = _mm512_castps_si512(y);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
          _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16));
    }
    alignas(32) uint16_t b[16];
    _mm256_store_si256((__m256i*)b, h);
    for (int i = 0; i < 4; ++i) std::memcpy(o + (i0 + i) * n + n0, b + 4 * i, 8);
  }
}
#endif

// The static int8 input quantization of kernels.reference.linear, read straight from x's dtype (bf16 / f16 -> f32 is
// exact, so no f32 copy of x is needed): xq = clamp(round_half_even(f32(x) / sx), -128, 127), the same IEEE f32
// division per element, 16 lanes at a time where built for AVX-512.
#if GM_ZMM
inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_f32(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16_f32(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif

template <typename X>
void quantize_input(const X* xs, int64_t len, float sx, int8_t* xq) {
  int64_t j0 = 0;
#if GM_ZMM
  for (const __m512 vs = _mm512_set1_ps(sx); j0 + 16 <= len; j0 += 16) {
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(load16_f32(xs + j0), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-128.0f));
    _mm_storeu_si128((__m128i*)(xq + j0), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
  }
#endif
  for (int64_t j = j0; j < len; ++j) {
    float t = std::nearbyint(static_cast<float>(xs[j]) / sx);
    xq[j] = static_cast<int8_t>(t < -128.0f ? -128.0f : (t > 127.0f ? 127.0f : t));
  }
}

at::Tensor packed_linear(const at::Tensor& x_in, const at::Tensor& packed_in, int64_t bits, int64_t k,
                         const at::Tensor& col_scale_in, const c10::optional<at::Tensor>& input_scale_in,
                         const c10::optional<at::Tensor>& bias_in,
                         const c10::optional<at::Tensor>& out_scale_in, at::ScalarType out_dtype) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "x must be [M, ", k, "], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kHalf,
              "x must be float32 / bfloat16 / float16, got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous();
  check_args(x, packed, bits, k, x.scalar_type());
  const int64_t m = x.size(0), n = packed.size(0), kp = padded(k, bits);
  const at::Tensor cs = col_scale_in.to(at::kFloat).contiguous();
  TORCH_CHECK(cs.numel() == n, "col_scale must have N=", n, " elements");
  at::Tensor bias, osc;
  if (bias_in.has_value()) { bias = bias_in->to(at::kFloat).contiguous(); TORCH_CHECK(bias.numel() == n, "bias must have N elements"); }
  if (out_scale_in.has_value()) {
    osc = out_scale_in->to(at::kFloat).contiguous();
    TORCH_CHECK(osc.numel() == 1 || osc.numel() == n, "output_scale must have 1 or N elements");
  }
  TORCH_CHECK(out_dtype != at::kChar || osc.defined(), "int8 output needs an output_scale");
  at::Tensor out = at::empty({m, n}, x.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  const float* csp = cs.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* sp = osc.defined() ? osc.data_ptr<float>() : nullptr;
  const int64_t sstride = osc.defined() && osc.numel() == n ? 1 : 0;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  auto run = [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    auto epi = [&](int64_t i, int64_t r, float y) {
      y = y * csp[r];
      if (bp) y = y + bp[r];
      if (sp) {
        const float s = sp[r * sstride];
        float t = std::nearbyint(y / s);
        t = t < -128.0f ? -128.0f : (t > 127.0f ? 127.0f : t);
        if constexpr (std::is_same_v<T, int8_t>) { o[i * n + r] = static_cast<int8_t>(t); return; }
        else y = t * s;
      }
      if constexpr (!std::is_same_v<T, int8_t>) o[i * n + r] = cast_out<T>(y);
    };
    if (input_scale_in.has_value()) {
      TORCH_CHECK(input_scale_in->numel() == 1, "input_scale must have 1 element");
      const float sx = input_scale_in->to(at::kFloat).item<float>();
      std::vector<int8_t> xq(m * k);
      switch (x.scalar_type()) {
        case at::kBFloat16: quantize_input(x.data_ptr<at::BFloat16>(), m * k, sx, xq.data()); break;
        case at::kHalf: quantize_input(x.data_ptr<at::Half>(), m * k, sx, xq.data()); break;
        default: quantize_input(x.data_ptr<float>(), m * k, sx, xq.data());
      }
      std::vector<int8_t> xp;
      std::vector<int32_t> xsum;
      prepare_int(xq.data(), m, k, kp, (int)bits, xp, xsum);
      auto store = [&](int64_t i, int64_t r, int32_t v) { epi(i, r, static_cast<float>(v)); };
      dispatch_bits(bits, [&](auto B) {
#if GM_ZMM
        int_mm_impl<B.value>(xp.data(), m, kp, xsum.data(), w, n, store,
                             [&](int64_t i0, int64_t n0, __m512i v) { epi_tile<T>(o, n, i0, n0, v, csp, bp, sp, sstride); });
#else
        int_mm_impl<B.value>(xp.data(), m, kp, xsum.data(), w, n, store);
#endif
      });
    } else {
      const at::Tensor xf = x.to(at::kFloat);
      std::vector<float> xp(m * kp, 0.0f);
      for (int64_t i = 0; i < m; ++i) std::copy(xf.data_ptr<float>() + i * k, xf.data_ptr<float>() + (i + 1) * k, xp.data() + i * kp);
      // the reference's weight-only product is a GEMM in x's dtype: its output is rounded to that dtype
      // before the f32 epilogue (kernels.reference.linear); do the same so served == reference up to the f32
      // summation order
      const at::ScalarType xdt = x_in.scalar_type();
      dispatch_bits(bits, [&](auto B) {
        float_mm_impl<B.value>(xp.data(), m, kp, w, n, [&](int64_t i, int64_t r, float v) {
          if (xdt == at::kBFloat16) v = static_cast<float>(static_cast<at::BFloat16>(v));
          else if (xdt == at::kHalf) v = static_cast<float>(static_cast<at::Half>(v));
          epi(i, r, v);
        });
      });
    }
  };
  switch (out_dtype) {
    case at::kFloat: run(out.data_ptr<float>()); break;
    case at::kBFloat16: run(out.data_ptr<at::BFloat16>()); break;
    case at::kHalf: run(out.data_ptr<at::Half>()); break;
    case at::kChar: run(out.data_ptr<int8_t>()); break;
    default: TORCH_CHECK(false, "out_dtype must be float32 / bfloat16 / float16 / int8, got ", out_dtype);
  }
  return out;
}

// The software prefetch distance in 4-row tiles (tiled_mm's M == 1 loop, int_mm_zmm; 0: off): tiles >= 0 sets it,
// -1 only asks.
int64_t packed_prefetch(int64_t tiles) {
  if (tiles >= 0) g_prefetch_tiles.store(tiles);
  return g_prefetch_tiles.load();
}

// Which integer path this build runs for M > 1: 1 = the 512-bit VNNI tile (GM_ZMM), 0 = AVX2.
int64_t packed_zmm() { return GM_ZMM; }

// The AMX path for M >= 12: want = 1 / 0 switches it on / off, -1 only asks; returns whether it runs now (1) or not
// (0: off, or not compiled in, or the CPU / kernel refuse tiles).
int64_t packed_amx(int64_t want) {
#if GM_AMX
  if (want >= 0) g_amx_on.store(want != 0);
  return g_amx_on.load() && amx_usable() ? 1 : 0;
#else
  (void)want;
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(gemma_mobile, m) {
  m.def("packed_zmm() -> int", &packed_zmm);  // no tensor arguments: a catch-all kernel
  m.def("packed_amx(int want) -> int", &packed_amx);
  m.def("packed_prefetch(int tiles) -> int", &packed_prefetch);
  m.def("packed_int_mm(Tensor xq, Tensor packed, int bits, int k) -> Tensor");
  m.def("packed_float_mm(Tensor x, Tensor packed, int bits, int k) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int bits, int k, Tensor col_scale, Tensor? input_scale, Tensor? bias, "
        "Tensor? output_scale, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemma_mobile, CPU, m) {
  m.impl("packed_int_mm", &packed_int_mm);
  m.impl("packed_float_mm", &packed_float_mm);
  m.impl("packed_linear", &packed_linear);
}
