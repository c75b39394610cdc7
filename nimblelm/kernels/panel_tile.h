// The packed-panel GEMM tile: packed_linear's inner kernel (gemm.cpp), and prefill_attention's for
// Q K^T and P V (attention.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

constexpr int64_t NR = 16;       // output columns per panel: two 8-float registers

// A panel row (NR floats) is one 16-float register with AVX-512, two 8-float ones with AVX2.
#if defined(__AVX512F__)
using fvec = __m512;
constexpr int VW = 16;
static inline fvec vzero() { return _mm512_setzero_ps(); }
static inline fvec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline fvec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
static inline fvec vfma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline void vstore(float* p, fvec v) { _mm512_store_ps(p, v); }
static inline void vstoreu(float* p, fvec v) { _mm512_storeu_ps(p, v); }
static inline fvec vloadu(const float* p) { return _mm512_loadu_ps(p); }
static inline fvec vadd(fvec a, fvec b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
using fvec = __m256;
constexpr int VW = 8;
static inline fvec vzero() { return _mm256_setzero_ps(); }
static inline fvec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline fvec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline fvec vfma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float* p, fvec v) { _mm256_store_ps(p, v); }
static inline void vstoreu(float* p, fvec v) { _mm256_storeu_ps(p, v); }
static inline fvec vloadu(const float* p) { return _mm256_loadu_ps(p); }
static inline fvec vadd(fvec a, fvec b) { return _mm256_add_ps(a, b); }
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HAVE_FVEC 1
constexpr int VPP = NR / VW;  // registers per panel row
#else
constexpr int VPP = 2;
#endif
// VW weights of a panel row as floats: float32 as stored, float16 converted (F16C, which every AVX2 CPU
// has). bfloat16 panels interleave k-values in pairs (the layout AMX and dot-product instructions read,
// pack_panels), so one load holds two panel rows: vload_even and vload_odd widen one of them each, a
// bfloat16's bits being the top half of the float32 it rounds.
#if defined(__AVX512F__)
static inline fvec vload_w(const float* p) { return vload(p); }
static inline fvec vload_even(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
}
static inline fvec vload_odd(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(int(0xffff0000u))));
}
static inline fvec vload_w(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline fvec vload_w(const float* p) { return vload(p); }
static inline fvec vload_even(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
}
static inline fvec vload_odd(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi32(int(0xffff0000u))));
}
static inline fvec vload_w(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Panels a many-row tile spans: enough accumulators to keep both FMA units busy (12 of the 16 AVX2
// registers; with AVX-512's 32 registers and one register per panel row, two panels).
constexpr int TILE_PANELS = VPP == 1 ? 2 : 1;
constexpr int64_t MR = VPP == 1 ? 12 : 6;  // activation rows per tile

// Panel row k, column n: where pack_panels put it.
template <typename W>
static inline W panel_at(const W* panel, int64_t k, int64_t n) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) return panel[(k & ~int64_t(1)) * NR + 2 * n + (k & 1)];
  return panel[k * NR + n];
}

// c[r, 0:ncols] (+)= sum_k a[r, k] * b[k, 0:ncols] for ROWS rows of a (lda apart) and PANELS consecutive
// panel slices from b (ldb apart), ncols <= PANELS * NR; b is float32, bfloat16 or float16 (W). prefetch: the panels
// after these, one cache line of each per step, while these are read from memory the first time.
template <int ROWS, int PANELS, typename W = float>
static inline void panel_tile(const float* a, int64_t lda, const W* b, int64_t ldb, int64_t kc, float* c,
                              int64_t ldc, bool accumulate, int64_t ncols, const W* prefetch) {
  constexpr int COLS = PANELS * NR;
  alignas(64) float out[ROWS][COLS];
#ifdef HAVE_FVEC
  constexpr int V = VPP * PANELS;
  fvec acc[ROWS][V];
  // Fully unrolled, or gcc keeps the accumulators in memory.
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) acc[r][j] = vzero();
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    // The pair's two rows one after the other, each widened only when its FMAs need it: widening both
    // at once holds twice the weight registers, which AVX2's 16 cannot spare beside 12 accumulators.
    for (int64_t k = 0; k < kc; k += 2) {
      fvec bv[V];
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) bv[j] = vload_even(b + (j / VPP) * ldb + k * NR + (j % VPP) * VW * 2);
      if (prefetch) {
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q)
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + q * ldb + k * NR), _MM_HINT_T0);
      }
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const fvec av = vbroadcast(a + r * lda + k);
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[r][j] = vfma(av, bv[j], acc[r][j]);
      }
      if (k + 1 == kc) break;  // an odd depth's last row pairs with padding, and a has no k + 1
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) bv[j] = vload_odd(b + (j / VPP) * ldb + k * NR + (j % VPP) * VW * 2);
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const fvec av = vbroadcast(a + r * lda + k + 1);
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[r][j] = vfma(av, bv[j], acc[r][j]);
      }
    }
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      fvec bv[V];
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) bv[j] = vload_w(b + (j / VPP) * ldb + k * NR + (j % VPP) * VW);
      if (prefetch) {
#pragma GCC unroll 4
        for (int q = 0; q < PANELS; ++q)
          _mm_prefetch(reinterpret_cast<const char*>(prefetch + q * ldb + k * NR), _MM_HINT_T0);
      }
