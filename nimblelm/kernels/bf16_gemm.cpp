// packed_linear's bfloat16 products, for bfloat16 panels at several rows, where float32 FMAs bound the
// panel kernel: the activations are rounded to bfloat16 once per call and multiplied by the panels as stored, on
// AMX tiles (Intel Sapphire Rapids and later) or by AVX-512 BF16 dot products (AMD Zen 4 and later, Intel
// Cooper Lake and later), accumulating in float32. pack_panels interleaves a bfloat16 panel's k-values in
// pairs, [ceil(N / 16), Kp / 2, 16, 2], the layout both read:
// - a tile instruction (TDPBF16PS) multiplies 16 rows by 32 k-values by 16 columns, 16 times the work of
//   one float32 FMA register; a panel's 32 k-values are one 1 KiB B tile, loaded as stored. Four
//   accumulator tiles hold 32 rows by two panels; each step of 32 k-values loads two A and two B tiles for
//   four products.
// - VDPBF16PS multiplies one broadcast pair of activations by a panel's 16 columns x 2 k-values (one
//   64-byte load) and adds both products to 16 float32 accumulators: twice a float32 FMA's work, for half
//   the broadcasts. A tile is 12 rows by two panels, as the panel kernel's.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <vector>

#include "ops.h"
#include "panel_tile.h"
#include "tiles.h"

// Which products serve, and from how many rows. Tiles from 8 rows (half a tile) beat the panel kernel's
// float32 FMAs on SmolLM2's layers: 337 against 258 GFLOP/s at 8 rows, 668 against 297 at 16, 1549
// against 354 at 512 (1536 x 576, 2 threads, Xeon with AMX, benchmarks/scripts/half_linear.py,
// 2026-12-04); at 1-4 rows every path streams the weights at the same speed from memory. Dot products take
// the same 8 rows, untimed where they could win (AMD Zen 4): on that Xeon they reach 201-225 GFLOP/s, under
// the panel kernel, which is why kernels/__init__.py switches them on only where a start-up probe finds
// them faster.
enum Products { OFF, DOT, AMX };
constexpr int64_t MIN_ROWS[] = {0, 8, 8};
static std::atomic<int> products{OFF};

#if defined(__AVX512BF16__)
#include <immintrin.h>

