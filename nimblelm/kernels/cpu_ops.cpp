// CPU kernels for the model's forward pass, where eager torch is bound by per-op overhead and by GEMM
// kernels tuned for other shapes.
//
// packed_linear: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for any number of rows m, with w stored
// once at load as panels of 16 output columns, [ceil(N / 16), K, 16] (pack_panels). The inner loop
// multiplies up to 6 activation rows, each value broadcast, by one 16-wide panel row held in two AVX2
// registers: 12 accumulators, 12 FMAs per 8 loads, so it is bound by arithmetic rather than by loads,
// and every panel streams from memory once per pass in the order it is stored. With AVX-512 a panel row
// is one register, and a tile is 12 rows by two panels (24 accumulators). One or two rows (batch-1
// decode) read several panels side by side instead, which streams the weights faster (skinny_panels). At
// 8-64 rows (batched decode) the AVX2 tile took 0.6-0.75x the time of the row-major dot-product kernel it
// replaces and of torch's GEMM, and about the same as torch's GEMM at 512 rows (SmolLM2's layers, one
// thread, 2026-11-28). On an AVX-512 Xeon, 30 rows through SmolLM2's 120 layers took 55.0 ms with the
// 12 x 2 tile against 90.9 with the AVX2 one, 256 rows 377 against 664 (2 threads, medians of 8, the
// two builds alternately, 2026-11-29).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

static inline float dot1(const float* x, const float* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; k < K; ++k) s += w[k] * x[k];
  return s;
}
#else
static inline float dot1(const float* x, const float* w, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += w[k] * x[k];
  return s;
}

#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp of 8 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-5 polynomial, 2^n
// put straight into the exponent bits. About 1 ulp over [-87, 88]; inputs are clamped to that range.
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact products
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// s[i] *= scale in place; returns their maximum.
static float scale_max_(float* s, int64_t n, float scale) {
  int64_t i = 0;
  float mx = -INFINITY;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 vmx = _mm256_set1_ps(-INFINITY);
  const __m256 sc = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + i), sc);
    _mm256_storeu_ps(s + i, x);
    vmx = _mm256_max_ps(vmx, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmx);
  mx = *std::max_element(lanes, lanes + 8);
#endif
  for (; i < n; ++i) mx = std::max(mx, s[i] *= scale);
  return mx;
}

// s[i] = exp(s[i] - shift) in place; returns their sum.
static float exp_shifted_(float* s, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 sh = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), sh));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum(acc);
#endif
  for (; i < n; ++i) total += (s[i] = std::exp(s[i] - shift));
  return total;
}

constexpr int64_t NR = 16;       // output columns per panel: two 8-float registers
constexpr int64_t MC = 72;       // rows per pass over a panel slice
constexpr int64_t KC_MAX = 1024; // deepest slice: a slice (64 KiB) and 72 rows of it (288 KiB) stay in L2

// w [N, K] -> panels [ceil(N / 16), K, 16]: panel p is w[16p : 16p + 16, :] transposed, zero padded.
torch::Tensor pack_panels(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_panels: a float32 matrix only");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto padded = w.contiguous();
  if (N % NR) {
    padded = torch::zeros({P * NR, K}, w.options());
    padded.narrow(0, 0, N).copy_(w);
  }
  return padded.view({P, NR, K}).transpose(1, 2).contiguous();
}

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
// Panels a many-row tile spans: enough accumulators to keep both FMA units busy (12 of the 16 AVX2
// registers; with AVX-512's 32 registers and one register per panel row, two panels).
constexpr int TILE_PANELS = VPP == 1 ? 2 : 1;
constexpr int64_t MR = VPP == 1 ? 12 : 6;  // activation rows per tile

// c[r, 0:ncols] (+)= sum_k a[r, k] * b[k, 0:ncols] for ROWS rows of a (lda apart) and PANELS consecutive
// panel slices from b (ldb apart), ncols <= PANELS * NR. prefetch: the panels after these, one cache line
// of each per step, while these are read from memory the first time.
template <int ROWS, int PANELS>
static inline void panel_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c,
                              int64_t ldc, bool accumulate, int64_t ncols, const float* prefetch) {
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
  for (int64_t k = 0; k < kc; ++k) {
    fvec bv[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) bv[j] = vload(b + (j / VPP) * ldb + k * NR + (j % VPP) * VW);
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
      const float* bq = b + (j / NR) * ldb + j % NR;
      float s = 0.f;
      for (int64_t k = 0; k < kc; ++k) s += a[r * lda + k] * bq[k * NR];
      out[r][j] = s;
    }
#endif
  for (int r = 0; r < ROWS; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < ncols; ++j) cr[j] = accumulate ? cr[j] + out[r][j] : out[r][j];
  }
}

// Up to R rows against PANELS panels (ldb apart).
template <int PANELS, int R = MR>
static void tile(int64_t rows, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c,
                 int64_t ldc, bool accumulate, int64_t ncols, const float* prefetch) {
  if constexpr (R > 1) {
    if (rows < R) return tile<PANELS, R - 1>(rows, a, lda, b, ldb, kc, c, ldc, accumulate, ncols, prefetch);
  }
  panel_tile<R, PANELS>(a, lda, b, ldb, kc, c, ldc, accumulate, ncols, prefetch);
}

// One or two rows against a thread's run of panels [p0, p1), several panels at a time: more weight
// streams in flight per core read memory faster. Two streams against one: about 1.2x on an AMD EPYC
// (AVX2, 120 SmolLM2-shaped layers, 2 threads, 2026-11-28); four against two, one register per panel
// row: 22.1 against 24.4 ms a batch-1 pass over SmolLM2's layers on an AVX-512 Xeon, medians of 10
// alternated (eight streams were slower, as was a software prefetch of the next panels; 2026-11-29).
constexpr int SKINNY_PANELS = VPP == 1 ? 4 : 2;

template <int PANELS>
static int64_t skinny_run(int64_t rows, const float* x, int64_t K, const float* w, int64_t p, int64_t p1, int64_t N,
                          float* y) {
  const int64_t ld = K * NR;
  for (; p + PANELS <= p1; p += PANELS) {
    const int64_t ncols = std::min(PANELS * NR, N - p * NR);
    if (rows == 1) panel_tile<1, PANELS>(x, K, w + p * ld, ld, K, y + p * NR, N, false, ncols, nullptr);
    else panel_tile<2, PANELS>(x, K, w + p * ld, ld, K, y + p * NR, N, false, ncols, nullptr);
  }
  return p;
}

static void skinny_panels(int64_t rows, const float* x, int64_t K, const float* w, int64_t p0, int64_t p1, int64_t N,
                          float* y) {
  int64_t p = skinny_run<SKINNY_PANELS>(rows, x, K, w, p0, p1, N, y);
  if constexpr (SKINNY_PANELS > 2) p = skinny_run<2>(rows, x, K, w, p, p1, N, y);
  if (p < p1) tile<1>(rows, x, K, w + p * K * NR, K * NR, K, y + p * NR, N, false, std::min(NR, N - p * NR), nullptr);
}

