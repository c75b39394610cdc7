// Attention over the paged KV cache: writing new K/V into their slots (float32, float16 or int8), decode
// attention straight from the pages, and prefill attention on the packed-panel GEMM tile.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"
#include "panel_tile.h"
#include "simd.h"
#include "tiles.h"

// k and v of the new tokens are views into the fused qkv rows: each token's heads are contiguous, tokens strided.
static void check_new_kv(const char* name, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.dim() == 3 && v.dim() == 3,
              name, ": k and v must be float32 [tokens, kv_heads, head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), name, ": slots");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              name, ": each token's k and v heads must be contiguous");
}

// k_cache[slot] = k and v_cache[slot] = v for each new token: one call instead of two index_copy_. A
// float16 or bfloat16 cache (kv_cache_dtype) stores the rows rounded to nearest even, as torch's .to() does.
template <typename T>
static void write_rows(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
}

void write_kv_cache_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v,
                     at::Tensor slots) {
  check_new_kv("write_kv_cache_", k, v, slots);
  const auto type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
              (type == at::kFloat || type == at::kHalf || type == at::kBFloat16) && v_cache.scalar_type() == type,
              "write_kv_cache_: cache layout");
  const int64_t row = k.size(1) * k.size(2), num_slots = k_cache.numel() / row;
  const auto slots_c = slots.contiguous();
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t t = 0; t < k.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "write_kv_cache_: slot out of range");
    if (type == at::kFloat) {
      write_rows(k_cache.data_ptr<float>() + sp[t] * row, kp + t * ks, row);
      write_rows(v_cache.data_ptr<float>() + sp[t] * row, vp + t * vs, row);
    } else if (type == at::kHalf) {
      write_rows(k_cache.data_ptr<at::Half>() + sp[t] * row, kp + t * ks, row);
      write_rows(v_cache.data_ptr<at::Half>() + sp[t] * row, vp + t * vs, row);
    } else {
      write_rows(k_cache.data_ptr<at::BFloat16>() + sp[t] * row, kp + t * ks, row);
      write_rows(v_cache.data_ptr<at::BFloat16>() + sp[t] * row, vp + t * vs, row);
    }
  }
}

// q = round(x * (127 / max|x|)) for one head's D values; returns the scale max|x| / 127. quantize_kv in
// layers/attention.py does the same float32 arithmetic, so both paths store the same bytes.
static float quantize_head(const float* x, int64_t D, int8_t* q) {
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t d = 0; d < D; ++d) q[d] = int8_t(std::nearbyint(x[d] * inv));
  return amax / 127.f;
}

// The int8 cache's write: each new token's K and V quantized per KV head into its slot, with the scales
// beside it in k_scales, v_scales [blocks, block_size, kv_heads].
void write_kv_cache_int8_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k_scales, at::Tensor v_scales,
                          at::Tensor k, at::Tensor v, at::Tensor slots) {
  check_new_kv("write_kv_cache_int8_", k, v, slots);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == at::kChar &&
              v_cache.scalar_type() == at::kChar, "write_kv_cache_int8_: int8 cache layout");
  const int64_t H = k.size(1), D = k.size(2), num_slots = k_cache.numel() / (H * D);
  TORCH_CHECK(k_scales.is_contiguous() && v_scales.is_contiguous() && k_scales.scalar_type() == at::kFloat &&
              v_scales.scalar_type() == at::kFloat && k_scales.numel() == num_slots * H &&
              v_scales.numel() == num_slots * H, "write_kv_cache_int8_: float32 scales, one per slot and KV head");
  int8_t* kc = k_cache.data_ptr<int8_t>();
  int8_t* vc = v_cache.data_ptr<int8_t>();
  float* ksc = k_scales.data_ptr<float>();
  float* vsc = v_scales.data_ptr<float>();
  const auto slots_c = slots.contiguous();
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t t = 0; t < k.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "write_kv_cache_int8_: slot out of range");
    for (int64_t h = 0; h < H; ++h) {
      const int64_t j = sp[t] * H + h;
      ksc[j] = quantize_head(kp + t * ks + h * D, D, kc + j * D);
      vsc[j] = quantize_head(vp + t * vs + h * D, D, vc + j * D);
    }
  }
}

// Cached K/V rows are float32, float16 or bfloat16 (kv_cache_dtype), or int8 (kv_cache_dtype="int8") with a
// float32 scale per row. 16-bit and int8 rows are widened to float in registers: the kernel reads a half
// or a quarter of the bytes and computes in float (a bfloat16's bits are the top half of its float).
#ifdef HAVE_FVEC
static inline fvec vload_kv(const float* p) { return vloadu(p); }
static inline fvec vload_kv(const c10::Half* p) { return vload_w(p); }
static inline fvec vload_kv(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#else
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#endif
}
static inline fvec vload_kv(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}

// Lane t of the result is the sum of acc[t]'s lanes: VW dot products finished together by a tree of
// shuffles and adds instead of VW separate horizontal sums.
static inline fvec sum_lanes(const fvec* acc) {
#if defined(__AVX512F__)
  __m512 pairs[8], quads[4], octets[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lane j: acc[2i] and acc[2i + 1] alternating, two partials each
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: one partial of rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // lanes 0-1 sum to rows 8i .. 8i + 3, lanes 2-3 to rows 8i + 4 .. 8i + 7
    octets[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(octets[0], octets[1], 0x88),
                       _mm512_shuffle_f32x4(octets[0], octets[1], 0xdd));
#else
  const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // Each 128-bit half of s0123 holds rows 0-3's sums over that half's lanes (s4567: rows 4-7).
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
#endif
}

// s[g * lds + t] = q[g] . key t for GB query heads and m keys, times row_scales[t * rs] when given; D % VW
// == 0. load(t, d) gives channels [d, d + VW) of key t as floats, each key row widened once for all GB heads.
template <int GB, typename Load>
static void scores_heads_by(const float* q, int64_t D, Load&& load, int64_t m, const float* row_scales, int64_t rs,
                            float* s, int64_t lds) {
  alignas(64) float part[GB][VW][VW];
  for (int64_t t0 = 0; t0 < m; t0 += VW) {
    const int64_t keys = std::min<int64_t>(VW, m - t0);
    for (int64_t t = 0; t < keys; ++t) {
      fvec acc[GB];
      for (int g = 0; g < GB; ++g) acc[g] = vzero();
      for (int64_t d = 0; d < D; d += VW) {
        const fvec kv = load(t0 + t, d);
        for (int g = 0; g < GB; ++g) acc[g] = vfma(vloadu(q + g * D + d), kv, acc[g]);
      }
      for (int g = 0; g < GB; ++g) vstore(part[g][t], acc[g]);
    }
    for (int g = 0; g < GB; ++g) {
      fvec rows[VW];
      for (int t = 0; t < VW; ++t) rows[t] = t < keys ? vload(part[g][t]) : vzero();
      alignas(64) float sums[VW];
      vstore(sums, sum_lanes(rows));
      float* sg = s + g * lds + t0;
      for (int64_t t = 0; t < keys; ++t) sg[t] = row_scales ? sums[t] * row_scales[(t0 + t) * rs] : sums[t];
    }
  }
}

template <int GB, typename T>
static void scores_heads(const float* q, int64_t D, const T* k, int64_t ld, int64_t m, const float* row_scales,
                         int64_t rs, float* s, int64_t lds) {
  scores_heads_by<GB>(q, D, [&](int64_t t, int64_t d) { return vload_kv(k + t * ld + d); }, m, row_scales, rs, s, lds);
}

// o[g * D + d0 .. + NV * VW) += sum_t p[g * ldp + t] * value t's channels [d0, d0 + NV * VW) for GB query
// heads and m values, load(t, d) giving VW channels of value t: the outputs stay in registers over all m rows.
template <int GB, int NV, typename Load>
static void weighted_heads_by(const float* p, int64_t ldp, Load&& load, int64_t d0, int64_t m, int64_t D, float* o) {
  fvec acc[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = vloadu(o + g * D + d0 + j * VW);
  for (int64_t t = 0; t < m; ++t) {
    fvec vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = load(t, d0 + j * VW);
    for (int g = 0; g < GB; ++g) {
      const fvec pb = vbroadcast(p + g * ldp + t);
      for (int j = 0; j < NV; ++j) acc[g][j] = vfma(pb, vv[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < NV; ++j) vstoreu(o + g * D + d0 + j * VW, acc[g][j]);
}

// All D values, four registers at a time; D % VW == 0.
template <int GB, typename Load>
static void weighted_heads_by(const float* p, int64_t ldp, Load&& load, int64_t m, int64_t D, float* o) {
  int64_t d = 0;
  for (; d + 4 * VW <= D; d += 4 * VW) weighted_heads_by<GB, 4>(p, ldp, load, d, m, D, o);
  for (; d < D; d += VW) weighted_heads_by<GB, 1>(p, ldp, load, d, m, D, o);
}

template <int GB, typename T>
static void weighted_heads(const float* p, int64_t ldp, const T* v, int64_t ld, int64_t m, int64_t D, float* o) {
  weighted_heads_by<GB>(p, ldp, [&](int64_t t, int64_t d) { return vload_kv(v + t * ld + d); }, m, D, o);
}
#endif

// f(heads, g) for G query heads in groups of up to four, heads a compile-time count, g the group's first.
template <typename F>
static void in_head_groups(int64_t G, F&& f) {
  for (int64_t g = 0; g < G; g += 4) {
    switch (std::min<int64_t>(4, G - g)) {
      case 4: f(std::integral_constant<int, 4>{}, g); break;
      case 3: f(std::integral_constant<int, 3>{}, g); break;
      case 2: f(std::integral_constant<int, 2>{}, g); break;
      default: f(std::integral_constant<int, 1>{}, g);
    }
  }
}

// The two row kernels for G query heads of one KV head, in groups of up to four (or one at a time,
// scalar, where D is not a whole number of registers).
template <typename T>
static void scores_run(const float* q, int64_t G, int64_t D, const T* k, int64_t ld, int64_t m,
                       const float* row_scales, int64_t rs, float* s, int64_t lds) {
#ifdef HAVE_FVEC
  if (D % VW == 0) {
    return in_head_groups(G, [&](auto heads, int64_t g) {
      scores_heads<heads>(q + g * D, D, k, ld, m, row_scales, rs, s + g * lds, lds);
    });
  }
#endif
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < m; ++t) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += q[g * D + d] * float(k[t * ld + d]);
      s[g * lds + t] = row_scales ? dot * row_scales[t * rs] : dot;
    }
}

template <typename T>
static void weighted_run(const float* p, int64_t ldp, int64_t G, const T* v, int64_t ld, int64_t m, int64_t D,
                         float* o) {
#ifdef HAVE_FVEC
  if (D % VW == 0) {
    return in_head_groups(G, [&](auto heads, int64_t g) {
      weighted_heads<heads>(p + g * ldp, ldp, v, ld, m, D, o + g * D);
    });
  }
#endif
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < m; ++t)
      for (int64_t d = 0; d < D; ++d) o[g * D + d] += p[g * ldp + t] * float(v[t * ld + d]);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
// A bfloat16 cache's scores on AMX tiles (where bf16_products is "amx"): 16 keys x 32 channels of one KV head
// as the cache stores them (A) times the group's query heads in channel pairs (B) is 16 keys x G scores,
// with none of the lane sums the float path needs. The query is rounded to bfloat16, as vLLM's bfloat16
// attention rounds it; the sums stay float32. 32 sequences of 512 positions, 30 layers' caches in turn (Xeon
// with AMX, 2 threads, 2026-12-06, benchmarks/scripts/decode_attention.py): SmolLM2's heads 0.85-0.89 ms a
// layer against 0.95-1.02 for float16, Qwen2.5-Coder-0.5B's 0.64-0.72 against 1.00. The weighted values stay
// on the float path: VDPBF16PS on value pairs interleaved channel by channel measured no faster there.
static inline uint16_t bf16_bits(float x) { return c10::BFloat16(x).x; }

// One KV head's G query heads (scale folded in), [G, D] floats -> [D / 2, G] pairs of bfloat16: tile B.
static void query_pairs(const float* q, int64_t G, int64_t D, uint32_t* pairs) {
  for (int64_t r = 0; r < D / 2; ++r)
    for (int64_t g = 0; g < G; ++g)
      pairs[r * G + g] = bf16_bits(q[g * D + 2 * r]) | uint32_t(bf16_bits(q[g * D + 2 * r + 1])) << 16;
}

// Tile 0: 16 keys x 32 channels (A), 1: 16 channel pairs x G query heads (B), 2: 16 x G scores (C).
static void configure_score_tiles(int64_t G) {
  TileConfig config;
  config.rows[0] = config.rows[1] = config.rows[2] = 16;
  config.colsb[0] = 64;
  config.colsb[1] = config.colsb[2] = uint16_t(G * 4);
  _tile_loadconfig(&config);
}

// s[g * lds + i] = q_g . key off + i for the m keys of a page that starts off keys into its 16-key block
// (block: the block's first key of this KV head, ld values apart). The whole block is multiplied, as loaded:
// rows outside the page are never read back.
static void tile_scores(const c10::BFloat16* block, int64_t ld, int64_t off, int64_t m, const uint32_t* pairs,
                        int64_t G, int64_t D, float* s, int64_t lds) {
  alignas(64) float c[16 * 16];
  _tile_zero(2);
  for (int64_t d = 0; d < D; d += 32) {
    _tile_loadd(0, block + d, ld * 2);
    _tile_loadd(1, pairs + d / 2 * G, G * 4);
    _tile_dpbf16ps(2, 0, 1);
  }
  _tile_stored(2, c, G * 4);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < m; ++i) s[g * lds + i] = c[(off + i) * G + g];
}

// Prefill's products on AMX tiles: c[r, 16 p + j] = sum_k a[r, k] b_p[k, j] for the first `rows` (<= 16) rows of a
// (bfloat16, lda apart; 16 rows are read) and `panels` panels b_p of the pair layout ([K / 2][16][2], ldb apart),
// K a multiple of 32. Two panels at a time share each A tile: tiles 0: A, 1 and 3: B, 2 and 4: C
// (configure_pair_tiles). c's rows past `rows` are written too where scratch says they may be.
static void configure_pair_tiles() {
  TileConfig config;
  for (int t = 0; t < 5; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

static void tile_products(const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, int64_t K,
                          int64_t panels, int64_t rows, float* c, int64_t ldc, bool scratch) {
  alignas(64) float t[16 * 32];
  const bool direct = scratch || rows == 16;
  for (int64_t p = 0; p < panels; p += 2) {
    const bool two = p + 1 < panels;
    _tile_zero(2);
    _tile_zero(4);
    for (int64_t k = 0; k < K; k += 32) {
      _tile_loadd(0, a + k, lda * 2);
      _tile_loadd(1, b + p * ldb + k * NR, 64);
      _tile_dpbf16ps(2, 0, 1);
      if (two) {
        _tile_loadd(3, b + (p + 1) * ldb + k * NR, 64);
        _tile_dpbf16ps(4, 0, 3);
      }
    }
    float* out = direct ? c + p * NR : t;
    const int64_t ld = direct ? ldc : 32;
    _tile_stored(2, out, ld * 4);
    if (two) _tile_stored(4, out + 16, ld * 4);
    if (!direct)
      for (int64_t r = 0; r < rows; ++r) std::copy(t + r * 32, t + r * 32 + (two ? 32 : 16), c + r * ldc + p * NR);
  }
}
#define HAVE_TILE_SCORES 1
#endif

#if defined(__AVX512BF16__)
// A bfloat16 cache by AVX-512 BF16 dot products (where bf16_products is "dot": AMD Zen 4), for head sizes that are
// whole 32-channel vectors: K and V multiplied as stored, with no widening, two products a lane. The query is
// rounded to bfloat16 (as on AMX tiles) and so are the softmax weights (as a bfloat16 model's attention rounds
// them before they meet V; the sums stay float32): each weight moves by at most 2^-9 of itself. Widening each row
// took a shift or conversion per 16 values and a float32 FMA per value and query head; on Zen 4, where a
// 512-bit FMA takes both FMA pipes, that bound the kernel. 30 layers' caches in turn, SmolLM2's heads, 2 threads,
// EPYC Zen 4, best of four alternated runs (2026-12-07), with the chunking and scratch changes of the same
// commit: 32 sequences of 192 positions 238 us a layer against 354 before, of 1000 positions 779 against 1237
// (31 GB/s of K/V: the memory's rate); one sequence of 192 positions 7.2 us against 12.4.
//
// s[t] = q . key t for m <= 16 keys (ld values apart); each key's lanes are summed with the others' (sum_lanes).
template <bool WHOLE>
static void dot_score_keys(const c10::BFloat16* q, int64_t D, const c10::BFloat16* k, int64_t ld, int64_t keys,
                           float* s) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + d);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      if (WHOLE || t < keys) acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512(k + t * ld + d), qv);
    }
  }
  _mm512_mask_storeu_ps(s, __mmask16((1u << keys) - 1), sum_lanes(acc));
}