// x [M, K] float32 -> [Mp, Kp] bfloat16 (round to nearest even), zero padded to whole tiles; rows [m0, m1). Tiled,
// the rows are laid out as whole AMX A tiles instead, 1 KiB each: [Mp / 16][Kp / 32][16 rows][32 k-values].
static void round_rows(const float* x, int64_t M, int64_t K, at::BFloat16* xb, int64_t m0, int64_t m1, int64_t Kp,
                       bool tiled = false) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t k = 0; k < Kp; k += 32) {
      const int64_t lo = m < M ? std::clamp<int64_t>(K - k, 0, 16) : 0;
      const int64_t hi = m < M ? std::clamp<int64_t>(K - k - 16, 0, 16) : 0;
      const __m512 a = _mm512_maskz_loadu_ps(__mmask16((1u << lo) - 1), x + m * K + k);
      const __m512 b = _mm512_maskz_loadu_ps(__mmask16((1u << hi) - 1), x + m * K + k + 16);
      at::BFloat16* out = tiled ? xb + ((m / 16 * Kp + k) * 16 + m % 16 * 32) : xb + m * Kp + k;
      _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

// Each thread's copy of the rounded activations, kept between calls: every thread rounds all rows itself,
// which at 32 rows is cheaper than a parallel region of its own and its wait (a 64-column call on AMX:
// 7.0 us against 15.5).
static const at::BFloat16* rounded(const float* x, int64_t M, int64_t K, int64_t Mp, int64_t Kp) {
  thread_local std::vector<at::BFloat16> xb;
  xb.resize(Mp * Kp);
  round_rows(x, M, K, xb.data(), 0, Mp, Kp);
  return xb.data();
}

#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

// Linux hands out the 8 KiB of tile state only to a process that asks (arch_prctl, XTILEDATA); a VM or
// kernel may refuse, and then AMX is not offered.
static bool amx_permitted() {
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

// Tiles 0-3: float32 accumulators (rows 0-15 and 16-31, by panels p and p + 1); 4-5: activations; 6-7: panels.
static void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

// Where an A tile (16 rows x 32 k-values) lies: the tile of k-values k at p + k * k_step, its rows stride bytes
// apart, and the next 16 rows' tile next16 values on.
struct ATiles {
  const at::BFloat16* p;
  int64_t k_step, stride, next16;
  static ATiles rows(const at::BFloat16* p, int64_t ld) { return {p, 1, ld * 2, 16 * ld}; }
  static ATiles tiles(const at::BFloat16* p, int64_t Kp) { return {p, 16, 64, 16 * Kp}; }
};

// c[32][32] = 16 or 32 rows of a times one or two panels (ldb values apart), kp deep.
// prefetch: two panels further on, to L2 while these are multiplied (weights streaming from DRAM, 200
// SmolLM2-shaped layers, 32 rows, 2 threads, Xeon, 2026-12-04: 24.2 GB/s against 22.0 without; the
// next pair of panels instead: 23.0, four pairs on: 22.6).
template <bool TWO_ROWS, bool TWO_PANELS>
static void tile_block(const ATiles& a, const at::BFloat16* b, int64_t ldb, int64_t kp, float* c,
                       const at::BFloat16* prefetch) {
  _tile_zero(0);
  if constexpr (TWO_PANELS) _tile_zero(1);
  if constexpr (TWO_ROWS) _tile_zero(2);
  if constexpr (TWO_ROWS && TWO_PANELS) _tile_zero(3);
  for (int64_t k = 0; k < kp; k += 32) {
    if (prefetch) {
      for (int64_t i = 0; i < 32 * 16; i += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * 16 + i), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + ldb + k * 16 + i), _MM_HINT_T1);
      }
    }
    _tile_loadd(4, a.p + k * a.k_step, a.stride);
    _tile_loadd(6, b + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (TWO_PANELS) {
      _tile_loadd(7, b + ldb + k * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (TWO_ROWS) {
      _tile_loadd(5, a.p + a.next16 + k * a.k_step, a.stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (TWO_PANELS) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 32 * 4);
  if constexpr (TWO_PANELS) _tile_stored(1, c + 16, 32 * 4);
  if constexpr (TWO_ROWS) _tile_stored(2, c + 16 * 32, 32 * 4);
  if constexpr (TWO_ROWS && TWO_PANELS) _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
}

// Rows a thread runs against each of its panel pairs before the next pair: the rounded activations of that many
// rows stay in L2 (SmolLM2-shaped 1536 x 576 layers, 2 threads, Xeon with AMX, half_linear.py, two alternated
// runs, 2026-12-06: 1024 rows 1561-1770 GFLOP/s against 1372-1574 with all rows at once, 4096 rows 1606-1658
// against 1190-1378; no change up to 512).
constexpr int64_t AMX_ROW_BLOCK = 256;

// From this many rows (a prompt's), the activations are rounded once, by all threads, into whole A tiles (1 KiB
// each, contiguous), and the outputs bypass the caches (streaming stores): writing them was about half of a
// call, each row block's outputs being 128-byte pieces of rows far apart, every line fetched before it was
// written. Against every thread rounding all rows and plain stores, alternated in one process (Xeon with AMX, 2
// threads, 2026-12-06; 30 layers of each of SmolLM2's shapes): 256 rows 1038-1237 -> 1208-1720 GFLOP/s, 2048
// rows 664-1239 -> 1308-1839; Qwen2.5-Coder-1.5B's at 512 rows 537-1578 -> 1046-2276; a prefill step of 16 x
// 128 tokens on SmolLM2 in bfloat16 925-961 -> 654-680 ms. Under 256 rows (decode steps) every thread rounds all
// rows for itself, as `rounded` says why, and the outputs stay in cache for the next op.
constexpr int64_t AMX_PROMPT_ROWS = 256;

static void amx_tiles(const float* x, const at::BFloat16* panels, float* y, int64_t M, int64_t K, int64_t Kp,
                      int64_t N) {
  const int64_t Mp = (M + 15) / 16 * 16, P = (N + 15) / 16;
  const bool prompt = M >= AMX_PROMPT_ROWS;
  const bool stream = prompt && N % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0;
  thread_local std::vector<at::BFloat16> tiled;  // the calling thread's: the threads below see their own
  if (prompt) tiled.resize(Mp * Kp);
  at::BFloat16* xt = tiled.data();
  if (prompt) {
    at::parallel_for(0, Mp / 16, 1, [&](int64_t b0, int64_t b1) {
      round_rows(x, M, K, xt, 16 * b0, 16 * b1, Kp, true);
    });
  }
  // Each thread owns a run of panel pairs and runs every row block against it: the weights stream once per
  // AMX_ROW_BLOCK rows (a layer larger than L3 from memory each time, which 256 rows of tile products outlast).
  at::parallel_for(0, (P + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
    const at::BFloat16* xb = prompt ? nullptr : rounded(x, M, K, Mp, Kp);
    configure_tiles();
    alignas(64) static thread_local float c[AMX_ROW_BLOCK * 32];
    for (int64_t m0 = 0; m0 < Mp; m0 += AMX_ROW_BLOCK) {
      const int64_t m1 = std::min(Mp, m0 + AMX_ROW_BLOCK);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t p = 2 * q, cols = std::min<int64_t>(32, N - p * 16);
        const at::BFloat16* b = panels + p * Kp * 16;
        for (int64_t m = m0; m < m1; m += 32) {
          const ATiles a = prompt ? ATiles::tiles(xt + m * Kp, Kp) : ATiles::rows(xb + m * Kp, Kp);
          const bool two_rows = m + 16 < Mp, two_panels = cols > 16;
          const at::BFloat16* next = m == m0 && q + 2 < q1 ? b + 4 * Kp * 16 : nullptr;
          float* cm = c + (m - m0) * 32;
          if (two_rows && two_panels) tile_block<true, true>(a, b, Kp * 16, Kp, cm, next);
          else if (two_rows) tile_block<true, false>(a, b, Kp * 16, Kp, cm, next);
          else if (two_panels) tile_block<false, true>(a, b, Kp * 16, Kp, cm, next);
          else tile_block<false, false>(a, b, Kp * 16, Kp, cm, next);
        }
        for (int64_t r = m0; r < std::min(M, m1); ++r) {
          const float* cr = c + (r - m0) * 32;
          float* yr = y + r * N + p * 16;
          if (!stream) {
            std::copy_n(cr, cols, yr);
            continue;
          }
          _mm512_stream_ps(yr, _mm512_load_ps(cr));
          if (cols > 16) _mm512_stream_ps(yr + 16, _mm512_load_ps(cr + 16));
        }
      }
    }
    _tile_release();
    if (stream) _mm_sfence();  // the streamed outputs are in memory before another thread reads them
  });
}
#endif

#if defined(__AVX512BF16__)
// filled_panels_linear: k-values per slice. Each slice of the rounded activations (up to FILLED_M rows, 512 KiB)
// stays in L2 while a thread's panels are made and multiplied against it, and two panels' slice (32 KiB) in L1.
constexpr int64_t FILLED_KC = 512;
constexpr int64_t FILLED_M = 512;  // rows of one pass; more rows take several, each making the panels again

static void filled_pass(const float* x, int64_t M, int64_t K, int64_t N, const PanelFill& fill, float* y) {
  const int64_t Mp = (M + 15) / 16 * 16, P = (N + NR - 1) / NR;
  std::vector<at::BFloat16> xb(Mp * K);
  at::parallel_for(0, Mp / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      round_rows(x + b * 16 * K, std::clamp<int64_t>(M - b * 16, 0, 16), K, xb.data() + b * 16 * K, 0, 16, K);
  });
  [[maybe_unused]] const bool amx = products == AMX;
  // Each thread owns a run of panel pairs: every weight is made into a panel once a pass.
  at::parallel_for(0, (P + 1) / 2, 1, [&](int64_t q0, int64_t q1) {
    thread_local std::vector<at::BFloat16> panels;
    panels.resize(2 * FILLED_KC * NR);
    at::BFloat16* b = panels.data();
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx) configure_tiles();
    alignas(64) float c[32 * 32];
#endif
    for (int64_t k0 = 0; k0 < K; k0 += FILLED_KC) {
      const int64_t kc = std::min(FILLED_KC, K - k0);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t p = 2 * q, cols = std::min<int64_t>(32, N - p * NR);
        fill(p, k0, kc, b);
        if (cols > NR) fill(p + 1, k0, kc, b + kc * NR);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
        if (amx) {
          for (int64_t m = 0; m < Mp; m += 32) {
            const at::BFloat16* a = xb.data() + m * K + k0;
            const bool two_rows = m + 16 < Mp, two_panels = cols > NR;
            if (two_rows && two_panels) tile_block<true, true>(ATiles::rows(a, K), b, kc * NR, kc, c, nullptr);
            else if (two_rows) tile_block<true, false>(ATiles::rows(a, K), b, kc * NR, kc, c, nullptr);
            else if (two_panels) tile_block<false, true>(ATiles::rows(a, K), b, kc * NR, kc, c, nullptr);
            else tile_block<false, false>(ATiles::rows(a, K), b, kc * NR, kc, c, nullptr);
            const __mmask16 lo = __mmask16((1u << std::min<int64_t>(cols, 16)) - 1);
            const __mmask16 hi = __mmask16((1u << std::max<int64_t>(cols - 16, 0)) - 1);
            for (int64_t r = m; r < std::min(M, m + 32); ++r) {
              float* yr = y + r * N + p * NR;
              const float* cr = c + (r - m) * 32;
              __m512 v0 = _mm512_loadu_ps(cr), v1 = _mm512_loadu_ps(cr + 16);
              if (k0 > 0) {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, yr));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, yr + 16));
              }
              _mm512_mask_storeu_ps(yr, lo, v0);
              _mm512_mask_storeu_ps(yr + 16, hi, v1);
            }
          }
          continue;
        }
#endif
        const int32_t* pairs = reinterpret_cast<const int32_t*>(xb.data());
        for (int64_t m = 0; m < M; m += MR) {
          const int64_t rows = std::min(MR, M - m);
          if (cols > NR)
            dot_rows<2>(rows, pairs + m * (K / 2) + k0 / 2, K / 2, b, kc * NR, kc / 2, y + m * N + p * NR, N, k0 > 0,
                        cols, nullptr);
          else
            dot_rows<1>(rows, pairs + m * (K / 2) + k0 / 2, K / 2, b, kc * NR, kc / 2, y + m * N + p * NR, N, k0 > 0,
                        cols, nullptr);
        }
      }
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx) _tile_release();
#endif
  });
}
#endif