// y = x @ w.T (+ bias) for x [M, K] and w as pack_panels stored it; N is w's row count before padding.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t N, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(1) == x.size(1) && panels.size(2) == NR &&
                  panels.size(0) == (N + NR - 1) / NR, "packed_linear: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && panels.scalar_type() == at::kFloat, "packed_linear: float32 only");
  TORCH_CHECK(x.is_contiguous() && panels.is_contiguous(), "packed_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t slices = (K + KC_MAX - 1) / KC_MAX, KC = (K + slices - 1) / slices;
  // Each thread owns a run of panels; activations are re-read from cache instead.
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    if (M <= 2) return skinny_panels(M, xp, K, wp, p0, p1, N, yp);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t m1 = std::min(M, m0 + MC);
        for (int64_t p = p0; p < p1; p += TILE_PANELS) {
          const int64_t panels = std::min<int64_t>(TILE_PANELS, p1 - p);
          const float* b = wp + (p * K + k0) * NR;
          const float* next = p + panels + panels <= P ? b + panels * K * NR : nullptr;
          const int64_t ncols = std::min(panels * NR, N - p * NR);
          for (int64_t m = m0; m < m1; m += MR) {
            const int64_t rows = std::min(MR, m1 - m);
            const float* pf = m == m0 ? next : nullptr;
            if (panels == TILE_PANELS)
              tile<TILE_PANELS>(rows, xp + m * K + k0, K, b, K * NR, kc, yp + m * N + p * NR, N, k0 > 0, ncols, pf);
            else
              tile<1>(rows, xp + m * K + k0, K, b, K * NR, kc, yp + m * N + p * NR, N, k0 > 0, ncols, pf);
          }
        }
      }
    }
  });
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "packed_linear: bad bias");
    y.add_(*bias);
  }
  return y;
}

// The bias as a pointer (nullptr without one), checked against the N outputs of `op`.
static const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, op, ": bad bias");
  return bias->data_ptr<float>();
}

// int8_linear: y = x @ (q * scales).T (+ bias) for int8 weights q [N, K] with one float32 scale per
// group of `group` input channels (scales [N, K / group], group 16 or a multiple of 32). Each activation row
// is quantized on the fly to int8 per block of 32 values (one float32 scale per block, as llama.cpp's
// Q8_0 x Q8_0 dot product does), so the inner loop is integer multiply-adds on 32 values per
// instruction and a decode step reads about a quarter of the fp32 bytes.
constexpr int64_t QBLOCK = 32;

// Row tiles. The weight-only kernels take a weight in one of two layouts, told apart by its shape:
// - rows: q [N, B] (B bytes a row), scales (and int4 mins) [N, G];
// - tiles of four rows: q [N / 4, 4 * B], scales [N / 4, 4 * G]. The 32-byte unit u of row r of a tile
//   is at byte 128 u + 32 r of the tile's row, the value of group g of row r at 4 g + r.
// A kernel works on four rows at once; tiled, those rows stream from one contiguous range instead of
// four. At batch 1 on Qwen2.5-Coder-1.5B's 28 decoder layers (2 threads, the kernels before and after
// timed alternately, 2026-11-29) int4 took 34.3 ms tiled against 43.5 in rows, int8 65.0 against 75.6.
struct RowTile {
  int64_t q_row, q_unit;   // bytes from one row's unit to the next row's, and to the row's next unit
  int64_t s_row, s_group;  // scales (and mins): floats to the next row's value, and to the next group's
};

// The layout of q [?, ?] against the row bytes B and groups G of the weight it holds; checks its shapes.
static RowTile row_tile(const torch::Tensor& q, const torch::Tensor& scales, int64_t row_bytes, int64_t groups,
                        const char* op) {
  if (q.size(1) == row_bytes) {
    TORCH_CHECK(scales.size(0) == q.size(0) && scales.size(1) == groups, op, ": scales must be [N, K / group]");
    return {row_bytes, QBLOCK, groups, 1};
  }
  TORCH_CHECK(q.size(1) == 4 * row_bytes && row_bytes % QBLOCK == 0 && scales.size(0) == q.size(0) &&
                  scales.size(1) == 4 * groups,
              op, ": a tiled weight is [N / 4, 4 * row bytes] (row bytes a multiple of 32), its scales [N / 4, 4 * K / group]");
  return {QBLOCK, 4 * QBLOCK, 1, 4};
}

// One int8 scale per `span` values (QBLOCK, or the whole row for W8A8's per-token activations), written
// to d once per block of 32 so the dot products read every layout alike.
static void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* d, int64_t span = QBLOCK) {
  for (int64_t b0 = 0; b0 < K; b0 += span) {
    float amax = 0.f;
    for (int64_t k = b0; k < b0 + span; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    std::fill(d + b0 / QBLOCK, d + (b0 + span) / QBLOCK, scale);
    for (int64_t k = b0; k < b0 + span; ++k) q[k] = int8_t(std::nearbyint(x[k] * inv));
  }
}

// Rows ahead to prefetch: without it the int8 rows streamed at ~4 GB/s, a third of what fp32 rows
// reach, as the integer arithmetic leaves fewer loads in flight.
constexpr int64_t PREFETCH_ROWS = 16;

#if defined(__AVX2__) && defined(__FMA__)
// Sum over the 32 int8 pairs of a and b as 8 int32 lanes. maddubs wants unsigned x signed, so a's
// sign moves onto b; pairs of products stay within int16 as |a|, |b| <= 127.
static inline __m256i dot32_i8(__m256i a, __m256i b) {
  const __m256i prod16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
  return _mm256_madd_epi16(prod16, _mm256_set1_epi16(1));
}

// Four weight rows (from q and s, laid out as t says) against one quantized activation row. TILED
// makes the tile's strides constants, which the loop's address arithmetic then folds.
template <bool TILED>
static inline void int8_dot4_(const int8_t* xq, const float* xd, const int8_t* q, const float* s, int64_t K,
                              int64_t group, const RowTile& layout, float* out) {
  const RowTile t = TILED ? RowTile{QBLOCK, 4 * QBLOCK, 1, 4} : layout;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t ahead = PREFETCH_ROWS * K;
  auto block = [&](int64_t k, int r, __m256i xv, __m256 d) {
    const int8_t* w = q + r * t.q_row + k / QBLOCK * t.q_unit;
    _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(xv, wv)), d, acc[r]);
  };
  if (group == 16) {
    // Two groups per block of 32 (Q6_K's scales): dot32_i8's lanes 0-3 sum bytes 0-15 and lanes 4-7
    // bytes 16-31, so one vector of two scales, each in four lanes, scales both halves at once.
    for (int64_t k = 0; k < K; k += QBLOCK) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
      const float dx = xd[k / QBLOCK];
      for (int r = 0; r < 4; ++r) {
        const float* sr = s + r * t.s_row + k / 16 * t.s_group;
        block(k, r, xv, _mm256_set_m128(_mm_set1_ps(dx * sr[t.s_group]), _mm_set1_ps(dx * sr[0])));
      }
    }
  } else {
    for (int64_t j = 0; j < K / group; ++j) {  // groups outside, blocks inside: no division in the loop
      for (int64_t k = j * group; k < (j + 1) * group; k += QBLOCK) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
        const float dx = xd[k / QBLOCK];
        for (int r = 0; r < 4; ++r) block(k, r, xv, _mm256_set1_ps(dx * s[r * t.s_row + j * t.s_group]));
      }
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum(acc[r]);
}