// s[g * lds + t] = q_g . key t for G query heads (q: [G, D] bfloat16) and m keys, ld values apart.
static void dot_scores(const c10::BFloat16* q, int64_t G, int64_t D, const c10::BFloat16* k, int64_t ld, int64_t m,
                       float* s, int64_t lds) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t0 = 0; t0 < m; t0 += 16) {
      if (m - t0 >= 16) dot_score_keys<true>(q + g * D, D, k + t0 * ld, ld, 16, s + g * lds + t0);
      else dot_score_keys<false>(q + g * D, D, k + t0 * ld, ld, m - t0, s + g * lds + t0);
    }
  }
}

// o[g * D + ...] += sum_t p[g * ldp + t] * value t for G query heads and m values (ld values apart), the weights
// rounded to bfloat16: two value rows interleaved channel by channel (16-bit unpacks) times a broadcast pair of
// weights, each product a pair. Each 32 channels of o come out in the interleave's order, [0-3, 8-11, 16-19, 24-27,
// 4-7, 12-15, 20-23, 28-31] (pair_order_ puts them back). An odd last value pairs with a zero row; p[t + 1] must then
// be finite.
template <int GB>
static void dot_weighted(const c10::BFloat16* p, int64_t ldp, const c10::BFloat16* v, int64_t ld, int64_t m, int64_t D,
                         float* o) {
  for (int64_t c = 0; c < D; c += 32) {
    __m512 lo[GB], hi[GB];
#pragma GCC unroll 4
    for (int g = 0; g < GB; ++g) lo[g] = _mm512_loadu_ps(o + g * D + c), hi[g] = _mm512_loadu_ps(o + g * D + c + 16);
    for (int64_t t = 0; t < m; t += 2) {
      const __m512i a = _mm512_loadu_si512(v + t * ld + c);
      const __m512i b = t + 1 < m ? _mm512_loadu_si512(v + (t + 1) * ld + c) : _mm512_setzero_si512();
      const __m512bh x = (__m512bh)_mm512_unpacklo_epi16(a, b), y = (__m512bh)_mm512_unpackhi_epi16(a, b);
#pragma GCC unroll 4
      for (int g = 0; g < GB; ++g) {
        int32_t pair;
        std::memcpy(&pair, p + g * ldp + t, sizeof pair);
        const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
        lo[g] = _mm512_dpbf16_ps(lo[g], x, w);
        hi[g] = _mm512_dpbf16_ps(hi[g], y, w);
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < GB; ++g) _mm512_storeu_ps(o + g * D + c, lo[g]), _mm512_storeu_ps(o + g * D + c + 16, hi[g]);
  }
}

// dot_weighted's outputs, D channels, back in channel order.
static void pair_order_(float* o, int64_t D) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t c = 0; c < D; c += 32) {
    const __m512 lo = _mm512_loadu_ps(o + c), hi = _mm512_loadu_ps(o + c + 16);
    _mm512_storeu_ps(o + c, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(o + c + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}

// x [n] -> bfloat16 (round to nearest even), then a zero.
static void round_weights(const float* x, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = c10::BFloat16(x[i]);
  out[n] = c10::BFloat16(0.f);
}

// rows x n floats (ld apart, n a multiple of 16) -> bfloat16 rounded to nearest even, ldo >= n apart with zeros
// after the n: the activations of dot_rows and of tile_products.
static void round_rows(const float* x, int64_t rows, int64_t n, int64_t ld, c10::BFloat16* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * ld + i)));
    std::fill(out + r * ldo + n, out + (r + 1) * ldo, c10::BFloat16(0.f));
  }
}
#define HAVE_DOT_ATTENTION 1
#endif

// count values from p on their way to L2 (every CPU kind: the compiler's builtin, not an intrinsic). Into L1
// (locality 3) they pushed out the page being computed: 30 layers' float16 caches among SmolLM2-sized int4
// linears, 2 threads, EPYC Zen 4 (2026-12-05), 32 sequences of 150 positions took 7.5 ms against 13.2, one
// of 2000 positions 3.0-3.4 ms against 4.5-5.0.
template <typename T>
static inline void prefetch(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < count * int64_t(sizeof(T)); i += 64) __builtin_prefetch(c + i, 0, 2);
}

// How a bfloat16 cache is multiplied: its keys scored on AMX tiles (16-key blocks, tile_scores), or K and V by dot
// products (dot_scores, dot_weighted); WIDENED, as every other cache is.
enum class Bf16Cache { WIDENED, TILES, DOT };