#pragma GCC unroll 16
      for (int r = 0; r < ROWS; ++r) {
        const fvec av = vbroadcast(a + r * lda + k);
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[r][j] = vfma(av, bv[j], acc[r][j]);
      }
    }
  }
  if (ncols == COLS) {  // whole tiles go straight to c
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) {
        float* cj = c + r * ldc + VW * j;
        vstoreu(cj, accumulate ? vadd(vloadu(cj), acc[r][j]) : acc[r][j]);
      }
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) vstore(out[r] + VW * j, acc[r][j]);
#else
  for (int r = 0; r < ROWS; ++r)
    for (int64_t j = 0; j < COLS; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < kc; ++k) s += a[r * lda + k] * float(panel_at(b + (j / NR) * ldb, k, j % NR));
      out[r][j] = s;
    }
#endif
  for (int r = 0; r < ROWS; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < ncols; ++j) cr[j] = accumulate ? cr[j] + out[r][j] : out[r][j];
  }
}

template <typename T>
struct not_deduced {
  using type = T;
};

// Up to R rows against PANELS panels (ldb apart); W is deduced from b alone, so prefetch may be nullptr.
template <int PANELS, int R = MR, typename W = float>
static void tile(int64_t rows, const float* a, int64_t lda, const W* b, int64_t ldb, int64_t kc, float* c,
                 int64_t ldc, bool accumulate, int64_t ncols, const typename not_deduced<W>::type* prefetch) {
  if constexpr (R > 1) {
    if (rows < R) return tile<PANELS, R - 1, W>(rows, a, lda, b, ldb, kc, c, ldc, accumulate, ncols, prefetch);
  }
  panel_tile<R, PANELS, W>(a, lda, b, ldb, kc, c, ldc, accumulate, ncols, prefetch);
}

#if defined(__AVX512BF16__)
// The tile with AVX-512 BF16 dot products, for bfloat16 panels and activations rounded to bfloat16 pairs
// (int32 each, lda pairs apart): c[r, 0:ncols] (+)= a[r] . b for ROWS rows and PANELS panels (ldb values
// apart), `pairs` k-pairs deep. One VDPBF16PS multiplies a broadcast pair by a panel's 16 columns x 2
// k-values, one 64-byte load of the pair layout, and adds both products: twice a float32 FMA's work.
template <int ROWS, int PANELS>
static inline void dot_tile(const int32_t* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, int64_t pairs, float* c,
                            int64_t ldc, bool accumulate, int64_t ncols, const c10::BFloat16* prefetch) {
  __m512 acc[ROWS][PANELS];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < PANELS; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < pairs; ++kk) {
    __m512bh bv[PANELS];
#pragma GCC unroll 2
    for (int j = 0; j < PANELS; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + j * ldb + kk * 2 * NR);
    if (prefetch) {
#pragma GCC unroll 2
      for (int j = 0; j < PANELS; ++j) _mm_prefetch(reinterpret_cast<const char*>(prefetch + j * ldb + kk * 2 * NR), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(a[r * lda + kk]);
#pragma GCC unroll 2
      for (int j = 0; j < PANELS; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < PANELS; ++j) {
    const __mmask16 keep = __mmask16((1u << std::min<int64_t>(std::max<int64_t>(ncols - NR * j, 0), NR)) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      float* cj = c + r * ldc + NR * j;
      _mm512_mask_storeu_ps(cj, keep, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(keep, cj), acc[r][j]) : acc[r][j]);
    }
  }
}

// Up to R rows: dot_tile with the row count as a constant.
template <int PANELS, int R = MR>
static void dot_rows(int64_t rows, const int32_t* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, int64_t pairs,
                     float* c, int64_t ldc, bool accumulate, int64_t ncols, const c10::BFloat16* prefetch) {
  if constexpr (R > 1) {
    if (rows < R) return dot_rows<PANELS, R - 1>(rows, a, lda, b, ldb, pairs, c, ldc, accumulate, ncols, prefetch);
  }
  dot_tile<R, PANELS>(a, lda, b, ldb, pairs, c, ldc, accumulate, ncols, prefetch);
}
#endif