static inline void int8_dot4(const int8_t* xq, const float* xd, const int8_t* q, const float* s, int64_t K,
                             int64_t group, const RowTile& t, float* out) {
  (t.q_row == QBLOCK ? int8_dot4_<true> : int8_dot4_<false>)(xq, xd, q, s, K, group, t, out);
}

// Blocks 2i and 2i + 1 of a row are 32 consecutive bytes: their low nibbles are the first halves of the
// two blocks, their high nibbles the second halves. With the activations laid out to match (pair_x:
// per pair, x[2i][0:16] x[2i+1][0:16] then x[2i][16:32] x[2i+1][16:32]), one load and two masks unpack
// 64 weights, and the two blocks' sums land in the low and high four lanes, scaled by one vector. With
// about half the instructions per weight, SmolLM2's 121 int4 layers took 6.3-6.4 ms a batch-1 step
// against 8.1 a block at a time (2 threads, the two timed alternately, 2026-11-28).
constexpr int64_t QPAIR = 2 * QBLOCK;

// pair_x's layout of one quantized activation row, plus per pair: the blocks' scales (dxv) and sums
// (xbv), each in the four lanes of its block; xbv holds a quarter of the sum, as the lanes add up again.
static void pair_x(const int8_t* xq, const float* xd, int64_t K, int8_t* xp, float* dxv, float* xbv) {
  for (int64_t i = 0; i < K / QPAIR; ++i) {
    const int8_t* a = xq + i * QPAIR;
    int8_t* o = xp + i * QPAIR;
    std::copy(a, a + 16, o);
    std::copy(a + 32, a + 48, o + 16);
    std::copy(a + 16, a + 32, o + 32);
    std::copy(a + 48, a + 64, o + 48);
    for (int h = 0; h < 2; ++h) {
      int32_t total = 0;
      for (int64_t k = 0; k < QBLOCK; ++k) total += a[h * QBLOCK + k];
      const float d = xd[2 * i + h];
      std::fill(dxv + 8 * i + 4 * h, dxv + 8 * i + 4 * h + 4, d);
      std::fill(xbv + 8 * i + 4 * h, xbv + 8 * i + 4 * h + 4, 0.25f * float(total) * d);
    }
  }
}

// Sums of a pair of blocks against pair_x's layout: lanes 0-3 add up to block 2i's, lanes 4-7 to 2i+1's.
static inline __m256 int4_pair_sums(__m256i xlo, __m256i xhi, const uint8_t* packed) {
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  const __m256i lo = _mm256_and_si256(bytes, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
  // Each int16 is at most 2 * 2 * 15 * 127 = 7620: the two halves add without overflow.
  const __m256i sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, _mm256_set1_epi16(1)));
}

// Row r's values (of scales or mins v, laid out as t says) of groups g and g2, in the low and high four lanes.
static inline __m256 group_pair(const float* v, int r, int64_t g, int64_t g2, const RowTile& t) {
  const float* vr = v + r * t.s_row;
  return _mm256_set_m128(_mm_broadcast_ss(vr + g2 * t.s_group), _mm_broadcast_ss(vr + g * t.s_group));
}