// One sequence's positions [begin, begin + n) against all its query heads (q: [H, D], the softmax scale
// folded in): each query head's score maximum, sum of exps and exp-weighted value rows. Positions are
// taken a page at a time, where the rows of all KV heads lie together: K is read once, in address order,
// then V, each row widened (or, by bfloat16 products, multiplied as stored) once for the G query heads that
// read it, and the next page is prefetched. 32 sequences of 60-180 positions (SmolLM2's heads, float16 cache,
// 30 layers' caches in turn, 2 threads, Xeon, 2026-12-04): 190 us a layer against 265 scoring one query head per
// row load without prefetch. pairs: scratch for the rounded query of the products; weights: for the rounded
// softmax weights of dot products.
template <typename T>
static void row_item(const float* q, const T* kp, const T* vp, const float* k_scales, const float* v_scales,
                     const int64_t* table, int64_t bs, int64_t KVH, int64_t G, int64_t D, int64_t begin, int64_t n,
                     Bf16Cache products, std::vector<float>& s, std::vector<uint32_t>& pairs,
                     std::vector<c10::BFloat16>& weights, float* m_out, float* l_out, float* o_out) {
  const int64_t H = KVH * G, row = KVH * D;
  s.resize(H * n);
  // f(first key, its slot, keys, KV head) for the item's keys on each page in turn, head by head; with a
  // cache, the next page's rows of it are prefetched, a KV head's share of their bytes before each head is
  // computed. One burst of a whole page (96 lines for SmolLM2's heads) stalled on the misses in flight, a fifth
  // of the kernel's time in the prefetches themselves: 32 sequences of 330 positions (30 layers' caches in turn,
  // 2 threads, EPYC Zen 4, 2026-12-07) took 0.43 ms a layer against 0.455 for bfloat16 caches, 0.45 against 0.59
  // for float16, 0.96 against 1.19 for float32; one sequence the same.
  const auto each_page = [&](const T* cache, auto&& f) {
    for (int64_t t = 0, m; t < n; t += m) {
      const int64_t pos = begin + t, slot = table[pos / bs] * bs + pos % bs;
      m = std::min(n - t, bs - pos % bs);
      const int64_t ahead = cache && t + m < n ? std::min(n - t - m, bs) * row : 0;
      const T* next = ahead ? cache + (table[(pos + m) / bs] * bs + (pos + m) % bs) * row : nullptr;
      for (int64_t h = 0; h < KVH; ++h) {
        if (next) prefetch(next + ahead * h / KVH, ahead * (h + 1) / KVH - ahead * h / KVH);
        f(t, slot, m, h);
      }
    }
  };
#ifdef HAVE_TILE_SCORES
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (products == Bf16Cache::TILES) {
      pairs.resize(KVH * D / 2 * G);
      for (int64_t h = 0; h < KVH; ++h) query_pairs(q + h * G * D, G, D, pairs.data() + h * D / 2 * G);
      each_page(kp, [&](int64_t t, int64_t slot, int64_t m, int64_t h) {
        tile_scores(kp + (slot - slot % 16) * row + h * D, row, slot % 16, m, pairs.data() + h * D / 2 * G, G, D,
                    s.data() + h * G * n + t, n);
      });
    }
  }
#endif
#ifdef HAVE_DOT_ATTENTION
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (products == Bf16Cache::DOT) {
      pairs.resize(H * D / 2);
      auto* qb = reinterpret_cast<c10::BFloat16*>(pairs.data());
      for (int64_t i = 0; i < H * D; i += 32)
        _mm512_storeu_si512(qb + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + i + 16), _mm512_loadu_ps(q + i)));
      each_page(kp, [&](int64_t t, int64_t slot, int64_t m, int64_t h) {
        dot_scores(qb + h * G * D, G, D, kp + slot * row + h * D, row, m, s.data() + h * G * n + t, n);
      });
    }
  }
#endif
  if (products == Bf16Cache::WIDENED) {
    each_page(kp, [&](int64_t t, int64_t slot, int64_t m, int64_t h) {
      scores_run(q + h * G * D, G, D, kp + slot * row + h * D, row, m, k_scales ? k_scales + slot * KVH + h : nullptr,
                 KVH, s.data() + h * G * n + t, n);
    });
  }
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s.data() + h * n;
    m_out[h] = scale_max_(sh, n, 1.f);
    l_out[h] = exp_shifted_(sh, n, m_out[h]);
  }
  if (v_scales) {  // after the sums: the softmax weights stay unscaled, the value rows get scale_v
    each_page(nullptr, [&](int64_t t, int64_t slot, int64_t m, int64_t h) {
      for (int64_t g = h * G; g < (h + 1) * G; ++g)
        for (int64_t i = 0; i < m; ++i) s[g * n + t + i] *= v_scales[(slot + i) * KVH + h];
    });
  }
  std::fill(o_out, o_out + H * D, 0.f);
#ifdef HAVE_DOT_ATTENTION
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (products == Bf16Cache::DOT) {
      const int64_t ldp = n + 1;
      weights.resize(H * ldp);
      for (int64_t h = 0; h < H; ++h) round_weights(s.data() + h * n, n, weights.data() + h * ldp);
      each_page(vp, [&](int64_t t, int64_t slot, int64_t m, int64_t h) {
        in_head_groups(G, [&](auto heads, int64_t g) {
          dot_weighted<heads>(weights.data() + (h * G + g) * ldp + t, ldp, vp + slot * row + h * D, row, m, D,
                              o_out + (h * G + g) * D);
        });
      });
      for (int64_t h = 0; h < H; ++h) pair_order_(o_out + h * D, D);
      return;
    }
  }
#endif
  each_page(vp, [&](int64_t t, int64_t slot, int64_t m, int64_t h) {
    weighted_run(s.data() + h * G * n + t, n, G, vp + slot * row + h * D, row, m, D, o_out + h * G * D);
  });
}

// Rows whose block tables agree over a whole chunk (a shared system prompt, n > 1 samples of one prompt,
// the earlier turns of one conversation) attend to it together: the chunk's keys and values are read
// once for all of them instead of once per row, and their query heads' scores and weighted values are
// two small GEMMs on the packed-panel tile (as in prefill_attention below) instead of dot products.
constexpr int64_t SHARED_ROWS = 16;  // rows per work item: a prefix shared by many rows still splits across threads

struct SharedScratch {
  std::vector<float> kpan, vpan, q, s, o;
};

// One KV head's chunk of n keys (n % NR == 0, D % NR == 0) against M query rows: each query's score
// maximum, sum of exps and exp-weighted value rows, as the row path computes them. Rows widen to float
// as they are packed, int8 ones times their scales.
template <typename T>
static void shared_chunk(const float* const* queries, int64_t M, const T* const* k_rows, const T* const* v_rows,
                         const float* k_scales, const float* v_scales, int64_t n, int64_t D, float scale,
                         SharedScratch& w, float* const* m_out, float* const* l_out, float* const* o_out) {
  // kpan[panel][d][16]: keys 16 panel .. 16 panel + 15; vpan[e][t][16]: channels 16 e .. 16 e + 15.
  w.kpan.resize(n * D);
  w.vpan.resize(n * D);
  for (int64_t t0 = 0; t0 < n; t0 += NR) {
    float ks[NR];
    for (int64_t i = 0; i < NR; ++i) ks[i] = k_scales ? k_scales[t0 + i] : 1.f;
    float* kd = w.kpan.data() + t0 * D;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t i = 0; i < NR; ++i) kd[d * NR + i] = float(k_rows[t0 + i][d]) * ks[i];
  }
  for (int64_t t = 0; t < n; ++t) {
    const float vs = v_scales ? v_scales[t] : 1.f;
    for (int64_t e = 0; e < D / NR; ++e) {
      float* vd = w.vpan.data() + (e * n + t) * NR;
      const T* vr = v_rows[t] + e * NR;
      for (int64_t i = 0; i < NR; ++i) vd[i] = float(vr[i]) * vs;
    }
  }
  w.q.resize(M * D);
  w.s.resize(M * n);
  w.o.resize(M * D);
  for (int64_t j = 0; j < M; ++j) std::copy(queries[j], queries[j] + D, w.q.data() + j * D);
  for (int64_t m = 0; m < M; m += MR) {
    const int64_t r = std::min(MR, M - m);
    int64_t pnl = 0;
    for (; pnl + TILE_PANELS <= n / NR; pnl += TILE_PANELS)
      tile<TILE_PANELS>(r, w.q.data() + m * D, D, w.kpan.data() + pnl * D * NR, D * NR, D,
                        w.s.data() + m * n + pnl * NR, n, false, TILE_PANELS * NR, nullptr);
    for (; pnl < n / NR; ++pnl)
      tile<1>(r, w.q.data() + m * D, D, w.kpan.data() + pnl * D * NR, D * NR, D, w.s.data() + m * n + pnl * NR, n,
              false, NR, nullptr);
  }
  for (int64_t j = 0; j < M; ++j) {
    float* sj = w.s.data() + j * n;
    *m_out[j] = scale_max_(sj, n, scale);
    *l_out[j] = exp_shifted_(sj, n, *m_out[j]);
  }
  const int64_t E = D / NR;
  for (int64_t m = 0; m < M; m += MR) {
    const int64_t r = std::min(MR, M - m);
    int64_t e = 0;
    for (; e + TILE_PANELS <= E; e += TILE_PANELS)
      tile<TILE_PANELS>(r, w.s.data() + m * n, n, w.vpan.data() + e * n * NR, n * NR, n, w.o.data() + m * D + e * NR,
                        D, false, TILE_PANELS * NR, nullptr);
    for (; e < E; ++e)
      tile<1>(r, w.s.data() + m * n, n, w.vpan.data() + e * n * NR, n * NR, n, w.o.data() + m * D + e * NR, D, false,
              NR, nullptr);
  }
  for (int64_t j = 0; j < M; ++j) std::copy(w.o.data() + j * D, w.o.data() + (j + 1) * D, o_out[j]);
}

// Decode attention straight from the paged cache: one query token per sequence, each KV head's
// group of query heads scored against the sequence's cached keys, so K and V are read once and never
// gathered into a padded copy. Positions before context_len - window are skipped when window > 0
// (sliding-window attention). Contexts are cut into chunks of at most ATTN_CHUNK positions, each with its
// own softmax maximum and sum (split-K, as flash-decoding does), merged at the end: a batch of one long
// sequence keeps both threads busy. Where rows' tables agree on a chunk's leading blocks, those are one
// shared item for all of them (shared_chunk); 32 sequences behind a 1,008-token prefix (SmolLM2's heads,
// 2 threads, Xeon) took 0.61 ms a layer against 1.26 without.
//
// T = int8_t reads an int8 cache with k_scales, v_scales [blocks, block_size, kv_heads]: a key's score is
// scale_k * (q . k_int8) and a value row is weighted by p * scale_v, so nothing is dequantized in memory.
// Widening each chunk's rows once into a float scratch shared by the group's query heads was tried and
// measured slower (SmolLM2's heads, 4096 positions, 30 layers, 1 thread: 50 ms a step against 39 here).
constexpr int64_t ATTN_CHUNK = 256;