static bool offered(Products kind) {
  switch (kind) {
#if defined(__AVX512BF16__)
    case DOT: return true;
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    case AMX: return amx_permitted();
#endif
    default: return kind == OFF;
  }
}

int64_t set_bf16_products(const std::string& kind) {
  const Products want = kind == "amx" ? AMX : kind == "dot" ? DOT : OFF;
  TORCH_CHECK(want != OFF || kind == "off", "set_bf16_products: \"amx\", \"dot\" or \"off\", not \"", kind, "\"");
  products = offered(want) ? want : OFF;
  return bf16_product_rows();
}

std::string bf16_products() { return products == AMX ? "amx" : products == DOT ? "dot" : "off"; }

int64_t bf16_product_rows() { return MIN_ROWS[products]; }

bool amx_linear(const float* x, const at::BFloat16* panels, float* y, int64_t M, int64_t K, int64_t Kp, int64_t N) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if (products == AMX && M >= MIN_ROWS[AMX]) return amx_tiles(x, panels, y, M, K, Kp, N), true;
#endif
  return false;
}

bool filled_panels_linear(const float* x, int64_t M, int64_t K, int64_t N, const PanelFill& fill, float* y) {
#if defined(__AVX512BF16__)
  if (products == OFF || M < MIN_ROWS[products] || K % 32) return false;
  for (int64_t m0 = 0; m0 < M; m0 += FILLED_M) filled_pass(x + m0 * K, std::min(FILLED_M, M - m0), K, N, fill, y + m0 * N);
  return true;
#else
  return false;
#endif
}

const int32_t* dot_pairs(const float* x, int64_t M, int64_t K, int64_t Kp) {
#if defined(__AVX512BF16__)
  if (products == DOT && M >= MIN_ROWS[DOT]) return reinterpret_cast<const int32_t*>(rounded(x, M, K, M, Kp));
#endif
  return nullptr;
}