// Four weight rows (K a multiple of 64) against one activation row from pair_x, the minimums included:
// sum_k x[k] * (scale q[k] + min) = scale (q . x) + min sum(x) per group; without stored minimums
// (symmetric, min = -8 scale) that is scale (q . x - 8 sum(x)), one multiply-add fewer. The variants are
// templates so that the loop holds no branch and few enough vectors to stay in registers (with many
// activation rows the weights sit in L1 and the loop's arithmetic is what counts).
template <bool MINS, bool PACKED8>
static inline void int4_dot4_pairs_(const int8_t* xp, const float* dxv, const float* xbv, const uint8_t* q,
                                    const float* s, const float* mins, int64_t K, int64_t group, const RowTile& t,
                                    float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t ahead = PREFETCH_ROWS * K / 2, pairs_per_group = std::max<int64_t>(group / QPAIR, 1);
  for (int64_t i = 0; i < K / QPAIR; ++i) {
    const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + i * QPAIR));
    const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + i * QPAIR + 32));
    const __m256 dx = _mm256_loadu_ps(dxv + 8 * i), xb = _mm256_loadu_ps(xbv + 8 * i);
    const __m256 xb8 = _mm256_mul_ps(_mm256_set1_ps(-8.f), xb);
    const int64_t g = group == QBLOCK ? 2 * i : i / pairs_per_group, g2 = group == QBLOCK ? g + 1 : g;
    // PACKED8 (tiles, groups of 32): the pair's scales of the four rows are 8 floats in a row.
    const __m256 s8 = PACKED8 ? _mm256_loadu_ps(s + 8 * i) : _mm256_setzero_ps();
    const __m256 m8 = PACKED8 && MINS ? _mm256_loadu_ps(mins + 8 * i) : _mm256_setzero_ps();
    if (t.q_row == QBLOCK) {  // a tile: the four rows' pair is two cache lines
      _mm_prefetch(reinterpret_cast<const char*>(q + ahead + i * t.q_unit), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q + ahead + i * t.q_unit + 64), _MM_HINT_T0);
    } else {
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + r * t.q_row + i * t.q_unit + ahead), _MM_HINT_T0);
    }
    for (int r = 0; r < 4; ++r) {
      const __m256i lane = _mm256_setr_epi32(r, r, r, r, r + 4, r + 4, r + 4, r + 4);
      const __m256 sv = PACKED8 ? _mm256_permutevar8x32_ps(s8, lane) : group_pair(s, r, g, g2, t);
      const __m256 sums = int4_pair_sums(xlo, xhi, q + r * t.q_row + i * t.q_unit);
      if constexpr (MINS) {
        const __m256 mv = PACKED8 ? _mm256_permutevar8x32_ps(m8, lane) : group_pair(mins, r, g, g2, t);
        acc[r] = _mm256_fmadd_ps(mv, xb, _mm256_fmadd_ps(sums, _mm256_mul_ps(dx, sv), acc[r]));
      } else {
        acc[r] = _mm256_fmadd_ps(_mm256_fmadd_ps(sums, dx, xb8), sv, acc[r]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum(acc[r]);
}

static inline void int4_dot4_pairs(const int8_t* xp, const float* dxv, const float* xbv, const uint8_t* q,
                                   const float* s, const float* mins, int64_t K, int64_t group, const RowTile& t,
                                   float* out) {
  const bool packed8 = t.s_row == 1 && group == QBLOCK;
  if (mins) {
    (packed8 ? int4_dot4_pairs_<true, true> : int4_dot4_pairs_<true, false>)(xp, dxv, xbv, q, s, mins, K, group, t, out);
  } else {
    (packed8 ? int4_dot4_pairs_<false, true> : int4_dot4_pairs_<false, false>)(xp, dxv, xbv, q, s, mins, K, group, t, out);
  }
}
#else
static inline void int8_dot4(const int8_t* xq, const float* xd, const int8_t* q, const float* s, int64_t K,
                             int64_t group, const RowTile& t, float* out) {
  const int64_t step = std::min(group, QBLOCK);  // one scale per step of values (group 16: half a block)
  for (int r = 0; r < 4; ++r) {
    float total = 0.f;
    for (int64_t k = 0; k < K; k += step) {
      const int8_t* w = q + r * t.q_row + k / QBLOCK * t.q_unit + k % QBLOCK;
      int32_t dot = 0;
      for (int64_t i = 0; i < step; ++i) dot += int32_t(xq[k + i]) * int32_t(w[i]);
      total += float(dot) * xd[k / QBLOCK] * s[r * t.s_row + k / group * t.s_group];
    }
    out[r] = total;
  }
}
#endif

// per_token: each activation row gets one int8 scale (W8A8) instead of one per block of 32.
static torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                                 c10::optional<torch::Tensor> bias, int64_t group, bool per_token) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "int8_linear: x, q and scales must be matrices");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_linear: float32 x, int8 q and float32 scales only");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scales.is_contiguous(), "int8_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK((group == 16 || (group > 0 && group % QBLOCK == 0)) && K % QBLOCK == 0 && K % group == 0,
              "int8_linear: group must be 16 or a multiple of 32 dividing K");
  const int64_t groups = K / group;
  const RowTile t = row_tile(q, scales, K, groups, "int8_linear");
  const int64_t N = q.size(0) * q.size(1) / K;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias_ptr(bias, N, "int8_linear");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * K / QBLOCK);
  for (int64_t m = 0; m < M; ++m)
    quantize_row_q8(xp + m * K, K, xq.data() + m * K, xd.data() + m * K / QBLOCK, per_token ? K : QBLOCK);
  // Tiles of four weight rows; each tile's int8 rows stay in L1 across activation rows.
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    float out[4];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * 4;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.data() + m * K;
        const float* dr = xd.data() + m * K / QBLOCK;
        if (n + 4 <= N) {
          int8_dot4(xr, dr, qp + n * K, sp + n * groups, K, group, t, out);
          for (int r = 0; r < 4; ++r) yp[m * N + n + r] = out[r] + (bp ? bp[n + r] : 0.f);
          continue;
        }
        for (int64_t r = n; r < N; ++r) {  // the last rows of a layout in rows, fewer than four: scalar
          float total = 0.f;
          const int64_t step = std::min(group, QBLOCK);
          for (int64_t k = 0; k < K; k += step) {
            int32_t dot = 0;
            for (int64_t i = k; i < k + step; ++i) dot += int32_t(xr[i]) * int32_t(qp[r * K + i]);
            total += float(dot) * dr[k / QBLOCK] * sp[r * groups + k / group];
          }
          yp[m * N + r] = total + (bp ? bp[r] : 0.f);
        }
      }
    }
  });
  return y;
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                          int64_t group) {
  return int8_matmul(x, q, scales, bias, group, false);
}

// w8a8_linear: W8A8 as SmoothQuant defines it: int8 weights with one scale per output channel
// (scales [N, 1]) times activations rounded to int8 with one scale per token (row). The integer dot
// products are exact; only their scaled sum over blocks of 32 is float.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  return int8_matmul(x, q, scales, bias, x.size(1), true);
}

// int8_linear's weight (W8A8's with group = K) as float32 w [N, K], for a float GEMM where many activation
// rows share each weight (prefills): one pass instead of torch's untile, widen and scale.
torch::Tensor int8_dequantize(torch::Tensor q, torch::Tensor scales, int64_t K, int64_t group) {
  TORCH_CHECK(q.dim() == 2 && scales.dim() == 2 && q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat &&
                  q.is_contiguous() && scales.is_contiguous(), "int8_dequantize: contiguous int8 q and float32 scales");
  TORCH_CHECK((group == 16 || (group > 0 && group % QBLOCK == 0)) && K % QBLOCK == 0 && K % group == 0,
              "int8_dequantize: group must be 16 or a multiple of 32 dividing K");
  const int64_t groups = K / group, step = std::min(group, QBLOCK);  // values sharing a scale and a unit
  const RowTile t = row_tile(q, scales, K, groups, "int8_dequantize");
  const int64_t N = q.size(0) * q.size(1) / K;
  auto w = torch::empty({N, K}, scales.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * 4;
      for (int64_t r = 0; r < std::min<int64_t>(4, N - n); ++r) {
        float* out = wp + (n + r) * K;
        for (int64_t k = 0; k < K; k += step) {
          const int8_t* src = qp + n * K + r * t.q_row + k / QBLOCK * t.q_unit + k % QBLOCK;
          const float scale = sp[n * groups + r * t.s_row + k / group * t.s_group];
          for (int64_t i = 0; i < step; ++i) out[k + i] = float(src[i]) * scale;
        }
      }
    }
  });
  return w;
}

// int4_linear: y = x @ w.T (+ bias) for 4-bit weights w[n, k] = scales[n, g] * q[n, k] + mins[n, g] (mins
// -8 * scales when not given), q in 0..15, g = k / group (group a multiple of 32). qweight [N, K / 2] holds each block of 32 q values
// of a row in 16 bytes, q[i] in the low and q[i + 16] in the high nibble of byte i (llama.cpp's Q4_0/
// Q4_1 order), so one load and two masks give the 32 values in order; or tiles of four such rows
// (row_tile). As in int8_linear, activations are quantized per block of 32; sum_k x[k] * w[k] over a
// group is then scale * (q . x) + min * sum(x) (llama.cpp's Q4_1 x Q8_1 dot product).

// Sum over one block of 32 of x[k] * q[k], q unpacked from its 16 bytes, without the scales.
static inline int32_t int4_block_dot(const int8_t* xq, const uint8_t* packed) {
  int32_t dot = 0;
  for (int64_t i = 0; i < QBLOCK / 2; ++i)
    dot += int32_t(xq[i]) * (packed[i] & 15) + int32_t(xq[i + QBLOCK / 2]) * (packed[i] >> 4);
  return dot;
}