template <typename T>
static void decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                             const float* k_scales, const float* v_scales, at::Tensor block_tables,
                             at::Tensor context_lens, double scale, int64_t window) {
  q = q.contiguous();  // here rather than in the caller: in a replayed step, one op less per layer
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3, "paged_decode_attention: q");
  TORCH_CHECK(out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: layout");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "paged_decode_attention: int64 tables");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH;
  const int64_t max_blocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  auto tables = block_tables.contiguous(), lens_t = context_lens.contiguous();
  const int64_t* bt = tables.data_ptr<int64_t>();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();

  auto first_pos = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, lens[b] - window) : int64_t(0); };
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lens[b] - first_pos(b));
  // Chunks of a sequence: none longer than ATTN_CHUNK, and for a batch smaller than the threads a whole number
  // of even shares each (a sequence alone: one chunk a thread, not four of unequal length each costing an item's
  // setup and a partial to merge; one sequence of 192 positions 9.6 us a layer against 12.3 on a float16 cache).
  const int64_t share = (at::get_num_threads() + B - 1) / B;
  const int64_t per_seq = share * ((longest + share * ATTN_CHUNK - 1) / (share * ATTN_CHUNK));
  int64_t chunk_len = std::clamp<int64_t>((longest + per_seq - 1) / per_seq, 32, ATTN_CHUNK);
  // Rows can share a chunk's blocks when chunks start on block boundaries.
  const bool can_share = window == 0 && B > 1 && D % NR == 0;
  if (can_share) chunk_len = (chunk_len + bs - 1) / bs * bs;
  const int64_t chunks = (longest + chunk_len - 1) / chunk_len;

  // A work item is a run of positions of one sequence, or of up to SHARED_ROWS sequences whose tables
  // agree on it, all KV heads: a cached position's K (and V) rows of all heads are contiguous, so the
  // item streams whole blocks of the cache. Each chunk of a sequence is one item, or a shared item over
  // its first whole blocks and one of its own over the rest. Items differ in length, so threads take the
  // next item as they finish one instead of a fixed share each.
  struct Item {
    int64_t begin, n, first, count;  // positions [begin, begin + n) of the rows order[first, first + count)
  };
  std::vector<int64_t> order;  // an item's rows; entry i of it is also the slot of that row's partials
  std::vector<Item> items;
  std::vector<int64_t> present, full_blocks(B);
  for (int64_t c = 0; c < chunks; ++c) {
    present.clear();
    for (int64_t b = 0; b < B; ++b) {
      if (first_pos(b) + c * chunk_len < lens[b]) present.push_back(b);
    }
    const int64_t lo = c * chunk_len, nb = chunk_len / bs;
    const auto end_of = [&](int64_t b) { return std::min(lens[b], first_pos(b) + (c + 1) * chunk_len); };
    const auto own = [&](int64_t b, int64_t from) {
      if (from < end_of(b)) {
        items.push_back({from, end_of(b) - from, int64_t(order.size()), 1});
        order.push_back(b);
      }
    };
    if (!can_share) {
      for (int64_t b : present) own(b, first_pos(b) + lo);
      continue;
    }
    // The chunk's whole blocks of each row, sorted, so that rows sharing blocks are neighbours.
    const auto blocks_of = [&](int64_t b) { return bt + b * max_blocks + lo / bs; };
    for (int64_t b : present) full_blocks[b] = (end_of(b) - lo) / bs;
    std::sort(present.begin(), present.end(), [&](int64_t a, int64_t b) {
      return std::lexicographical_compare(blocks_of(a), blocks_of(a) + full_blocks[a], blocks_of(b),
                                          blocks_of(b) + full_blocks[b]);
    });
    const auto common = [&](int64_t a, int64_t b) {  // leading blocks a and b share
      const int64_t n = std::min(full_blocks[a], full_blocks[b]);
      return int64_t(std::mismatch(blocks_of(a), blocks_of(a) + n, blocks_of(b)).first - blocks_of(a));
    };
    for (size_t i = 0, j; i < present.size(); i = j) {
      // A run of rows sharing at least the blocks its first two share, over whole key panels.
      const int64_t shared_blocks = i + 1 < present.size() ? common(present[i], present[i + 1]) : 0;
      const int64_t n = std::min(shared_blocks, nb) * bs / NR * NR;
      j = i + 1;
      if (n > 0) {
        while (j < present.size() && int64_t(j - i) < SHARED_ROWS &&
               common(present[j - 1], present[j]) >= shared_blocks)
          ++j;
      }
      if (j - i == 1) {
        own(present[i], lo);
        continue;
      }
      items.push_back({lo, n, int64_t(order.size()), int64_t(j - i)});
      order.insert(order.end(), present.begin() + i, present.begin() + j);
      for (size_t r = i; r < j; ++r) own(present[r], lo + n);
    }
  }
  // Per (slot, KV head, query head of the group): the item's score maximum, its sum of exp(score -
  // maximum), and the value rows weighted by those exps.
  const int64_t slots = order.size();
  std::vector<float> part_max(slots * KVH * G, -INFINITY), part_sum(slots * KVH * G, 0.f);
  std::vector<float> part_out(slots * KVH * G * D, 0.f);

  // A bfloat16 cache on the products the linear layers multiply bfloat16 by: AMX tiles score whole 16-key blocks,
  // at most 16 query heads a KV head; dot products score and weigh any page.
  Bf16Cache products = Bf16Cache::WIDENED;
  if (std::is_same_v<T, c10::BFloat16> && D % 32 == 0) {
    const std::string linear = bf16_products();
#ifdef HAVE_TILE_SCORES
    if (linear == "amx" && bs == 16 && G <= 16) products = Bf16Cache::TILES;
#endif
#ifdef HAVE_DOT_ATTENTION
    if (linear == "dot") products = Bf16Cache::DOT;
#endif
  }
  const bool tiles = products == Bf16Cache::TILES;

  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
#ifdef HAVE_TILE_SCORES
    if (tiles) configure_score_tiles(G);
#endif
    // Each thread's working memory, kept between calls (a decode step makes one a layer).
    static thread_local std::vector<float> scores, scaled_q, k_row_scales, v_row_scales;
    static thread_local std::vector<uint32_t> pairs;
    static thread_local std::vector<c10::BFloat16> weights;
    static thread_local std::vector<const T*> k_rows, v_rows;
    static thread_local SharedScratch shared;
    static thread_local std::vector<const float*> queries;
    static thread_local std::vector<float*> m_out, l_out, o_out;
    scaled_q.resize(H * D);
    for (int64_t next; (next = next_item.fetch_add(1)) < int64_t(items.size());) {
      const Item& item = items[next];
      const int64_t b = order[item.first], begin = item.begin, n = item.n;
      if (item.count == 1) {
        const float* qb = qp + b * H * D;
        for (int64_t i = 0; i < H * D; ++i) scaled_q[i] = qb[i] * float(scale);
        const int64_t slot = item.first * H;
        row_item(scaled_q.data(), kp, vp, k_scales, v_scales, bt + b * max_blocks, bs, KVH, G, D, begin, n, products,
                 scores, pairs, weights, part_max.data() + slot, part_sum.data() + slot, part_out.data() + slot * D);
        continue;
      }
      k_rows.resize(n);
      v_rows.resize(n);
      k_row_scales.resize(k_scales ? n : 0);
      v_row_scales.resize(k_scales ? n : 0);
      const int64_t M = item.count * G;
      queries.resize(M);
      m_out.resize(M);
      l_out.resize(M);
      o_out.resize(M);
      for (int64_t kvh = 0; kvh < KVH; ++kvh) {
        for (int64_t t = 0; t < n; ++t) {
          const int64_t pos = begin + t, row = (bt[b * max_blocks + pos / bs] * bs + pos % bs) * KVH + kvh;
          k_rows[t] = kp + row * D;
          v_rows[t] = vp + row * D;
          if (k_scales) {
            k_row_scales[t] = k_scales[row];
            v_row_scales[t] = v_scales[row];
          }
        }
        for (int64_t r = 0; r < item.count; ++r) {
          const int64_t slot = (item.first + r) * KVH + kvh;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t j = r * G + g;
            queries[j] = qp + (order[item.first + r] * H + kvh * G + g) * D;
            m_out[j] = part_max.data() + slot * G + g;
            l_out[j] = part_sum.data() + slot * G + g;
            o_out[j] = part_out.data() + (slot * G + g) * D;
          }
        }
        shared_chunk(queries.data(), M, k_rows.data(), v_rows.data(), k_scales ? k_row_scales.data() : nullptr,
                     v_scales ? v_row_scales.data() : nullptr, n, D, float(scale), shared, m_out.data(),
                     l_out.data(), o_out.data());
      }
    }
#ifdef HAVE_TILE_SCORES
    if (tiles) _tile_release();
#endif
  });

  std::vector<std::vector<int64_t>> slots_of(B);
  for (int64_t i = 0; i < slots; ++i) slots_of[order[i]].push_back(i);
  // Serial for a few rows: merging them costs less than waking a thread.
  at::parallel_for(0, B * KVH, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, kvh = i % KVH;
      for (int64_t g = 0; g < G; ++g) {
        float mx = -INFINITY, total = 0.f;
        for (int64_t slot : slots_of[b]) mx = std::max(mx, part_max[(slot * KVH + kvh) * G + g]);
        float* dst = op + (i * G + g) * D;  // (b, kvh, g) is query head kvh * G + g of sequence b
        std::fill(dst, dst + D, 0.f);
        for (int64_t slot : slots_of[b]) {
          const int64_t j = (slot * KVH + kvh) * G + g;
          const float w = std::exp(part_max[j] - mx);
          total += w * part_sum[j];
          for (int64_t d = 0; d < D; ++d) dst[d] += w * part_out[j * D + d];
        }
        for (int64_t d = 0; d < D; ++d) dst[d] /= total;
      }
    }
  });
}

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, double scale, int64_t window) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kHalf || type == at::kBFloat16) && v_cache.scalar_type() == type,
              "paged_decode_attention: float32, float16 or bfloat16 cache");
  if (type == at::kFloat)
    decode_attention<float>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, scale, window);
  else if (type == at::kHalf)
    decode_attention<at::Half>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, scale, window);
  else
    decode_attention<at::BFloat16>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, scale,
                                   window);
}

void paged_decode_attention_int8(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                 at::Tensor k_scales, at::Tensor v_scales, at::Tensor block_tables,
                                 at::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar,
              "paged_decode_attention_int8: int8 cache");
  TORCH_CHECK(k_scales.scalar_type() == at::kFloat && v_scales.scalar_type() == at::kFloat && k_scales.is_contiguous() &&
              v_scales.is_contiguous() && k_scales.numel() * k_cache.size(3) == k_cache.numel() &&
              v_scales.numel() * v_cache.size(3) == v_cache.numel(),
              "paged_decode_attention_int8: float32 scales [blocks, block_size, kv_heads]");
  decode_attention<int8_t>(out, q, k_cache, v_cache, k_scales.data_ptr<float>(), v_scales.data_ptr<float>(),
                           block_tables, context_lens, scale, window);
}

// H2O's scores (kv_policy h2o): each decode row's attention weights over its sequence's cached keys, summed over
// each KV head's query heads, added to received [regions, blocks, block_size, kv_heads] at the keys' slots of
// the row's region (draft_ranks [rows], else region 0). A second pass over the keys beside
// paged_decode_attention, whose split-K chunks keep no weights. No two (row, KV head) items add to one entry:
// rows of one sequence (a token and the drafts after it) add into regions of their own, which the model runner
// folds into region 0 once it knows the drafts kept; rows padded onto one scratch block (a replayed step's) may,
// and what lands there is never read. k_scales: an int8 cache's [blocks, block_size, kv_heads], else null.
template <typename T>
static void decode_received(at::Tensor received, at::Tensor q, at::Tensor k_cache, const float* k_scales,
                            at::Tensor block_tables, at::Tensor context_lens, double scale,
                            const std::optional<at::Tensor>& draft_ranks) {
  q = q.contiguous();
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3, "paged_decode_received_: q");
  const int64_t entries = k_cache.numel() / k_cache.size(3);  // slots x KV heads: one region
  TORCH_CHECK(received.scalar_type() == at::kFloat && received.is_contiguous() && k_cache.is_contiguous() &&
              received.numel() % entries == 0,
              "paged_decode_received_: float32 received [regions, blocks, block_size, kv_heads]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode_received_: int64 tables");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(!draft_ranks || (draft_ranks->scalar_type() == at::kLong && draft_ranks->numel() == B),
              "paged_decode_received_: int64 draft_ranks, one per row");
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH, row = KVH * D;
  const int64_t max_blocks = block_tables.size(1), regions = received.numel() / entries;
  auto tables = block_tables.contiguous(), lens_t = context_lens.contiguous();
  at::Tensor ranks_t = draft_ranks ? draft_ranks->contiguous() : at::Tensor();
  const int64_t* bt = tables.data_ptr<int64_t>();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  const int64_t* ranks = draft_ranks ? ranks_t.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; ranks && b < B; ++b)
    TORCH_CHECK(ranks[b] >= 0 && ranks[b] < regions, "paged_decode_received_: a draft rank past the regions");
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  float* const received_p = received.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s, got;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, h = i % KVH, n = lens[b];
      float* rp = received_p + (ranks ? ranks[b] : 0) * entries;
      const int64_t* table = bt + b * max_blocks;
      const auto slot_of = [&](int64_t t) { return table[t / bs] * bs + t % bs; };
      s.resize(G * n);
      for (int64_t t = 0, m; t < n; t += m) {
        m = std::min(n - t, bs - t % bs);
        const int64_t slot = slot_of(t);
        scores_run(qp + (b * H + h * G) * D, G, D, kp + slot * row + h * D, row, m,
                   k_scales ? k_scales + slot * KVH + h : nullptr, KVH, s.data() + t, n);
      }
      got.assign(n, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * n;
        const float inv = 1.f / exp_shifted_(sg, n, scale_max_(sg, n, float(scale)));
        for (int64_t t = 0; t < n; ++t) got[t] += sg[t] * inv;
      }
      for (int64_t t = 0; t < n; ++t) rp[slot_of(t) * KVH + h] += got[t];
    }
  });
}

void paged_decode_received_(at::Tensor received, at::Tensor q, at::Tensor k_cache, std::optional<at::Tensor> k_scales,
                            at::Tensor block_tables, at::Tensor context_lens, double scale,
                            std::optional<at::Tensor> draft_ranks) {
  const auto type = k_cache.scalar_type();
  if (type == at::kChar) {
    TORCH_CHECK(k_scales && k_scales->scalar_type() == at::kFloat && k_scales->is_contiguous() &&
                k_scales->numel() * k_cache.size(3) == k_cache.numel(),
                "paged_decode_received_: an int8 cache's float32 scales [blocks, block_size, kv_heads]");
    decode_received<int8_t>(received, q, k_cache, k_scales->data_ptr<float>(), block_tables, context_lens, scale,
                            draft_ranks);
  } else if (type == at::kFloat) {
    decode_received<float>(received, q, k_cache, nullptr, block_tables, context_lens, scale, draft_ranks);
  } else if (type == at::kBFloat16) {
    decode_received<at::BFloat16>(received, q, k_cache, nullptr, block_tables, context_lens, scale, draft_ranks);
  } else {
    TORCH_CHECK(type == at::kHalf, "paged_decode_received_: float32, float16, bfloat16 or int8 cache");
    decode_received<at::Half>(received, q, k_cache, nullptr, block_tables, context_lens, scale, draft_ranks);
  }
}

// Prefill attention: T queries (rows of q [T, H, D]) at positions C - T .. C - 1 against C keys and values
// (k, v [C, KVH, D]), causal, and within `window` positions when window > 0. Rows may be strided (views
// of the fused qkv output); each row's heads are contiguous.
//
// Built on the packed-panel GEMM tile: each KV head's keys are packed as panels of 16 keys ([D, 16] each,
// so S = Q K^T is the tile with the head dimension as depth) and its values as panels of 16 channels
// ([C, 16] each, so O = P V is the tile with the keys as depth). A work item is QB consecutive queries of
// one query head: their scores over every key they may see, a softmax per row, then P V. Torch's CPU
// flash attention took 3.5-4.0 ms per SmolLM2 layer on 512 tokens (2 threads, 2026-11-29).
//
// With `received` ([KVH, C], H2O's), each query's softmax weights are added there, summed over each KV head's
// query heads: per thread, then once into it.
//
// A low-bit cache (layers/kivi.py) gives each key two copies: k, v hold the quantized one (as read back) and
// kf, vf the full-precision one of the entries from the first query's residual on; a query reads its residual
// (its own block of `bs` and the blocks before it, `span` entries in all) at full precision and the earlier
// entries quantized. Those few scores per row are recomputed from kf, and their weights are taken out of P V
// and applied to vf instead.
constexpr int64_t QB = 48;  // queries per work item

struct OwnBlocks {  // the full-precision copies of a low-bit cache's entries fp_start .. C - 1
  const float* k;
  const float* v;
  int64_t sk, sv, fp_start, bs, span;
  int64_t first_full(int64_t pos) const { return std::max<int64_t>(0, pos / bs * bs + bs - span); }
};

// Where prefill's keys and values come from: rows of float32 tensors (a chunk's own K/V, slot = position), or
// the paged cache as stored (float32, float16, bfloat16, or int8 with its scales [slots, kv_heads]) through each
// sequence's block table; rows are widened to float32 as they are packed.
template <typename T>
struct KVSource {
  const T* k;
  const T* v;
  int64_t sk, sv;  // values from one slot's row to the next
  const float* k_scales;
  const float* v_scales;
  int64_t bs;  // block size: slots of a sequence's table
};

struct PrefillSeq {
  int64_t q_row, T, C;   // its queries are rows q_row .. q_row + T - 1 of q, at positions C - T .. C - 1
  const int64_t* table;  // its blocks; null: key c is slot c
};

template <typename T>
static void prefill(at::Tensor out, at::Tensor q, const std::vector<PrefillSeq>& seqs, const KVSource<T>& src,
                    int64_t KVH, double scale, int64_t window, const OwnBlocks* own, float* received) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  out.sizes() == q.sizes(), "prefill_attention: float32 q and out [rows, heads, dim]");
  const int64_t H = q.size(1), D = q.size(2);
  TORCH_CHECK(H % KVH == 0 && D % NR == 0, "prefill_attention: shapes do not match");
  for (const auto* t : {&q, &out})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "prefill_attention: each row's heads must be contiguous");
  TORCH_CHECK((!own && !received) || seqs.size() == 1, "prefill_attention: one sequence with received or own");
  const int64_t S = seqs.size(), G = H / KVH, E = D / NR, sq = q.stride(0), so = out.stride(0);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Per sequence: its panels' first (KVH x panels) pack item, and where its packed K and V begin.
  // kpan[kvh][panel][d][16]: keys 16 panel .. 16 panel + 15; vpan[kvh][e][c][16]: channels 16 e .. 16 e + 15.
  std::vector<int64_t> first_item(S + 1, 0), first_value(S + 1, 0);
  for (int64_t i = 0; i < S; ++i) {
    TORCH_CHECK(0 <= seqs[i].T && seqs[i].T <= seqs[i].C, "prefill_attention: a sequence's rows exceed its keys");
    const int64_t KP = (seqs[i].C + NR - 1) / NR;
    first_item[i + 1] = first_item[i] + KVH * KP;
    first_value[i + 1] = first_value[i] + KVH * KP * NR * D;
  }
  // A bfloat16 cache where the linears take bfloat16 products: K and V packed as stored, in the pair layout of
  // bfloat16 panels ([D / 2][16 keys][2 channels] and [C / 2][16 channels][2 keys]), multiplied against the
  // queries and the softmax weights rounded to bfloat16, as decode's products round them: by dot_rows where the
  // linears take dot products, on AMX tiles (tile_products) where they take tiles: SmolLM2's heads, one prompt, 30
  // layers' caches in turn (Xeon with AMX, 2 threads, prefill_attention.py), 1.06 ms a layer against 1.60 widened
  // at 512 tokens, 9.8 against 18.7 at 2048. A tile's depth is 32 keys: P V reads up to 16 keys past a chunk's
  // last (times zero weights), vpairs' padding at the end.
  bool dot = false, tiles = false;
#ifdef HAVE_DOT_ATTENTION
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const std::string products = !own && D % 32 == 0 ? bf16_products() : "off";
    dot = products == "dot";
#ifdef HAVE_TILE_SCORES
    tiles = products == "amx";
#endif
  }
#endif
  const bool pairs = dot || tiles;
  std::vector<float> kpan(pairs ? 0 : first_value[S], 0.f), vpan(pairs ? 0 : first_value[S], 0.f);
  std::vector<c10::BFloat16> kpairs(pairs ? first_value[S] : 0, 0.f);
  std::vector<c10::BFloat16> vpairs(pairs ? first_value[S] + 32 * NR : 0, 0.f);
  at::parallel_for(0, first_item[S], 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t sqn = std::upper_bound(first_item.begin(), first_item.end(), i) - first_item.begin() - 1;
      const PrefillSeq& sn = seqs[sqn];
      const int64_t KP = (sn.C + NR - 1) / NR, CP = KP * NR;
      const int64_t h = (i - first_item[sqn]) / KP, pnl = (i - first_item[sqn]) % KP;
      float* kseq = pairs ? nullptr : kpan.data() + first_value[sqn];
      float* vseq = pairs ? nullptr : vpan.data() + first_value[sqn];
      for (int64_t c = pnl * NR; c < std::min(sn.C, (pnl + 1) * NR); ++c) {
        const int64_t slot = sn.table ? sn.table[c / src.bs] * src.bs + c % src.bs : c;
        const T* kr = src.k + slot * src.sk + h * D;
        const T* vr = src.v + slot * src.sv + h * D;
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (pairs) {
            c10::BFloat16* kd = kpairs.data() + first_value[sqn] + (h * KP + pnl) * D * NR + 2 * (c % NR);
            for (int64_t d = 0; d < D; ++d) kd[d / 2 * 2 * NR + d % 2] = kr[d];
            for (int64_t e = 0; e < E; ++e) {
              c10::BFloat16* vd = vpairs.data() + first_value[sqn] + ((h * E + e) * CP + c / 2 * 2) * NR + c % 2;
              for (int64_t j = 0; j < NR; ++j) vd[2 * j] = vr[e * NR + j];
            }
            continue;
          }
        }
        const float ks = src.k_scales ? src.k_scales[slot * KVH + h] : 1.f;
        const float vs = src.v_scales ? src.v_scales[slot * KVH + h] : 1.f;
        float* kd = kseq + (h * KP + pnl) * D * NR + c % NR;
        for (int64_t d = 0; d < D; ++d) kd[d * NR] = float(kr[d]) * ks;
        for (int64_t e = 0; e < E; ++e) {
          float* vd = vseq + ((h * E + e) * CP + c) * NR;
          for (int64_t j = 0; j < NR; ++j) vd[j] = float(vr[e * NR + j]) * vs;
        }
      }
    }
  });
  // Work items: QB consecutive queries of one sequence and one query head, those that see the most keys first
  // (the shorter ones fill in at the end).
  struct Block {
    int64_t seq, t0, keys;
  };
  std::vector<Block> order;
  for (int64_t i = 0; i < S; ++i)
    for (int64_t t0 = 0; t0 < seqs[i].T; t0 += QB)
      order.push_back({i, t0, seqs[i].C - seqs[i].T + std::min(seqs[i].T, t0 + QB)});
  std::stable_sort(order.begin(), order.end(), [](const Block& a, const Block& b) { return a.keys > b.keys; });
  const int64_t span = own ? own->span : 1, items = int64_t(order.size()) * H, C0 = received ? seqs[0].C : 0;
  std::atomic<int64_t> next_item{0};
  std::mutex adding;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