// Row r of a tile (q, s, mins as t lays them out) against one quantized activation row, minimums
// included (symmetric: -8 * scale).
static inline float int4_dot1(const int8_t* xq, const float* xd, const uint8_t* q, const float* s, const float* mins,
                              int64_t K, int64_t group, const RowTile& t, int r) {
  float total = 0.f;
  for (int64_t k = 0; k < K; k += QBLOCK) {
    const int64_t byte = k / 2, g = k / group;
    const uint8_t* w = q + r * t.q_row + byte / QBLOCK * t.q_unit + byte % QBLOCK;
    const float scale = s[r * t.s_row + g * t.s_group];
    const float minimum = mins ? mins[r * t.s_row + g * t.s_group] : -8.f * scale;
    int32_t xsum = 0;
    for (int64_t i = k; i < k + QBLOCK; ++i) xsum += xq[i];
    total += (float(int4_block_dot(xq + k, w)) * scale + float(xsum) * minimum) * xd[k / QBLOCK];
  }
  return total;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                          c10::optional<torch::Tensor> bias, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "int4_linear: x, q and scales must be matrices");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
                  (!mins || mins->scalar_type() == at::kFloat), "int4_linear: float32 x, uint8 q, float32 scales and mins only");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scales.is_contiguous() && (!mins || mins->is_contiguous()),
              "int4_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && group % QBLOCK == 0 && K % group == 0 && (!mins || mins->sizes() == scales.sizes()),
              "int4_linear: group must be a multiple of 32 dividing K, mins shaped as scales");
  const int64_t groups = K / group;
  const RowTile t = row_tile(q, scales, K / 2, groups, "int4_linear");
  const int64_t N = q.size(0) * q.size(1) * 2 / K;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  // Without mins the weights are symmetric, every min -8 * scale, and a decode step reads a sixth fewer
  // bytes (groups of 32).
  const float* mp = mins ? mins->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float* bp = bias_ptr(bias, N, "int4_linear");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * K / QBLOCK);
  for (int64_t m = 0; m < M; ++m) quantize_row_q8(xp + m * K, K, xq.data() + m * K, xd.data() + m * K / QBLOCK);
#if defined(__AVX2__) && defined(__FMA__)
  const bool pairs = K % QPAIR == 0;
  std::vector<int8_t> xpairs(pairs ? M * K : 0);
  std::vector<float> dxv(pairs ? M * K / QPAIR * 8 : 0), xbv(dxv.size());
  for (int64_t m = 0; pairs && m < M; ++m)
    pair_x(xq.data() + m * K, xd.data() + m * K / QBLOCK, K, xpairs.data() + m * K,
           dxv.data() + m * K / QPAIR * 8, xbv.data() + m * K / QPAIR * 8);
#endif
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    float out[4];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * 4, rows = std::min<int64_t>(4, N - n);
      const uint8_t* qt = qp + n * K / 2;
      const float* st = sp + n * groups;
      const float* mt = mp ? mp + n * groups : nullptr;
      for (int64_t m = 0; m < M; ++m) {
#if defined(__AVX2__) && defined(__FMA__)
        if (pairs && rows == 4) {
          const int64_t v = m * K / QPAIR * 8;
          int4_dot4_pairs(xpairs.data() + m * K, dxv.data() + v, xbv.data() + v, qt, st, mt, K, group, t, out);
        } else
#endif
        {
          for (int64_t r = 0; r < rows; ++r)
            out[r] = int4_dot1(xq.data() + m * K, xd.data() + m * K / QBLOCK, qt, st, mt, K, group, t, int(r));
        }
        for (int64_t r = 0; r < rows; ++r) yp[m * N + n + r] = out[r] + (bp ? bp[n + r] : 0.f);
      }
    }
  });
  return y;
}

// int4_linear's weight as float32 w [N, K], for a float GEMM where many activation rows share each weight
// (prefills): one pass over the packed bytes instead of torch's unpack, widen, scale and add. The multiply
// and the add round separately, as torch's do, so both give the same bits (no fused multiply-add).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> mins, int64_t K,
                              int64_t group) {
  TORCH_CHECK(q.dim() == 2 && scales.dim() == 2 && q.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
                  (!mins || (mins->scalar_type() == at::kFloat && mins->sizes() == scales.sizes())) &&
                  q.is_contiguous() && scales.is_contiguous() && (!mins || mins->is_contiguous()),
              "int4_dequantize: contiguous uint8 q, float32 scales and mins shaped as scales");
  TORCH_CHECK(group > 0 && group % QBLOCK == 0 && K % group == 0, "int4_dequantize: group must be a multiple of 32 dividing K");
  const int64_t groups = K / group;
  const RowTile t = row_tile(q, scales, K / 2, groups, "int4_dequantize");
  const int64_t N = q.size(0) * q.size(1) * 2 / K;
  auto w = torch::empty({N, K}, scales.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* mp = mins ? mins->data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * 4;
      for (int64_t r = 0; r < std::min<int64_t>(4, N - n); ++r) {
        float* out = wp + (n + r) * K;
        for (int64_t k = 0; k < K; k += QBLOCK) {
          const int64_t byte = k / 2, g = n * groups + r * t.s_row + k / group * t.s_group;
          const uint8_t* src = qp + n * K / 2 + r * t.q_row + byte / QBLOCK * t.q_unit + byte % QBLOCK;
          const float scale = sp[g], minimum = mp ? mp[g] : -8.f * scale;
          for (int64_t i = 0; i < QBLOCK / 2; ++i) {
            out[k + i] = float(src[i] & 15) * scale + minimum;
            out[k + i + QBLOCK / 2] = float(src[i] >> 4) * scale + minimum;
          }
        }
      }
    }
  });
  return w;
}
#pragma GCC pop_options

static void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2, name, ": contiguous 2-d float32 only");
}

static void normalize_row(const float* in, float* out, const float* w, int64_t d, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += double(in[i]) * in[i];
  const float scale = 1.0f / std::sqrt(float(ss / d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = in[i] * scale * w[i];
}

// out = rms_norm(x) * w, one pass per row instead of six elementwise ops.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "rms_norm");
  auto out = torch::empty_like(x);
  const int64_t d = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) normalize_row(xp + r * d, op + r * d, wp, d, float(eps));
  });
  return out;
}

// In place: residual += x, then x = rms_norm(residual) * w. The residual stream and the next
// layer's normalized input come out of one pass.
void add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  check_rows(x, "add_rms_norm_");
  check_rows(residual, "add_rms_norm_");
  const int64_t d = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = xp + r * d;
      float* rr = rp + r * d;
      for (int64_t i = 0; i < d; ++i) rr[i] += xr[i];
      normalize_row(rr, xr, wp, d, float(eps));
    }
  });
}