#ifdef HAVE_TILE_SCORES
    if (tiles) configure_pair_tiles();
#endif
    std::vector<float> scores;
    std::vector<c10::BFloat16> rounded;  // bfloat16 products': the item's queries, then its softmax weights
    std::vector<float> inv_sum(QB);
    std::vector<float> own_weights(own ? QB * span : 0);  // per row, the weights of its residual's entries
    std::vector<float> got(received ? KVH * C0 : 0, 0.f);
    for (int64_t item; (item = next_item.fetch_add(1)) < items;) {
      const Block& blk = order[item / H];
      const PrefillSeq& sn = seqs[blk.seq];
      const int64_t h = item % H, kvh = h / G, C = sn.C, KP = (C + NR - 1) / NR, CP = KP * NR;
      const int64_t t0 = blk.t0, rows = std::min(QB, sn.T - t0), offset = C - sn.T;
      const int64_t last = offset + t0 + rows - 1;  // the last query's position: keys up to it
      const int64_t lo = window > 0 ? std::max<int64_t>(0, offset + t0 - window + 1) / NR * NR : 0;
      const int64_t hi = (last + 1 + NR - 1) / NR * NR, n = hi - lo, ld = n;
      scores.resize(QB * ld);
      const float* q0 = qp + (sn.q_row + t0) * sq + h * D;
      const int64_t kb_at = first_value[blk.seq] + (kvh * KP + lo / NR) * D * NR;
      const float* kb = pairs ? nullptr : kpan.data() + kb_at;
      const int64_t n32 = (n + 31) / 32 * 32;  // a tile's depth of keys
#ifdef HAVE_TILE_SCORES
      if (tiles) {
        rounded.resize((rows + 15) / 16 * 16 * std::max(D, n32));  // tiles read whole 16 rows
        round_rows(q0, rows, D, sq, rounded.data(), D);
        for (int64_t m = 0; m < rows; m += 16)
          tile_products(rounded.data() + m * D, D, kpairs.data() + kb_at, D * NR, D, n / NR,
                        std::min<int64_t>(16, rows - m), scores.data() + m * ld, ld, true);
      }
#endif
#ifdef HAVE_DOT_ATTENTION
      if (dot) {
        rounded.resize(std::max(rows * D, rows * n));
        round_rows(q0, rows, D, sq, rounded.data(), D);
        const auto* a = reinterpret_cast<const int32_t*>(rounded.data());
        for (int64_t m = 0; m < rows; m += MR) {
          const int64_t r = std::min(MR, rows - m);
          int64_t pnl = 0;
          for (; pnl + TILE_PANELS <= n / NR; pnl += TILE_PANELS)
            dot_rows<TILE_PANELS>(r, a + m * D / 2, D / 2, kpairs.data() + kb_at + pnl * D * NR, D * NR, D / 2,
                                  scores.data() + m * ld + pnl * NR, ld, false, TILE_PANELS * NR, nullptr);
          for (; pnl < n / NR; ++pnl)
            dot_rows<1>(r, a + m * D / 2, D / 2, kpairs.data() + kb_at + pnl * D * NR, D * NR, D / 2,
                        scores.data() + m * ld + pnl * NR, ld, false, NR, nullptr);
        }
      }
#endif
      for (int64_t m = 0; !pairs && m < rows; m += MR) {
        const int64_t r = std::min(MR, rows - m);
        int64_t pnl = 0;
        for (; pnl + TILE_PANELS <= n / NR; pnl += TILE_PANELS)
          tile<TILE_PANELS>(r, q0 + m * sq, sq, kb + pnl * D * NR, D * NR, D, scores.data() + m * ld + pnl * NR, ld,
                            false, TILE_PANELS * NR, nullptr);
        for (; pnl < n / NR; ++pnl)
          tile<1>(r, q0 + m * sq, sq, kb + pnl * D * NR, D * NR, D, scores.data() + m * ld + pnl * NR, ld, false, NR,
                  nullptr);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t pos = offset + t0 + i;
        const int64_t first = (window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0) - lo, end = pos + 1 - lo;
        float* s = scores.data() + i * ld;
        const int64_t mine = own ? std::max(own->first_full(pos) - lo, first) : end;  // its residual's first entry
        if (own)
          for (int64_t j = mine; j < end; ++j) {
            const float* kr = own->k + (j + lo - own->fp_start) * own->sk + kvh * D;
            const float* qr = q0 + i * sq;
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
            s[j] = dot;
          }
        std::fill(s, s + first, 0.f);
        const float mx = scale_max_(s + first, end - first, float(scale));
        inv_sum[i] = 1.f / exp_shifted_(s + first, end - first, mx);
        std::fill(s + end, s + n, 0.f);
        if (received)
          for (int64_t j = first; j < end; ++j) got[kvh * C + lo + j] += s[j] * inv_sum[i];
        if (own) {
          std::fill(own_weights.begin() + i * span, own_weights.begin() + (i + 1) * span, 0.f);
          std::copy(s + mine, s + end, own_weights.begin() + i * span);
          std::fill(s + mine, s + end, 0.f);
        }
      }
      const int64_t vb_at = first_value[blk.seq] + (kvh * E * CP + lo) * NR;
      const float* vb = pairs ? nullptr : vpan.data() + vb_at;
      float* o0 = op + (sn.q_row + t0) * so + h * D;
#ifdef HAVE_TILE_SCORES
      if (tiles) {
        round_rows(scores.data(), rows, n, ld, rounded.data(), n32);
        for (int64_t m = 0; m < rows; m += 16)
          tile_products(rounded.data() + m * n32, n32, vpairs.data() + vb_at, CP * NR, n32, E,
                        std::min<int64_t>(16, rows - m), o0 + m * so, so, false);
      }
#endif
#ifdef HAVE_DOT_ATTENTION
      if (dot) {
        round_rows(scores.data(), rows, n, ld, rounded.data(), n);
        const auto* a = reinterpret_cast<const int32_t*>(rounded.data());
        for (int64_t m = 0; m < rows; m += MR) {
          const int64_t r = std::min(MR, rows - m);
          int64_t e = 0;
          for (; e + TILE_PANELS <= E; e += TILE_PANELS)
            dot_rows<TILE_PANELS>(r, a + m * n / 2, n / 2, vpairs.data() + vb_at + e * CP * NR, CP * NR, n / 2,
                                  o0 + m * so + e * NR, so, false, TILE_PANELS * NR, nullptr);
          for (; e < E; ++e)
            dot_rows<1>(r, a + m * n / 2, n / 2, vpairs.data() + vb_at + e * CP * NR, CP * NR, n / 2,
                        o0 + m * so + e * NR, so, false, NR, nullptr);
        }
      }
#endif
      for (int64_t m = 0; !pairs && m < rows; m += MR) {
        const int64_t r = std::min(MR, rows - m);
        int64_t e = 0;
        for (; e + TILE_PANELS <= E; e += TILE_PANELS)
          tile<TILE_PANELS>(r, scores.data() + m * ld, ld, vb + e * CP * NR, CP * NR, n, o0 + m * so + e * NR, so,
                            false, TILE_PANELS * NR, nullptr);
        for (; e < E; ++e)
          tile<1>(r, scores.data() + m * ld, ld, vb + e * CP * NR, CP * NR, n, o0 + m * so + e * NR, so, false, NR,
                  nullptr);
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* o = o0 + i * so;
        if (own) {
          const int64_t pos = offset + t0 + i, first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
          const int64_t mine = std::max(own->first_full(pos), first);
          for (int64_t j = mine; j <= pos; ++j) {
            const float w = own_weights[i * span + j - mine];
            const float* vr = own->v + (j - own->fp_start) * own->sv + kvh * D;
            for (int64_t d = 0; d < D; ++d) o[d] += w * vr[d];
          }
        }
        for (int64_t d = 0; d < D; ++d) o[d] *= inv_sum[i];
      }
    }
    if (received) {
      const std::lock_guard<std::mutex> lock(adding);
      for (int64_t i = 0; i < KVH * C0; ++i) received[i] += got[i];
    }
#ifdef HAVE_TILE_SCORES
    if (tiles) _tile_release();
#endif
  });
}

// One chunk whose keys and values are float32 tensors k, v [C, KVH, D] (rows may be strided).
static void prefill(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t window,
                    const OwnBlocks* own, float* received) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && q.dim() == 3 && k.size(2) == q.size(2) && q.size(0) <= k.size(0),
              "prefill_attention: shapes do not match");
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == k.size(2),
                "prefill_attention: each row's heads must be contiguous");
  const KVSource<float> src{k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0), v.stride(0), nullptr, nullptr, 1};
  prefill(out, q, {{0, q.size(0), k.size(0), nullptr}}, src, k.size(1), scale, window, own, received);
}

// H2O's sums of a chunk's weights, received [kv_heads, keys] for keys k [keys, kv_heads, dim].
static void check_received(const char* op, const std::optional<at::Tensor>& received, const at::Tensor& k) {
  if (received)
    TORCH_CHECK(received->scalar_type() == at::kFloat && received->is_contiguous() && received->dim() == 2 &&
                    received->size(0) == k.size(1) && received->size(1) == k.size(0),
                op, ": received must be float32 [kv_heads, keys]");
}

void prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t window,
                       std::optional<at::Tensor> received) {
  check_received("prefill_attention", received, k);
  prefill(out, q, k, v, scale, window, nullptr, received ? received->data_ptr<float>() : nullptr);
}

void lowbit_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor k_full,
                              at::Tensor v_full, double scale, int64_t window, int64_t block_size,
                              int64_t residual_length, std::optional<at::Tensor> received) {
  const int64_t C = k.size(0), F = k_full.size(0), fp_start = C - F, T = q.size(0);
  TORCH_CHECK(block_size > 0 && residual_length > 0 && residual_length % block_size == 0,
              "lowbit_prefill_attention: the residual is whole blocks");
  const OwnBlocks own{k_full.data_ptr<float>(), v_full.data_ptr<float>(), k_full.stride(0), v_full.stride(0),
                      fp_start, block_size, residual_length};
  TORCH_CHECK(k_full.dim() == 3 && k_full.sizes() == v_full.sizes() && k.dim() == 3 &&
                  k_full.size(1) == k.size(1) && k_full.size(2) == k.size(2) &&
                  k_full.scalar_type() == at::kFloat && v_full.scalar_type() == at::kFloat &&
                  k_full.stride(2) == 1 && v_full.stride(2) == 1 && k_full.stride(1) == k.size(2) &&
                  v_full.stride(1) == k.size(2) && T <= C && fp_start <= own.first_full(C - T),
              "lowbit_prefill_attention: the full-precision entries must start at or before the first query's "
              "residual");
  check_received("lowbit_prefill_attention", received, k);
  prefill(out, q, k, v, scale, window, &own, received ? received->data_ptr<float>() : nullptr);
}

// Every prompt chunk of a step at once, straight from the paged cache: chunk i's query_lens[i] rows (in order
// after the previous chunks' rows of q) at positions context_lens[i] - query_lens[i] .. context_lens[i] - 1,
// its keys through block_tables[i]. One call a layer instead of one a chunk, with no gathered copy of the pages.
void paged_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                             std::optional<at::Tensor> k_scales, std::optional<at::Tensor> v_scales,
                             at::Tensor block_tables, at::Tensor query_lens, at::Tensor context_lens, double scale,
                             int64_t window) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  k_cache.size(3) == q.size(2),
              "paged_prefill_attention: K and V caches [blocks, block_size, kv_heads, dim] alike");
  auto tables = block_tables.contiguous(), qlens = query_lens.contiguous(), clens = context_lens.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && qlens.scalar_type() == at::kLong &&
                  clens.scalar_type() == at::kLong && tables.dim() == 2 && qlens.numel() == tables.size(0) &&
                  clens.numel() == tables.size(0), "paged_prefill_attention: int64 tables and lengths");
  const int64_t S = tables.size(0), bs = k_cache.size(1), KVH = k_cache.size(2), D = k_cache.size(3);
  const int64_t* tp = tables.data_ptr<int64_t>();
  std::vector<PrefillSeq> seqs;
  int64_t row = 0;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t rows = qlens.data_ptr<int64_t>()[i], C = clens.data_ptr<int64_t>()[i];
    TORCH_CHECK(C <= tables.size(1) * bs, "paged_prefill_attention: a context exceeds its table");
    seqs.push_back({row, rows, C, tp + i * tables.size(1)});
    row += rows;
  }
  TORCH_CHECK(row == q.size(0), "paged_prefill_attention: the chunks' rows are not q's");
  const auto type = k_cache.scalar_type();
  const auto run = [&](auto* k, auto* v, const float* ks, const float* vs) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
    prefill<T>(out, q, seqs, KVSource<T>{k, v, KVH * D, KVH * D, ks, vs, bs}, KVH, scale, window, nullptr, nullptr);
  };
  if (type == at::kChar) {
    TORCH_CHECK(k_scales && v_scales && k_scales->scalar_type() == at::kFloat &&
                    v_scales->scalar_type() == at::kFloat && k_scales->is_contiguous() && v_scales->is_contiguous() &&
                    k_scales->numel() * D == k_cache.numel() && v_scales->numel() * D == v_cache.numel(),
                "paged_prefill_attention: an int8 cache's float32 scales [blocks, block_size, kv_heads]");
    run(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scales->data_ptr<float>(),
        v_scales->data_ptr<float>());
  } else if (type == at::kFloat) {
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr, nullptr);
  } else if (type == at::kHalf) {
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), nullptr, nullptr);
  } else {
    TORCH_CHECK(type == at::kBFloat16, "paged_prefill_attention: float32, float16, bfloat16 or int8 cache");
    run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), nullptr, nullptr);
  }
}

// Decode attention over a low-bit cache (kv_cache_dtype="int4" or "int2", layers/kivi.py). A sealed block
// holds levels with a float16 scale and minimum per channel for keys and per token and group of channels for
// values; a work item (one row and KV head) runs the float row kernels above on each block, its levels widened
// in registers as they are read (into a float scratch first where a row is not whole registers). The row's
// residual, its own block and the blocks before it up to residual_length entries, is read from the residual
// ring, as every query reads its residual at the precision the ring holds (the model's dtype: float32, float16 or
// bfloat16).

// A sequence's residual ring holds its last RL entries (whole blocks; RL >= L, the residual, with room past it for
// the rows of a speculative step whose drafts may be rejected) at slots RL * i .. RL * i + RL - 1 of the residual,
// position p at slot p mod RL. `at`, the sequence's residual slot, is its ring's first slot plus its table's offset
// mod RL (the entries its table dropped from its front): entry e is at ring_slot(at, e, RL).
static inline int64_t ring_slot(int64_t at, int64_t e, int64_t RL) { return at - at % RL + (at % RL + e) % RL; }

// levels[c] for the D channels of one packed row: byte j holds channels j, j + D / per, ... from its lowest
// bits up (kivi.pack). Sixteen bytes at a time are shifted, masked and widened to floats in registers.
template <int BITS>
static inline void unpack_row(const uint8_t* p, int64_t D, float* levels) {
  constexpr int per = 8 / BITS, mask = (1 << BITS) - 1;
  const int64_t n = D / per;
  int64_t j0 = 0;
#if defined(__AVX2__)
  for (; j0 + 16 <= n; j0 += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j0));
    for (int i = 0; i < per; ++i) {
      const __m128i x = _mm_and_si128(_mm_srli_epi16(bytes, BITS * i), _mm_set1_epi8(char(mask)));
#if defined(__AVX512F__)
      _mm512_storeu_ps(levels + i * n + j0, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x)));
#else
      _mm256_storeu_ps(levels + i * n + j0, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x)));
      _mm256_storeu_ps(levels + i * n + j0 + 8, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))));
#endif
    }
  }
#endif
  for (int i = 0; i < per; ++i)
    for (int64_t j = j0; j < n; ++j) levels[i * n + j] = float((p[j] >> (BITS * i)) & mask);
}

#ifdef HAVE_FVEC
// Channels [d, d + VW) of a packed row as floats: byte d % n of part d / n (n = D * BITS / 8, n % VW == 0), shifted
// and masked in registers.
template <int BITS>
static inline fvec vload_levels(const uint8_t* row, int64_t d, int64_t n) {
  const __m128i shift = _mm_cvtsi32_si128(int(BITS * (d / n))), mask = _mm_set1_epi8(char((1 << BITS) - 1));
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d % n));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srl_epi16(bytes, shift), mask)));
#else
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + d % n));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srl_epi16(bytes, shift), mask)));
#endif
}
#endif

template <int BITS, typename R>
static void lowbit_decode(float* op, const float* qp, const uint8_t* kp, const uint8_t* vp, const c10::Half* ks,
                          const c10::Half* km, const c10::Half* vs, const c10::Half* vm, const R* rk,
                          const R* rv, const int64_t* bt, const int64_t* lens, const int64_t* res_at, int64_t B,
                          int64_t H, int64_t D, int64_t NB, int64_t bs, int64_t KVH, int64_t PD, int64_t groups,
                          int64_t max_blocks, int64_t res_slots, int64_t L, int64_t RL, float scale,
                          int64_t window, float* received) {
  const int64_t G = H / KVH, GW = D / groups, ld = KVH * D, n_bytes = D * BITS / 8;
#ifdef HAVE_FVEC
  // Levels widened in registers as the row kernels read them; a float scratch where rows are not whole registers.
  const bool in_registers = D % VW == 0 && n_bytes % VW == 0;
#endif
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, q(G * D), qs(G * D), bias(G), o(G * D), rows(bs * D), v_scales(bs * groups),
        v_mins(bs * groups);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, h = item % KVH, n = lens[b];
      const int64_t full = std::max<int64_t>(0, (n - 1) / bs * bs + bs - L);  // the first entry of its residual
      const int64_t first = window > 0 ? std::max<int64_t>(0, n - window) : 0, span = n - first;
      TORCH_CHECK(n >= 1 && res_at[b] >= 0 && res_at[b] % bs == 0 && res_at[b] - res_at[b] % RL + RL <= res_slots &&
                      (n - 1) / bs < max_blocks, "lowbit_decode_attention: slot out of range");
      for (int64_t i = 0; i < G * D; ++i) q[i] = qp[(b * H + h * G) * D + i] * scale;
      s.resize(G * span);
      // f(first position, their count, block id) for the sealed blocks in the window, in order.
      const auto each_block = [&](auto&& f) {
        for (int64_t blk = first / bs; blk < full / bs; ++blk) {
          const int64_t id = bt[b * max_blocks + blk], t0 = std::max(blk * bs, first);
          TORCH_CHECK(id >= 0 && id < NB, "lowbit_decode_attention: block out of range");
          f(t0, blk * bs + bs - t0, id);
        }
      };
      // qs = q * scale and bias = q . min per query head, for a block's key scales and minimums.
      const auto scale_query = [&](const c10::Half* sc, const c10::Half* mn) {
#ifdef HAVE_FVEC
        if (D % VW == 0) {  // float16 widened by F16C, VW channels at a time
          for (int64_t g = 0; g < G; ++g) {
            fvec acc = vzero();
            for (int64_t d = 0; d < D; d += VW) {
              const fvec qv = vloadu(q.data() + g * D + d);
              vstoreu(qs.data() + g * D + d, vfma(qv, vload_w(sc + d), vzero()));
              acc = vfma(qv, vload_w(mn + d), acc);
            }
            alignas(64) float lanes[VW];
            vstore(lanes, acc);
            bias[g] = std::accumulate(lanes, lanes + VW, 0.f);
          }
          return;
        }
#endif
        for (int64_t g = 0; g < G; ++g) {
          bias[g] = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            qs[g * D + d] = q[g * D + d] * float(sc[d]);
            bias[g] += q[g * D + d] * float(mn[d]);
          }
        }
      };
      // f(first entry, their count, its ring slot) for the residual's entries in the window, a block at a time.
      const auto each_residual_block = [&](auto&& f) {
        for (int64_t t0 = std::max(full, first); t0 < n; t0 = t0 / bs * bs + bs)
          f(t0, std::min(t0 / bs * bs + bs, n) - t0, ring_slot(res_at[b], t0, RL));
      };
      // q . (l * scale + min) = (q * scale) . l + q . min: the block's scales go into the query once, and its
      // keys are the levels as they unpack.
      each_block([&](int64_t t0, int64_t m, int64_t id) {
        const c10::Half* sc = ks + (id * KVH + h) * D;
        const c10::Half* mn = km + (id * KVH + h) * D;
        scale_query(sc, mn);
        const uint8_t* keys = kp + ((id * bs + t0 % bs) * KVH + h) * PD;  // key r at keys + r * KVH * PD
#ifdef HAVE_FVEC
        if (in_registers) {
          in_head_groups(G, [&](auto heads, int64_t g) {
            scores_heads_by<heads>(qs.data() + g * D, D, [&](int64_t t, int64_t d) {
              return vload_levels<BITS>(keys + t * KVH * PD, d, n_bytes);
            }, m, nullptr, 0, s.data() + g * span + t0 - first, span);
          });
        } else
#endif
        {
          for (int64_t r = 0; r < m; ++r) unpack_row<BITS>(keys + r * KVH * PD, D, rows.data() + r * D);
          scores_run(qs.data(), G, D, rows.data(), D, m, nullptr, 0, s.data() + t0 - first, span);
        }
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = t0; t < t0 + m; ++t) s[g * span + t - first] += bias[g];
      });
      each_residual_block([&](int64_t t0, int64_t m, int64_t slot) {
        scores_run(q.data(), G, D, rk + slot * ld + h * D, ld, m, nullptr, 0, s.data() + t0 - first, span);
      });
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * span;
        const float sum = exp_shifted_(sg, span, scale_max_(sg, span, 1.f));
        for (int64_t t = 0; t < span; ++t) sg[t] /= sum;
      }
      // H2O's: each entry's weight summed over the query heads, added at its slot (paged_decode_received_'s); the
      // row's own entry has received nothing before.
      if (received)
        for (int64_t t = first; t < n; ++t) {
          float w = 0.f;
          for (int64_t g = 0; g < G; ++g) w += s[g * span + t - first];
          float& got = received[(bt[b * max_blocks + t / bs] * bs + t % bs) * KVH + h];
          got = t == n - 1 ? w : got + w;
        }
      each_block([&](int64_t t0, int64_t m, int64_t id) {
        const int64_t slot0 = id * bs + t0 % bs;
        const uint8_t* vals = vp + (slot0 * KVH + h) * PD;  // value r at vals + r * KVH * PD
        for (int64_t r = 0; r < m; ++r)
          for (int64_t gi = 0; gi < groups; ++gi) {
            v_scales[r * groups + gi] = float(vs[((slot0 + r) * KVH + h) * groups + gi]);
            v_mins[r * groups + gi] = float(vm[((slot0 + r) * KVH + h) * groups + gi]);
          }
#ifdef HAVE_FVEC
        if (in_registers) {
          in_head_groups(G, [&](auto heads, int64_t g) {
            weighted_heads_by<heads>(s.data() + g * span + t0 - first, span, [&](int64_t t, int64_t d) {
              const int64_t at = t * groups + d / GW;
              return vfma(vload_levels<BITS>(vals + t * KVH * PD, d, n_bytes), vbroadcast(&v_scales[at]),
                          vbroadcast(&v_mins[at]));
            }, m, D, o.data() + g * D);
          });
          return;
        }
#endif
        for (int64_t r = 0; r < m; ++r) {
          float* row = rows.data() + r * D;
          unpack_row<BITS>(vals + r * KVH * PD, D, row);
          for (int64_t gi = 0; gi < groups; ++gi)
            for (int64_t d = gi * GW; d < gi * GW + GW; ++d) row[d] = row[d] * v_scales[r * groups + gi] + v_mins[r * groups + gi];
        }
        weighted_run(s.data() + t0 - first, span, G, rows.data(), D, m, D, o.data());
      });
      each_residual_block([&](int64_t t0, int64_t m, int64_t slot) {
        weighted_run(s.data() + t0 - first, span, G, rv + slot * ld + h * D, ld, m, D, o.data());
      });
      std::copy(o.begin(), o.end(), op + (b * H + h * G) * D);
    }
  });
}