// silu(gate) * up for gate_up = [gate | up] along the last dimension.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "silu_mul");
  const int64_t T = gate_up.size(0), f = gate_up.size(1) / 2;
  auto out = torch::empty({T, f}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gp + r * 2 * f;
      const float* u = g + f;
      float* o = op + r * f;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= f; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < f; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// In place rotary embedding (rotate-half layout) of the first `heads` head_dim-wide slices of each
// row of qkv (the query heads, then the key heads); cos and sin are [tokens, head_dim].
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t head_dim) {
  check_rows(qkv, "rope_");
  check_rows(cos, "rope_");
  check_rows(sin, "rope_");
  const int64_t stride = qkv.size(1), half = head_dim / 2;
  float* qp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, qkv.size(0), 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + t * head_dim;
      const float* s = sp + t * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* x = qp + t * stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] - b * s[i];
          x[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

// k and v of the new tokens are views into the fused qkv rows: each token's heads are contiguous, tokens strided.
static void check_new_kv(const char* name, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& slots) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.dim() == 3 && v.dim() == 3,
              name, ": k and v must be float32 [tokens, kv_heads, head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), name, ": slots");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              name, ": each token's k and v heads must be contiguous");
}

// k_cache[slot] = k and v_cache[slot] = v for each new token: one call instead of two index_copy_. A
// float16 cache (kv_cache_dtype="float16") stores the rows rounded to nearest even, as torch's .half() does.
template <typename T>
static void write_rows(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
}

void write_kv_cache_(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
                     torch::Tensor slots) {
  check_new_kv("write_kv_cache_", k, v, slots);
  const auto type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && (type == at::kFloat || type == at::kHalf) &&
              v_cache.scalar_type() == type, "write_kv_cache_: cache layout");
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
    } else {
      write_rows(k_cache.data_ptr<at::Half>() + sp[t] * row, kp + t * ks, row);
      write_rows(v_cache.data_ptr<at::Half>() + sp[t] * row, vp + t * vs, row);
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
void write_kv_cache_int8_(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scales, torch::Tensor v_scales,
                          torch::Tensor k, torch::Tensor v, torch::Tensor slots) {
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

// Cached K/V rows are float32, float16 (kv_cache_dtype="float16"), or int8 (kv_cache_dtype="int8") with a
// float32 scale per row. float16 and int8 rows are widened to float in registers: the kernel reads a half
// or a quarter of the bytes and computes in float.
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline __m256 load8(const at::Half* p) {  // F16C comes with every AVX2 CPU
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

static inline float dot_row(const float* q, const float* row, int64_t D) { return dot1(q, row, D); }
template <typename T>
static inline float dot_row(const float* q, const T* row, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(row + d), acc);
  s = hsum(acc);
#endif
  for (; d < D; ++d) s += q[d] * float(row[d]);
  return s;
}

// scores[t] = scale * q . k_rows[t] for n cached keys of D values, times row_scales[t] when given (int8 rows).
template <typename T>
static void scores_of(const float* q, const T* const* k_rows, const float* row_scales, int64_t n, int64_t D,
                      float scale, float* scores) {
  int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    // Eight keys at a time, their eight sums reduced together by a tree of horizontal adds instead of
    // eight separate horizontal sums.
    for (; t + 8 <= n; t += 8) {
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, load8(k_rows[t + r] + d), acc[r]);
      }
      const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
      const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
      const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
      // Each 128-bit half of s0123 holds keys 0-3's sums over that half's lanes (s4567: keys 4-7);
      // low halves plus high halves are the eight totals, in key order.
      const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
      __m256 st = _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale));
      if (row_scales) st = _mm256_mul_ps(st, _mm256_loadu_ps(row_scales + t));
      _mm256_storeu_ps(scores + t, st);
    }
  }
#endif
  for (; t < n; ++t) scores[t] = dot_row(q, k_rows[t], D) * scale * (row_scales ? row_scales[t] : 1.f);
}

// out[0:D] += sum_t p[t] * v_rows[t][0:D].
template <typename T>
static void weighted_sum(const float* p, const T* const* v_rows, int64_t n, int64_t D, float* out) {
  int64_t d0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // 64 output values stay in eight registers over all n rows.
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(out + d0 + 8 * j);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 pv = _mm256_set1_ps(p[t]);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(pv, load8(v_rows[t] + d0 + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
  }
#endif
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t d = d0; d < D; ++d) out[d] += p[t] * float(v_rows[t][d]);
  }
}

// Decode attention straight from the paged cache: one query token per sequence, each KV head's
// group of query heads scored against the sequence's cached keys, so K and V are read once and never
// gathered into a padded copy. Positions before context_len - window are skipped when window > 0
// (sliding-window attention). Contexts are cut into chunks of at most ATTN_CHUNK positions, each with its
// own softmax maximum and sum (split-K, as flash-decoding does), merged at the end: a batch of one long
// sequence keeps both threads busy.
//
// T = int8_t reads an int8 cache with k_scales, v_scales [blocks, block_size, kv_heads]: a key's score is
// scale_k * (q . k_int8) and a value row is weighted by p * scale_v, so nothing is dequantized in memory.
// Widening each chunk's rows once into a float scratch shared by the group's query heads was tried and
// measured slower (SmolLM2's heads, 4096 positions, 30 layers, 1 thread: 50 ms a step against 39 here).
constexpr int64_t ATTN_CHUNK = 256;