// The tensors of a low-bit cache and a step's tables, as layers/kivi.py holds them.
static void check_lowbit_cache(const char* op, const at::Tensor& values, const at::Tensor& k_scale,
                               const at::Tensor& k_min, const at::Tensor& v_scale, const at::Tensor& v_min,
                               const at::Tensor& residual, const at::Tensor& block_tables,
                               const at::Tensor& context_lens, const at::Tensor& residual_slots, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 2, op, ": 4 or 2 bits");
  TORCH_CHECK(values.scalar_type() == at::kByte && values.is_contiguous() && values.dim() == 5,
              op, ": packed uint8 values [2, blocks, block_size, kv_heads, packed]");
  for (const auto* t : {&k_scale, &k_min, &v_scale, &v_min})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous(), op, ": float16 scales");
  const auto ring = residual.scalar_type();
  TORCH_CHECK((ring == at::kFloat || ring == at::kHalf || ring == at::kBFloat16) && residual.is_contiguous(), op,
              ": float32, float16 or bfloat16 residual");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              residual_slots.scalar_type() == at::kLong, op, ": int64 tables");
}

// f(the residual's data) as float*, at::Half* or at::BFloat16*, by its dtype (check_lowbit_cache checked it).
template <typename F>
static void with_ring_type(const at::Tensor& residual, F&& f) {
  switch (residual.scalar_type()) {
    case at::kFloat: return f(residual.data_ptr<float>());
    case at::kHalf: return f(residual.data_ptr<at::Half>());
    default: return f(residual.data_ptr<at::BFloat16>());
  }
}

void lowbit_decode_attention(at::Tensor out, at::Tensor q, at::Tensor values, at::Tensor k_scale, at::Tensor k_min,
                             at::Tensor v_scale, at::Tensor v_min, at::Tensor residual, at::Tensor block_tables,
                             at::Tensor context_lens, at::Tensor residual_slots, double scale, int64_t window,
                             int64_t bits, int64_t residual_length, int64_t ring_length,
                             std::optional<at::Tensor> received) {
  q = q.contiguous();
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && out.is_contiguous(), "lowbit_decode_attention: q, out");
  check_lowbit_cache("lowbit_decode_attention", values, k_scale, k_min, v_scale, v_min, residual, block_tables,
                     context_lens, residual_slots, bits);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = values.size(1), bs = values.size(2), KVH = values.size(3), PD = values.size(4);
  TORCH_CHECK(PD * 8 == D * bits && k_scale.size(2) == D && H % KVH == 0, "lowbit_decode_attention: head_dim");
  TORCH_CHECK(residual_length > 0 && residual_length % bs == 0 && ring_length >= residual_length &&
                  ring_length % bs == 0, "lowbit_decode_attention: the residual and its ring are whole blocks");
  TORCH_CHECK(!received || (received->scalar_type() == at::kFloat && received->is_contiguous() &&
                            received->numel() == NB * bs * KVH),
              "lowbit_decode_attention: received must be float32 [blocks, block_size, kv_heads]");
  const auto tables = block_tables.contiguous(), lens = context_lens.contiguous(), res = residual_slots.contiguous();
  const uint8_t* kp = values.data_ptr<uint8_t>();
  const int64_t res_slots = residual.size(1);
  with_ring_type(residual, [&](auto* rk) {
    const auto run = bits == 4 ? lowbit_decode<4, std::remove_pointer_t<decltype(rk)>>
                               : lowbit_decode<2, std::remove_pointer_t<decltype(rk)>>;
    run(out.data_ptr<float>(), q.data_ptr<float>(), kp, kp + NB * bs * KVH * PD, k_scale.data_ptr<c10::Half>(),
        k_min.data_ptr<c10::Half>(), v_scale.data_ptr<c10::Half>(), v_min.data_ptr<c10::Half>(), rk,
        rk + res_slots * KVH * D, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), res.data_ptr<int64_t>(), B,
        H, D, NB, bs, KVH, PD, v_scale.size(3), tables.size(1), res_slots, residual_length, ring_length, float(scale),
        window, received ? received->data_ptr<float>() : nullptr);
  });
}

// Writes each decode row's K/V (k, v [B, KVH, D]) at its position in its sequence's residual ring (rounded to
// nearest even in a 16-bit ring, as torch's .to() rounds), and seals the block a row completes from the ring's
// entries: its keys quantized per channel over the block's tokens, its values per token over groups of channels,
// as kivi.quantize rounds them (float16 scale and minimum, levels rounded half to even), then packed (kivi.pack).
// Each row is one sequence's: rows write disjoint residual rings and blocks.
template <typename R>
static void quantize_levels(const R* x, int64_t stride, int64_t count, int64_t maxq, c10::Half* scale,
                            c10::Half* low, uint8_t* levels, int64_t level_stride) {
  float lo = float(x[0]), hi = float(x[0]);
  for (int64_t i = 1; i < count; ++i) {
    lo = std::min(lo, float(x[i * stride]));
    hi = std::max(hi, float(x[i * stride]));
  }
  *scale = c10::Half((hi - lo) / float(maxq));
  *low = c10::Half(lo);
  const float step = float(*scale), base = float(*low), inv = step > 0.f ? 1.f / step : 0.f;
  for (int64_t i = 0; i < count; ++i) {
    const float level = std::nearbyint((float(x[i * stride]) - base) * inv);
    levels[i * level_stride] = uint8_t(std::clamp(level, 0.f, float(maxq)));
  }
}

void lowbit_decode_write_(at::Tensor values, at::Tensor k_scale, at::Tensor k_min, at::Tensor v_scale,
                          at::Tensor v_min, at::Tensor residual, at::Tensor k, at::Tensor v, at::Tensor block_tables,
                          at::Tensor context_lens, at::Tensor residual_slots, int64_t bits, int64_t ring_length) {
  check_lowbit_cache("lowbit_decode_write_", values, k_scale, k_min, v_scale, v_min, residual, block_tables,
                     context_lens, residual_slots, bits);
  const int64_t B = k.size(0), NB = values.size(1), bs = values.size(2), KVH = values.size(3), PD = values.size(4);
  const int64_t D = residual.size(3), R = residual.size(1), groups = v_scale.size(3), GW = D / groups;
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == KVH &&
                t->size(2) == D && t->stride(2) == 1 && t->stride(1) == D,
                "lowbit_decode_write_: k, v [rows, kv_heads, head_dim]");
  TORCH_CHECK(PD * 8 == D * bits && context_lens.size(0) == B && residual_slots.size(0) == B,
              "lowbit_decode_write_: shapes do not match");
  const int64_t RL = ring_length;
  TORCH_CHECK(RL > 0 && RL % bs == 0, "lowbit_decode_write_: the ring is whole blocks");
  const auto tables = block_tables.contiguous(), lens = context_lens.contiguous(), res = residual_slots.contiguous();
  const int64_t* bt = tables.data_ptr<int64_t>();
  const int64_t *np = lens.data_ptr<int64_t>(), *rp = res.data_ptr<int64_t>(), max_blocks = tables.size(1);
  const int64_t per = 8 / bits, maxq = (1 << bits) - 1, ld = KVH * D;
  uint8_t* packed = values.data_ptr<uint8_t>();
  with_ring_type(residual, [&](auto* rk) {
    auto* rv = rk + R * ld;
    // Every row's entry into its ring first, then the blocks they complete: a sequence's rows of a step (a
    // token and its drafts) seal a block from entries its other rows wrote.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = np[b], pos = n - 1, at = rp[b];
        TORCH_CHECK(n >= 1 && at >= 0 && at % bs == 0 && at - at % RL + RL <= R && pos / bs < max_blocks,
                    "lowbit_decode_write_: slot out of range");
        write_rows(rk + ring_slot(at, pos, RL) * ld, k.data_ptr<float>() + b * k.stride(0), ld);
        write_rows(rv + ring_slot(at, pos, RL) * ld, v.data_ptr<float>() + b * v.stride(0), ld);
      }
    });
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> levels(bs * ld);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = np[b], pos = n - 1, at = rp[b];
        if (n % bs) continue;
        const int64_t base = ring_slot(at, pos / bs * bs, RL);  // the block's first slot: its entries follow
        const int64_t id = bt[b * max_blocks + pos / bs];
        TORCH_CHECK(id >= 0 && id < NB, "lowbit_decode_write_: block out of range");
        const auto pack = [&](uint8_t* dst) {  // levels [bs, KVH, D] into rows of PD bytes
          for (int64_t r = 0; r < bs * KVH; ++r)
            for (int64_t j = 0; j < PD; ++j) {
              uint8_t byte = 0;
              for (int64_t t = 0; t < per; ++t) byte |= levels[r * D + t * PD + j] << (bits * t);
              dst[r * PD + j] = byte;
            }
        };
        // Keys: per KV head and channel, over the block's tokens.
        for (int64_t c = 0; c < ld; ++c)
          quantize_levels(rk + base * ld + c, ld, bs, maxq, k_scale.data_ptr<c10::Half>() + id * ld + c,
                          k_min.data_ptr<c10::Half>() + id * ld + c, levels.data() + c, ld);
        pack(packed + id * bs * KVH * PD);
        // Values: per token, KV head and group of GW channels.
        for (int64_t r = 0; r < bs * KVH; ++r)
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t at = (id * bs * KVH + r) * groups + g;
            quantize_levels(rv + base * ld + r * D + g * GW, 1, GW, maxq, v_scale.data_ptr<c10::Half>() + at,
                            v_min.data_ptr<c10::Half>() + at, levels.data() + r * D + g * GW, 1);
          }
        pack(packed + (NB + id) * bs * KVH * PD);
      }
    });
  });
}