template <typename T>
static void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                             const float* k_scales, const float* v_scales, torch::Tensor block_tables,
                             torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "paged_decode_attention: q");
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
  // Enough chunks that a small batch still gives every thread work, none longer than ATTN_CHUNK.
  const int64_t per_seq = (4 * at::get_num_threads() + B - 1) / B;
  const int64_t chunk_len = std::clamp<int64_t>((longest + per_seq - 1) / per_seq, 32, ATTN_CHUNK);
  const int64_t chunks = (longest + chunk_len - 1) / chunk_len;
  // Per (sequence, KV head, chunk, query head of the group): the chunk's score maximum, its sum of
  // exp(score - maximum), and the value rows weighted by those exps.
  std::vector<float> part_max(B * KVH * chunks * G, -INFINITY), part_sum(B * KVH * chunks * G, 0.f);
  std::vector<float> part_out(B * KVH * chunks * G * D, 0.f);

  // A work item is one chunk of one sequence, all its KV heads: a cached position's K (and V) rows of
  // all heads are contiguous, so the item streams whole blocks of the cache. Items differ in length (a
  // sequence's last chunk, sequences of different contexts), so threads take the next item as they
  // finish one instead of a fixed share each.
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(G * chunk_len), k_row_scales, v_row_scales;
    std::vector<const T*> k_rows, v_rows;
    for (int64_t item; (item = next_item.fetch_add(1)) < B * chunks;) {
      const int64_t b = item / chunks, c = item % chunks;
      const int64_t begin = first_pos(b) + c * chunk_len, end = std::min(lens[b], begin + chunk_len);
      if (begin >= end) continue;
      const int64_t n = end - begin;
      k_rows.resize(n);
      v_rows.resize(n);
      k_row_scales.resize(k_scales ? n : 0);
      v_row_scales.resize(k_scales ? n : 0);
      for (int64_t kvh = 0; kvh < KVH; ++kvh) {
        const int64_t i = (b * KVH + kvh) * chunks + c;
        const float* qg = qp + (b * H + kvh * G) * D;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t pos = begin + t, row = (bt[b * max_blocks + pos / bs] * bs + pos % bs) * KVH + kvh;
          k_rows[t] = kp + row * D;
          v_rows[t] = vp + row * D;
          if (k_scales) {
            k_row_scales[t] = k_scales[row];
            v_row_scales[t] = v_scales[row];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          scores_of(qg + g * D, k_rows.data(), k_scales ? k_row_scales.data() : nullptr, n, D, float(scale),
                    scores.data() + g * n);
        }
        float* m = part_max.data() + i * G;
        float* l = part_sum.data() + i * G;
        float* o = part_out.data() + i * G * D;
        for (int64_t g = 0; g < G; ++g) {
          float* sg = scores.data() + g * n;
          m[g] = *std::max_element(sg, sg + n);
          l[g] = exp_shifted_(sg, n, m[g]);
          if (v_scales) {  // after the sum: the softmax weights stay unscaled, the value rows get scale_v
            for (int64_t t = 0; t < n; ++t) sg[t] *= v_row_scales[t];
          }
        }
        for (int64_t g = 0; g < G; ++g) weighted_sum(scores.data() + g * n, v_rows.data(), n, D, o + g * D);
      }
    }
  });

  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t g = 0; g < G; ++g) {
        float mx = -INFINITY, total = 0.f;
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part_max[(i * chunks + c) * G + g]);
        float* dst = op + (i * G + g) * D;  // (b, kvh, g) is query head kvh * G + g of sequence b
        std::fill(dst, dst + D, 0.f);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t j = (i * chunks + c) * G + g;
          if (part_sum[j] == 0.f) continue;  // an empty chunk of a shorter sequence
          const float w = std::exp(part_max[j] - mx);
          total += w * part_sum[j];
          for (int64_t d = 0; d < D; ++d) dst[d] += w * part_out[j * D + d];
        }
        for (int64_t d = 0; d < D; ++d) dst[d] /= total;
      }
    }
  });
}

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t window) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kHalf) && v_cache.scalar_type() == type,
              "paged_decode_attention: float32 or float16 cache");
  if (type == at::kFloat)
    decode_attention<float>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, scale, window);
  else
    decode_attention<at::Half>(out, q, k_cache, v_cache, nullptr, nullptr, block_tables, context_lens, scale, window);
}

void paged_decode_attention_int8(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                 torch::Tensor k_scales, torch::Tensor v_scales, torch::Tensor block_tables,
                                 torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar,
              "paged_decode_attention_int8: int8 cache");
  TORCH_CHECK(k_scales.scalar_type() == at::kFloat && v_scales.scalar_type() == at::kFloat && k_scales.is_contiguous() &&
              v_scales.is_contiguous() && k_scales.numel() * k_cache.size(3) == k_cache.numel() &&
              v_scales.numel() * v_cache.size(3) == v_cache.numel(),
              "paged_decode_attention_int8: float32 scales [blocks, block_size, kv_heads]");
  decode_attention<int8_t>(out, q, k_cache, v_cache, k_scales.data_ptr<float>(), v_scales.data_ptr<float>(),
                           block_tables, context_lens, scale, window);
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
constexpr int64_t QB = 48;  // queries per work item

void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                       int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3, "prefill_attention: [rows, heads, dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat, "prefill_attention: float32 only");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), C = k.size(0), KVH = k.size(1);
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == D && out.sizes() == q.sizes() && H % KVH == 0 && T <= C &&
                  D % NR == 0, "prefill_attention: shapes do not match");
  for (const auto* t : {&q, &k, &v, &out})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "prefill_attention: each row's heads must be contiguous");
  const int64_t G = H / KVH, KP = (C + NR - 1) / NR, CP = KP * NR, E = D / NR;
  const int64_t sq = q.stride(0), sk = k.stride(0), sv = v.stride(0), so = out.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // kpan[kvh][panel][d][16]: keys 16 panel .. 16 panel + 15; vpan[kvh][e][c][16]: channels 16 e .. 16 e + 15.
  std::vector<float> kpan(KVH * CP * D, 0.f), vpan(KVH * E * CP * NR, 0.f);
  at::parallel_for(0, KVH * KP, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / KP, pnl = i % KP;
      for (int64_t c = pnl * NR; c < std::min(C, (pnl + 1) * NR); ++c) {
        const float* kr = kp + c * sk + h * D;
        const float* vr = vp + c * sv + h * D;
        float* kd = kpan.data() + (h * KP + pnl) * D * NR + c % NR;
        for (int64_t d = 0; d < D; ++d) kd[d * NR] = kr[d];
        for (int64_t e = 0; e < E; ++e)
          std::copy(vr + e * NR, vr + (e + 1) * NR, vpan.data() + ((h * E + e) * CP + c) * NR);
      }
    }
  });
  const int64_t blocks = (T + QB - 1) / QB, offset = C - T;
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(QB * CP);
    std::vector<float> inv_sum(QB);
    for (int64_t item; (item = next_item.fetch_add(1)) < blocks * H;) {
      // Last blocks first: they see the most keys, so the shorter items fill in at the end.
      const int64_t blk = blocks - 1 - item / H, h = item % H, kvh = h / G;
      const int64_t t0 = blk * QB, rows = std::min(QB, T - t0);
      const int64_t last = offset + t0 + rows - 1;  // the last query's position: keys up to it
      const int64_t lo = window > 0 ? std::max<int64_t>(0, offset + t0 - window + 1) / NR * NR : 0;
      const int64_t hi = (last + 1 + NR - 1) / NR * NR, n = hi - lo, ld = n;
      const float* q0 = qp + t0 * sq + h * D;
      const float* kb = kpan.data() + (kvh * KP + lo / NR) * D * NR;
      for (int64_t m = 0; m < rows; m += MR) {
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
        std::fill(s, s + first, 0.f);
        const float mx = scale_max_(s + first, end - first, float(scale));
        inv_sum[i] = 1.f / exp_shifted_(s + first, end - first, mx);
        std::fill(s + end, s + n, 0.f);
      }
      const float* vb = vpan.data() + (kvh * E * CP + lo) * NR;
      float* o0 = op + t0 * so + h * D;
      for (int64_t m = 0; m < rows; m += MR) {
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
        for (int64_t d = 0; d < D; ++d) o[d] *= inv_sum[i];
      }
    }
  });
}

// One layer's cache as layers/attention.py's KVCache: (values [2, blocks, block_size, kv_heads, head_dim] in
// float32 or float16, or int8 with float32 scales [2, blocks, block_size, kv_heads]).
using KVCache = std::tuple<torch::Tensor, c10::optional<torch::Tensor>>;

// A decode step's attention for one layer: the new k, v into the cache, then q against it into out.
static void attend_decodes(const KVCache& cache, torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                           torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                           int64_t window) {
  const auto& [kv, scales] = cache;
  if (scales) {
    write_kv_cache_int8_(kv[0], kv[1], (*scales)[0], (*scales)[1], k, v, slots);
    paged_decode_attention_int8(out, q, kv[0], kv[1], (*scales)[0], (*scales)[1], block_tables, context_lens, scale,
                                window);
  } else {
    write_kv_cache_(kv[0], kv[1], k, v, slots);
    paged_decode_attention(out, q, kv[0], kv[1], block_tables, context_lens, scale, window);
  }
}

// The decode step as one call: a whole stack of decoder layers over a batch of one-token queries.
// Each layer is the same kernels the Python model calls one by one, composed here, so the Python and
// dispatch overhead between them (about a quarter of a batch-1 step on this CPU) goes away.

// One linear layer as its LinearMethod stored it: (weight, scales, mins, bias, group, out_features).
// group 0: float32 panels from pack_panels; an int8 weight [N, K] with float32 scales [N, K / group];
// a uint8 weight [N, K / 2] of 4-bit values with float32 scales and mins [N, K / group] (no mins:
// symmetric, as int4_linear takes them); either in rows or row tiles (RowTile); group -1: W8A8,
// an int8 weight [N, K] with float32 scales [N, 1] and per-token int8 activations.
using LinearSpec = std::tuple<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
                              c10::optional<torch::Tensor>, int64_t, int64_t>;
// (input norm weight, post-attention norm weight, qkv, o, gate_up, down)
using LayerSpec = std::tuple<torch::Tensor, torch::Tensor, LinearSpec, LinearSpec, LinearSpec, LinearSpec>;

static torch::Tensor apply_linear(const LinearSpec& spec, const torch::Tensor& x) {
  const auto& [weight, scales, mins, bias, group, out_features] = spec;
  if (group == 0) return packed_linear(x, weight, out_features, bias);
  if (weight.scalar_type() == at::kByte) return int4_linear(x, weight, *scales, mins, bias, group);
  if (group < 0) return w8a8_linear(x, weight, *scales, bias);
  return int8_linear(x, weight, *scales, bias, group);
}

class DecodeStack {
 public:
  DecodeStack(std::vector<LayerSpec> layers, double eps, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : layers_(std::move(layers)), eps_(eps), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {}

  // x: [B, hidden] embeddings of the batch's new tokens; cos, sin: [B, head_dim] at their positions;
  // kv_caches: per layer a KVCache (above); window as paged_decode_attention takes it. Returns the last
  // hidden state (before the final norm), as the Python model does.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<KVCache> kv_caches,
                        torch::Tensor slots, torch::Tensor block_tables, torch::Tensor context_lens, int64_t window) {
    TORCH_CHECK(kv_caches.size() == layers_.size(), "DecodeStack: one KV cache per layer");
    const int64_t B = x.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    const double scale = 1.0 / std::sqrt(double(head_dim_));
    x = x.contiguous();
    torch::Tensor residual;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const auto& [in_norm, post_norm, qkv_proj, o_proj, gate_up_proj, down_proj] = layers_[l];
      if (l == 0) {
        residual = x;
        x = rms_norm(x, in_norm, eps_);
      } else {
        add_rms_norm_(x, residual, in_norm, eps_);
      }
      auto qkv = apply_linear(qkv_proj, x);
      rope_(qkv, cos, sin, heads_ + kv_heads_, head_dim_);
      auto q = qkv.narrow(1, 0, q_size).contiguous().view({B, heads_, head_dim_});
      auto attn = torch::empty_like(q);
      attend_decodes(kv_caches[l], attn, q, qkv.narrow(1, q_size, kv_size).view({B, kv_heads_, head_dim_}),
                     qkv.narrow(1, q_size + kv_size, kv_size).view({B, kv_heads_, head_dim_}), slots, block_tables,
                     context_lens, scale, window);
      x = apply_linear(o_proj, attn.view({B, q_size}));
      add_rms_norm_(x, residual, post_norm, eps_);
      x = apply_linear(down_proj, silu_mul(apply_linear(gate_up_proj, x)));
    }
    return x.add_(residual);
  }

 private:
  std::vector<LayerSpec> layers_;
  double eps_;
  int64_t heads_, kv_heads_, head_dim_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every op runs without the GIL: in the server, the asyncio thread streams tokens while a step computes.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, nogil, "decode attention over the paged KV cache");
  m.def("prefill_attention", &prefill_attention, nogil, "causal (and sliding-window) attention of a prompt chunk");
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, nogil,
        "decode attention over the paged int8 KV cache with per-token, per-head scales");
  m.def("write_kv_cache_", &write_kv_cache_, nogil, "write new k and v rows into their cache slots");
  m.def("write_kv_cache_int8_", &write_kv_cache_int8_, nogil, "quantize new k and v rows per head into their int8 cache slots");
  m.def("int4_linear", &int4_linear, nogil, "x @ (scales * q + mins).T (+ bias): 4-bit weights, scale and min per group");
  m.def("int4_dequantize", &int4_dequantize, nogil, "int4_linear's weight as float32 [N, K]");
  m.def("int8_dequantize", &int8_dequantize, nogil, "int8_linear's weight as float32 [N, K]");
  m.def("int8_linear", &int8_linear, nogil, "x @ dequantize(q, scales).T (+ bias): int8 weights, one scale per group");
  m.def("w8a8_linear", &w8a8_linear, nogil, "x @ (q * scales).T (+ bias) with x rounded to int8 per row: W8A8");
  m.def("pack_panels", &pack_panels, nogil, "w [N, K] as panels of 16 output columns, [ceil(N / 16), K, 16]");
  m.def("packed_linear", &packed_linear, nogil, "x @ w.T (+ bias) with w as pack_panels stored it");
  m.def("rms_norm", &rms_norm, nogil, "RMS norm of each row, times w");
  m.def("add_rms_norm_", &add_rms_norm_, nogil, "residual += x; x = rms_norm(residual) * w, in place");
  m.def("silu_mul", &silu_mul, nogil, "silu(gate) * up of [gate | up]");
  m.def("rope_", &rope_, nogil, "rotary embedding of the q and k heads of qkv, in place");
  py::class_<DecodeStack>(m, "DecodeStack", py::module_local())
      .def(py::init<std::vector<LayerSpec>, double, int64_t, int64_t, int64_t>())
      .def("forward", &DecodeStack::forward, nogil, "the decoder layers over a batch of one-token queries");
}
