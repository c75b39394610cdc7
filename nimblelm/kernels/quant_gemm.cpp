// The weight-only int8 and int4 linears and W8A8 (quantization/), and their weights dequantized for a
// float GEMM.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "ops.h"
#include "panel_tile.h"
#include "simd.h"

// The bias as a pointer (nullptr without one), checked against the N outputs of `op`.
static const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, op, ": bad bias");
  return bias->data_ptr<float>();
}

// int8_linear: y = x @ (q * scales).T (+ bias) for int8 weights q [N, K] with one scale per
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
  int64_t s_row, s_group;  // scales (and mins): values to the next row's value, and to the next group's
};

// The layout of q [?, ?] against the row bytes B and groups G of the weight it holds; checks its shapes.
// six: q holds six-bit tiles (below), which come in tiles only.
static RowTile row_tile(const at::Tensor& q, const at::Tensor& scales, int64_t row_bytes, int64_t groups,
                        const char* op, bool six = false) {
  if (!six && q.size(1) == row_bytes) {
    TORCH_CHECK(scales.size(0) == q.size(0) && scales.size(1) == groups, op, ": scales must be [N, K / group]");
    return {row_bytes, QBLOCK, groups, 1};
  }
  TORCH_CHECK(q.size(1) == (six ? 3 : 4) * row_bytes && row_bytes % QBLOCK == 0 && scales.size(0) == q.size(0) &&
                  scales.size(1) == 4 * groups,
              op, ": a tiled weight is [N / 4, 4 * row bytes] (row bytes a multiple of 32), its scales [N / 4, 4 * K / group]");
  return {QBLOCK, 4 * QBLOCK, 1, 4};
}

// Six-bit tiles: int8 weights whose values all lie in [-32, 31] (GGUF's Q6_K) are held in 6 bits a value
// (quantization/int8.py), a quarter fewer bytes for a decode step to read: q uint8 [N / 4, 3 K] holds the 8-bit
// tiles [N / 4, 4 K]. Each 256 bytes of an 8-bit tile (units 2i and 2i + 1 of its four rows) are a chunk of 192:
// with u = q + 32 (0-63), byte p's low four bits are in byte p % 128 (the low nibble for p < 128, the high one
// past it) and its high two in byte 128 + p % 64, at bit 2 (p / 64). A kernel expands a tile where it reads it.
constexpr int64_t SIX_CHUNK = 192;

// Whether q holds six-bit tiles of an int8 weight of K input channels (else int8 values); checks their shape.
static bool six_bit(const at::Tensor& q, int64_t K, const char* op) {
  if (q.scalar_type() != at::kByte) return false;
  TORCH_CHECK(q.dim() == 2 && q.size(1) == 3 * K && K % (2 * QBLOCK) == 0, op,
              ": 6-bit tiles are uint8 [N / 4, 3 K], K a multiple of 64");
  return true;
}

// Unit 2i + a of row r of an 8-bit tile (its bytes p = 128 a + 32 r + j), from chunk i of the six-bit tile.
static inline void six_bit_unit(const uint8_t* chunk, int a, int r, int8_t* out) {
  const int field = 2 * a + r / 2;
  for (int j = 0; j < QBLOCK; ++j) {
    const int low = (chunk[32 * r + j] >> (4 * a)) & 15, high = (chunk[128 + 32 * (r & 1) + j] >> (2 * field)) & 3;
    out[j] = int8_t((low | high << 4) - 32);
  }
}

// The 8-bit tile (4 K bytes) of a six-bit one (3 K bytes), prefetching `ahead` bytes past each chunk read.
static void expand_six_bit(const uint8_t* src, int64_t K, int64_t ahead, int8_t* dst) {
  for (int64_t i = 0; i < K / (2 * QBLOCK); ++i) {
    const uint8_t* c = src + i * SIX_CHUNK;
    int8_t* d = dst + 8 * QBLOCK * i;
    for (int line = 0; line < 3; ++line) __builtin_prefetch(c + ahead + 64 * line);
#if defined(__AVX512BW__)
    const __m512i lo0 = _mm512_loadu_si512(c), lo1 = _mm512_loadu_si512(c + 64), hi = _mm512_loadu_si512(c + 128);
    const __m512i m15 = _mm512_set1_epi8(15), m48 = _mm512_set1_epi8(0x30), k32 = _mm512_set1_epi8(32);
    const auto put = [&](int at, __m512i low, __m512i high) {
      const __m512i u = _mm512_or_si512(_mm512_and_si512(low, m15), _mm512_and_si512(high, m48));
      _mm512_storeu_si512(d + at, _mm512_sub_epi8(u, k32));
    };
    put(0, lo0, _mm512_slli_epi16(hi, 4));
    put(64, lo1, _mm512_slli_epi16(hi, 2));
    put(128, _mm512_srli_epi16(lo0, 4), hi);
    put(192, _mm512_srli_epi16(lo1, 4), _mm512_srli_epi16(hi, 2));
#elif defined(__AVX2__)
    const __m256i m15 = _mm256_set1_epi8(15), m48 = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
    for (int e = 0; e < 2; ++e) {
      const auto* v = reinterpret_cast<const __m256i*>(c + 32 * e);
      const __m256i lo0 = _mm256_loadu_si256(v), lo1 = _mm256_loadu_si256(v + 2), hi = _mm256_loadu_si256(v + 4);
      const auto put = [&](int at, __m256i low, __m256i high) {
        const __m256i u = _mm256_or_si256(_mm256_and_si256(low, m15), _mm256_and_si256(high, m48));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + at + 32 * e), _mm256_sub_epi8(u, k32));
      };
      put(0, lo0, _mm256_slli_epi16(hi, 4));
      put(64, lo1, _mm256_slli_epi16(hi, 2));
      put(128, _mm256_srli_epi16(lo0, 4), hi);
      put(192, _mm256_srli_epi16(lo1, 4), _mm256_srli_epi16(hi, 2));
    }
#else
    for (int a = 0; a < 2; ++a)
      for (int r = 0; r < 4; ++r) six_bit_unit(c, a, r, d + 128 * a + 32 * r);
#endif
  }
}

// Weight scales (and int4 minimums) come as float32 or float16: float16 where each of a layer's values is
// one (quantization/int8.py, scale_storage), so a group costs 2 bytes, as in llama.cpp's Q8_0 and Q4_0
// blocks; or in GGUF's K-quants' two levels (KScales). The kernels take them as P, a pointer or a view indexed
// like one, and widen each value where they read it.
static inline float widen(float v) { return v; }
static inline float widen(at::Half v) {
#if defined(__F16C__)
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

// The scales of GGUF's K-quants as stored: group g's scale is an int8 sub-scale times a float16 factor shared by
// 2^shift consecutive groups (a super-block of 256 weights: Q4_K's 8 groups of 32, Q6_K's 16 of 16). The product
// has at most 18 significant bits, so it is exact in float32: the kernels read the values the float32 scales of the
// same weights hold, in 1 + 2 / 2^shift bytes a group instead of 4. A view indexed as a pointer into scales [N, G]
// (factors [N, G >> shift]) or into their row tiles (factor a of row r of a tile at 4 a + r).
struct KScales {
  const int8_t* sub = nullptr;
  const at::Half* factor = nullptr;
  int64_t at = 0;  // the index this view starts at
  int shift = 0;
  bool tiled = false;
  KScales() = default;
  KScales(const int8_t* sub, const at::Half* factor, int shift, bool tiled)
      : sub(sub), factor(factor), shift(shift), tiled(tiled) {}
  explicit operator bool() const { return sub != nullptr; }
  KScales operator+(int64_t n) const {
    KScales v = *this;
    v.at += n;
    return v;
  }
  int64_t operator-(const KScales& o) const { return at - o.at; }
  int64_t factor_index(int64_t j) const { return tiled ? (j >> (shift + 2) << 2) | (j & 3) : j >> shift; }
  float operator[](int64_t n) const { return float(sub[at + n]) * widen(factor[factor_index(at + n)]); }
};

// f(scales, mins) as the kernels index them (mins null when not given), for scales of `groups` groups a row:
// float32 or float16 pointers, or int8 sub-scales with their float16 factors (scale_factors, min_factors) as
// KScales. An int4 layer's minimums are of the scales' type.
template <typename F>
static at::Tensor with_scales(const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                              const c10::optional<at::Tensor>& scale_factors,
                              const c10::optional<at::Tensor>& min_factors, int64_t groups, const char* op, F&& f) {
  const auto type = scales.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kHalf || type == at::kChar) && (!mins || mins->scalar_type() == type),
              op, ": scales (and mins) must be float32 or float16, or int8 with float16 factors, both of one type");
  if (type != at::kChar) {
    TORCH_CHECK(!scale_factors && !min_factors, op, ": factors go with int8 scales only");
    if (type == at::kHalf)
      return f(static_cast<const at::Half*>(scales.data_ptr<at::Half>()),
               mins ? static_cast<const at::Half*>(mins->data_ptr<at::Half>()) : nullptr);
    return f(static_cast<const float*>(scales.data_ptr<float>()),
             mins ? static_cast<const float*>(mins->data_ptr<float>()) : nullptr);
  }
  TORCH_CHECK(scale_factors && !mins == !min_factors, op, ": int8 scales (and mins) need their float16 factors");
  const auto factors_of = [&](const at::Tensor& values, const at::Tensor& factors) {
    TORCH_CHECK(factors.scalar_type() == at::kHalf && factors.dim() == 2 && factors.is_contiguous() &&
                    factors.size(0) == values.size(0) && factors.size(1) > 0 && values.size(1) % factors.size(1) == 0,
                op, ": factors must be contiguous float16 [rows, a fraction of the scales' columns]");
    return values.size(1) / factors.size(1);
  };
  const int64_t per = factors_of(scales, *scale_factors);
  TORCH_CHECK(per >= 2 && (per & (per - 1)) == 0 && groups % per == 0 &&
                  (!mins || factors_of(*mins, *min_factors) == per),
              op, ": a factor must cover a power of two (at least 2) of a row's groups, for scales and mins alike");
  const int shift = __builtin_ctzll(per);
  const bool tiled = scales.size(1) != groups;
  const KScales s(scales.data_ptr<int8_t>(), scale_factors->data_ptr<at::Half>(), shift, tiled);
  return f(s, mins ? KScales(mins->data_ptr<int8_t>(), min_factors->data_ptr<at::Half>(), shift, tiled) : KScales());
}

// Where several chunks of activation rows read a tile's K-quant scales (prefills), they are multiplied out once
// into `buffer` (count values from v, the tile's in either layout) and read as float32: the integer kernels' row
// loops called the product for every chunk, which cost Qwen2.5-Coder-1.5B's Q4_K file 12% of its pp128 on Zen 4.
// Other scales pass as they are. f(the scales, the minimums (null for none) as read).
template <typename P, typename F>
static inline void with_tile_scales(P s, P mins, int64_t count, bool many_chunks, std::vector<float>& buffer, F&& f) {
  if constexpr (std::is_same_v<P, KScales>) {
    if (many_chunks) {
      buffer.resize(2 * count);
      for (int64_t j = 0; j < count; ++j) buffer[j] = s[j];
      for (int64_t j = 0; mins && j < count; ++j) buffer[count + j] = mins[j];
      const float* widened = buffer.data();
      return f(widened, mins ? widened + count : nullptr);
    }
  }
  f(s, mins);
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

// Activation rows an int4 or int8 call multiplies against each weight tile at once: the tile's four rows
// are loaded and unpacked once for all of them. 4 x XROWS accumulators stay in registers: AVX-512's 32
// vector registers hold XROWS = 4, AVX2's 16 hold 2.
#if defined(__AVX512VL__)
constexpr int XROWS = 4;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int XROWS = 2;
#else
constexpr int XROWS = 1;
#endif

// Whether int8 tiles in pairs of blocks run on 512-bit registers (int8_dot4_pairs).
#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
constexpr bool PAIRS_512 = true;
#else
constexpr bool PAIRS_512 = false;
#endif

// Rows ahead to prefetch: without it the int8 rows streamed at ~4 GB/s, a third of what fp32 rows
// reach, as the integer arithmetic leaves fewer loads in flight.
constexpr int64_t PREFETCH_ROWS = 16;

#if defined(__AVX2__) && defined(__FMA__)
// acc plus the sums of four products of unsigned u and signed s bytes, as 8 int32 lanes: one VNNI
// instruction where the CPU has it, else maddubs, madd and an add, whose int16 pair sums cannot
// saturate for the callers' operands (|s| <= 127 and u <= 128, or u <= 15). On Zen 4 the gain was
// within the run-to-run spread of SmolLM2's layers at 8 and 16 rows (2026-12-04); it is fewer
// instructions on the same bits.
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// Eight scales in a row as float32 (widen8), or four (widen4).
static inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 widen8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline __m128 widen4(const float* p) { return _mm_loadu_ps(p); }
static inline __m128 widen4(const at::Half* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
// K-quant scales. widen8 reads tiles only: 8 values from a multiple of 8 are two groups of the tile's four rows,
// which share the rows' four factors (a factor covers at least 2 groups).
static inline __m128 widen4(const KScales& p) { return _mm_set_ps(p[3], p[2], p[1], p[0]); }
static inline __m256 widen8(const KScales& p) {
  const __m128i sub8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.sub + p.at));
  const __m256 sub = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sub8));
  const __m128 factors = widen4(p.factor + (p.at >> (p.shift + 2) << 2));
  return _mm256_mul_ps(sub, _mm256_set_m128(factors, factors));
}

// Four weight rows (from q and s, laid out as t says) against R quantized activation rows (xs values and
// ds block scales apart). out[m][r] is activation row m's sum for weight row r. The products take unsigned
// x signed bytes, so each weight's sign moves onto the activation it multiplies. TILED makes the tile's
// strides constants, which the loop's address arithmetic then folds.
template <bool TILED, int R, typename P>
static inline void int8_dot4_(const int8_t* xq, const float* xd, int64_t xs, int64_t ds, const int8_t* q,
                              P s, int64_t K, int64_t group, const RowTile& layout, float (*out)[4]) {
  const RowTile t = TILED ? RowTile{QBLOCK, 4 * QBLOCK, 1, 4} : layout;
  __m256 acc[4][R];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < R; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t ahead = PREFETCH_ROWS * K, span = std::max(group, QBLOCK);
  for (int64_t j = 0; j < K / span; ++j) {  // spans outside, blocks inside: no division in the loop
    __m256 sv[4];
    // Groups of 16 (Q6_K's scales): the products' lanes 0-3 sum bytes 0-15 and lanes 4-7 bytes 16-31, so one
    // vector of two scales, each in four lanes, scales both halves at once. In tiles the span's 8 scales of the
    // four rows are 8 in a row: one load, and each row's two picked out by a permute.
    const __m256 s8 = TILED && group == 16 ? widen8(s + 8 * j) : _mm256_setzero_ps();
    for (int r = 0; r < 4; ++r) {
      P sr = s + r * t.s_row;
      const __m256i row = _mm256_setr_epi32(r, r, r, r, r + 4, r + 4, r + 4, r + 4);
      sv[r] = TILED && group == 16 ? _mm256_permutevar8x32_ps(s8, row)
              : group == 16        ? _mm256_set_m128(_mm_set1_ps(widen(sr[(2 * j + 1) * t.s_group])),
                                                     _mm_set1_ps(widen(sr[2 * j * t.s_group])))
                                   : _mm256_set1_ps(widen(sr[j * t.s_group]));
    }
    for (int64_t k = j * span; k < (j + 1) * span; k += QBLOCK) {
      for (int r = 0; r < 4; ++r) {
        const int8_t* w = q + r * t.q_row + k / QBLOCK * t.q_unit;
        _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), wabs = _mm256_sign_epi8(wv, wv);
        for (int m = 0; m < R; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * xs + k));
          const __m256i dot = dot_u8s8(_mm256_setzero_si256(), wabs, _mm256_sign_epi8(xv, wv));
          const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(xd + m * ds + k / QBLOCK));
          acc[r][m] = _mm256_fmadd_ps(scaled, sv[r], acc[r][m]);
        }
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = hsum(acc[r][m]);
}

// R (at most XROWS) activation rows against four weight rows: the template instance for R and the layout.
template <int R = XROWS, typename P>
static inline void int8_dot4(int rows, const int8_t* xq, const float* xd, int64_t xs, int64_t ds, const int8_t* q,
                             P s, int64_t K, int64_t group, const RowTile& t, float (*out)[4]) {
  if constexpr (R > 1) {
    if (rows < R) return int8_dot4<R - 1>(rows, xq, xd, xs, ds, q, s, K, group, t, out);
  }
  (t.q_row == QBLOCK ? int8_dot4_<true, R, P> : int8_dot4_<false, R, P>)(xq, xd, xs, ds, q, s, K, group, t, out);
}

// Blocks 2i and 2i + 1 of a row are 32 consecutive bytes: their low nibbles are the first halves of the
// two blocks, their high nibbles the second halves. With the activations laid out to match (pair_x:
// per pair, x[2i][0:16] x[2i+1][0:16] then x[2i][16:32] x[2i+1][16:32]), one load and two masks unpack
// 64 weights, and the two blocks' sums land in the low and high four lanes, scaled by one vector. With
// about half the instructions per weight, SmolLM2's 121 int4 layers took 6.3-6.4 ms a batch-1 step
// against 8.1 a block at a time (2 threads, the two timed alternately, 2026-11-28).
constexpr int64_t QPAIR = 2 * QBLOCK;

// pair_x's layout of one quantized activation row, plus per pair: the blocks' scales (dxv) and sums
// (xbv, where given), each in the four lanes of its block. xbv holds a quarter of the sum, as the lanes add
// up again, times the weights' minimum in units of their scale where that is fixed (symmetric: -8), else 1.
static void pair_x(const int8_t* xq, const float* xd, int64_t K, float min_in_scales, int8_t* xp, float* dxv,
                   float* xbv) {
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
      if (xbv) std::fill(xbv + 8 * i + 4 * h, xbv + 8 * i + 4 * h + 4, 0.25f * min_in_scales * float(total) * d);
    }
  }
}

// What the 512-bit pair kernels (int8_dot4_pairs_512) start their sums from: -offset (128 for 8-bit tiles, 32 for
// six-bit ones) times the sum of each four activations of a row in pair_x's layout, a lane of the products; with
// groups of 16 (halves) for each half of a pair apart (16 a pair), else both halves' lanes added (8 a pair).
static void unsigned_corrections(const int8_t* xp, int64_t M, int64_t K, int32_t offset, bool halves, int32_t* xc) {
  const auto four = [&](const int8_t* x) { return -offset * (int32_t(x[0]) + x[1] + x[2] + x[3]); };
  for (int64_t p = 0; p < M * K / QPAIR; ++p) {
    const int8_t* x = xp + p * QPAIR;
    for (int l = 0; l < 8; ++l) {
      if (halves) {
        xc[16 * p + l] = four(x + 4 * l);
        xc[16 * p + 8 + l] = four(x + 32 + 4 * l);
      } else {
        xc[8 * p + l] = four(x + 4 * l) + four(x + 32 + 4 * l);
      }
    }
  }
}

// The scales (or minimums) of a pair of blocks, for the pair kernels below. Row r's values (v laid out as t
// says) of groups g and g2, in the low and high four lanes:
template <typename P>
static inline __m256 group_pair(P v, int r, int64_t g, int64_t g2, const RowTile& t) {
  P vr = v + r * t.s_row;
  return _mm256_set_m128(_mm_set1_ps(widen(vr[g2 * t.s_group])), _mm_set1_ps(widen(vr[g * t.s_group])));
}

// In tiles with groups of 32 (PACKED8) a pair's values of the four rows are 8 in a row: one load widens them
// (widen8), and row r's are picked out of each 128-bit half by an in-lane permute with an immediate (row_of<r>,
// no index vectors held in registers). each_row runs f with the row as a constant, std::integral_constant.
template <int r>
static inline __m256 row_of(__m256 v8) { return _mm256_permute_ps(v8, r * 0x55); }

template <typename F>
static inline void each_row(F&& f) {
  f(std::integral_constant<int, 0>{}), f(std::integral_constant<int, 1>{}), f(std::integral_constant<int, 2>{}),
      f(std::integral_constant<int, 3>{});
}

// int8_dot4_ over pairs of blocks (groups of 32 or more, K a multiple of 64), activations in pair_x's
// layout: each weight row's two blocks are rearranged in registers to match (first halves of both, then
// second halves), so two dot products leave block 2i's sum in lanes 0-3 and 2i+1's in lanes 4-7, and one
// conversion, multiply and multiply-add scale both: about two thirds of the instructions per weight and
// activation row.
//
// HALVES: groups of 16 (GGUF's Q6_K), a scale per half block. The halves' sums stay apart (a: first halves,
// groups 4i and 4i + 2 of the pair; b: second halves, 4i + 1 and 4i + 3) and each is scaled by its own vector:
// one conversion, multiply and multiply-add more a pair than a scale per block, but half the instructions per
// weight of int8_dot4_'s block at a time.
template <bool TILED, bool PACKED8, bool HALVES, int R, typename P>
static inline void int8_dot4_pairs_(const int8_t* xp, const float* dxv, int64_t xs, int64_t vs, const int8_t* q,
                                    P s, int64_t K, int64_t group, const RowTile& layout,
                                    float (*out)[4]) {
  const RowTile t = TILED ? RowTile{QBLOCK, 4 * QBLOCK, 1, 4} : layout;
  __m256 acc[4][R];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < R; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t ahead = PREFETCH_ROWS * K;
  for (int64_t i = 0; i < K / QPAIR; ++i) {
    const int64_t g = 2 * i * QBLOCK / group, g2 = (2 * i + 1) * QBLOCK / group;
    const __m256 s8 = PACKED8 ? widen8(s + 8 * i) : _mm256_setzero_ps();
    // HALVES in tiles: the pair's 16 scales are groups 4i .. 4i + 3 of the four rows; lo: 4i and 4i + 2, hi: the others
    const __m256 lo8 = HALVES && TILED ? widen8(s + 16 * i) : _mm256_setzero_ps();
    const __m256 hi8 = HALVES && TILED ? widen8(s + 16 * i + 8) : _mm256_setzero_ps();
    each_row([&](auto rc) {
      constexpr int r = decltype(rc)::value;
      const int8_t* w = q + r * t.q_row + 2 * i * t.q_unit;
      _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + t.q_unit + ahead), _MM_HINT_T0);
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t.q_unit));
      const __m256i a = _mm256_permute2x128_si256(w0, w1, 0x20), b = _mm256_permute2x128_si256(w0, w1, 0x31);
      const __m256i a_abs = _mm256_sign_epi8(a, a), b_abs = _mm256_sign_epi8(b, b);
      if constexpr (HALVES) {
        const __m256 sa = TILED ? row_of<r>(_mm256_permute2f128_ps(lo8, hi8, 0x20))
                                : group_pair(s, r, 4 * i, 4 * i + 2, t);
        const __m256 sb = TILED ? row_of<r>(_mm256_permute2f128_ps(lo8, hi8, 0x31))
                                : group_pair(s, r, 4 * i + 1, 4 * i + 3, t);
        for (int m = 0; m < R; ++m) {
          const int8_t* x = xp + m * xs + i * QPAIR;
          const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
          const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
          const __m256 dx = _mm256_loadu_ps(dxv + m * vs + 8 * i);
          const __m256i da = dot_u8s8(_mm256_setzero_si256(), a_abs, _mm256_sign_epi8(xa, a));
          const __m256i db = dot_u8s8(_mm256_setzero_si256(), b_abs, _mm256_sign_epi8(xb, b));
          acc[r][m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(da), dx), sa, acc[r][m]);
          acc[r][m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(db), dx), sb, acc[r][m]);
        }
        return;
      }
      const __m256 sv = PACKED8 ? row_of<r>(s8) : group_pair(s, r, g, g2, t);
      for (int m = 0; m < R; ++m) {
        const int8_t* x = xp + m * xs + i * QPAIR;
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
        const __m256i dot = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), a_abs, _mm256_sign_epi8(xa, a)), b_abs,
                                     _mm256_sign_epi8(xb, b));
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(dxv + m * vs + 8 * i));
        acc[r][m] = _mm256_fmadd_ps(scaled, sv, acc[r][m]);
      }
    });
  }
  for (int m = 0; m < R; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = hsum(acc[r][m]);
}

#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
// Lanes 0-3 of row 2h's value of a pair's first group, 4-7 of its second, 8-15 the same for row 2h + 1, from the
// tile's 8 values of the pair (4 g + r for groups g and g2 of rows r = 0-3, as widen8 gives them in tiles).
static inline __m512i pair_lanes(int h) {
  return h == 0 ? _mm512_set_epi32(5, 5, 5, 5, 1, 1, 1, 1, 4, 4, 4, 4, 0, 0, 0, 0)
                : _mm512_set_epi32(7, 7, 7, 7, 3, 3, 3, 3, 6, 6, 6, 6, 2, 2, 2, 2);
}

// The lanes of the scales of the halves (groups of 16, int8_dot4_pairs_512's HALVES) of rows 2h and 2h + 1.
static inline __m512i half_lanes(int h, int second) {
  const int a = 2 * h + 4 * second;
  return _mm512_set_epi32(a + 9, a + 9, a + 9, a + 9, a + 1, a + 1, a + 1, a + 1,  // row 2h + 1
                          a + 8, a + 8, a + 8, a + 8, a, a, a, a);                 // row 2h
}

// Rows 2h and 2h + 1 of units 2i (w0) and 2i + 1 (w1) of a tile, unsigned (int8_dot4_pairs_512): 64 bytes each of
// the 8-bit tile with the sign bit flipped (u = q + 128), or from the six-bit tile's chunk i (SIX, u = q + 32): the
// nibbles of lo h, the high bits of field h (w0) and 2 + h (w1).
template <bool SIX>
static inline void pair_rows_512(const int8_t* q, int64_t i, int h, __m512i& w0, __m512i& w1) {
  if constexpr (!SIX) {
    const int8_t* w = q + 2 * i * 4 * QBLOCK;
    const __m512i sign = _mm512_set1_epi8(-128);
    w0 = _mm512_xor_si512(_mm512_loadu_si512(w + 64 * h), sign);
    w1 = _mm512_xor_si512(_mm512_loadu_si512(w + 4 * QBLOCK + 64 * h), sign);
    return;
  }
  const int8_t* c = q + i * SIX_CHUNK;
  const __m512i lo = _mm512_loadu_si512(c + 64 * h), hi = _mm512_loadu_si512(c + 128);
  const __m512i m15 = _mm512_set1_epi8(15), m48 = _mm512_set1_epi8(0x30);
  const __m512i high0 = h == 0 ? _mm512_slli_epi16(hi, 4) : _mm512_slli_epi16(hi, 2);
  const __m512i high1 = h == 0 ? hi : _mm512_srli_epi16(hi, 2);
  w0 = _mm512_ternarylogic_epi32(_mm512_and_si512(lo, m15), high0, m48, 0xF8);  // low | (high & 0x30)
  w1 = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(lo, 4), m15), high1, m48, 0xF8);
}

// int8_dot4_pairs_ on tiles in 512-bit registers, as int4's below: one register holds two weight rows of a pair
// (h = 0: rows 0 and 1, h = 1: rows 2 and 3), each row's two blocks rearranged by a two-source permute into the
// 256-bit kernel's order (first halves of both blocks, then second halves), against the pair's activations in
// both halves. The VNNI products take the weights unsigned (pair_rows_512: u = q + 128, six-bit tiles u = q + 32)
// and each lane's sum starts from -128 (-32) times the sum of its four activations (xc, unsigned_corrections):
// the integer sums of q itself, without moving the weights' signs onto the activations (AVX-512 has no byte sign
// instruction: that took an absolute value and a mask a vector, and a masked negation a vector and activation row).
// Each row's lanes compute what the 256-bit kernel's do: the same bits.
// HALVES (groups of 16): as int8_dot4_pairs_'s, the halves' sums apart, the pair's 16 scales (4 g + r for its
// groups g = 0-3 of rows r) picked for rows 2h and 2h + 1: first halves' groups 0 and 2, second halves' 1 and 3.
template <bool PACKED8, bool HALVES, bool SIX, int R, typename P>
static inline void int8_dot4_pairs_512(const int8_t* xp, const float* dxv, const int32_t* xc, int64_t xs, int64_t vs,
                                       const int8_t* q, P s, int64_t K, int64_t group, float (*out)[4]) {
  const __m512i lanes[2] = {pair_lanes(0), pair_lanes(1)};
  const __m512i halves[2][2] = {{half_lanes(0, 0), half_lanes(0, 1)}, {half_lanes(1, 0), half_lanes(1, 1)}};
  const __m512i first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  const int64_t cs = HALVES ? K / 4 : K / 8;  // corrections a row (unsigned_corrections)
  __m512 acc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < R; ++m) acc[h][m] = _mm512_setzero_ps();
  const int64_t ahead = PREFETCH_ROWS * K;
  for (int64_t i = 0; i < K / QPAIR; ++i) {
    const int8_t* w = q + i * (SIX ? SIX_CHUNK : 8 * QBLOCK);  // units 2i and 2i + 1 of the tile's four rows
    for (int line = 0; line < (SIX ? 3 : 4); ++line)
      _mm_prefetch(reinterpret_cast<const char*>(w + (SIX ? 3 * ahead / 4 : ahead) + 64 * line), _MM_HINT_T0);
    const int64_t g = 2 * i * QBLOCK / group, g2 = (2 * i + 1) * QBLOCK / group;
    const __m512 s16 =
        HALVES ? _mm512_insertf32x8(_mm512_castps256_ps512(widen8(s + 16 * i)), widen8(s + 16 * i + 8), 1)
               : _mm512_castps256_ps512(PACKED8 ? widen8(s + 8 * i)
                                                : _mm256_set_m128(widen4(s + 4 * g2), widen4(s + 4 * g)));
    for (int h = 0; h < 2; ++h) {
      __m512i w0, w1;
      pair_rows_512<SIX>(q, i, h, w0, w1);
      const __m512i a = _mm512_permutex2var_epi64(w0, first, w1), b = _mm512_permutex2var_epi64(w0, second, w1);
      const auto broadcast = [](const void* p) {
        return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      };
      if constexpr (HALVES) {  // the first halves' sums (da) and the second halves' (db) apart
        const __m512 sa = _mm512_permutexvar_ps(halves[h][0], s16), sb = _mm512_permutexvar_ps(halves[h][1], s16);
        for (int m = 0; m < R; ++m) {
          const int8_t* x = xp + m * xs + i * QPAIR;
          const int32_t* c = xc + m * cs + 16 * i;
          const __m512i da = _mm512_dpbusd_epi32(broadcast(c), a, broadcast(x));
          const __m512i db = _mm512_dpbusd_epi32(broadcast(c + 8), b, broadcast(x + 32));
          const __m512 dx = _mm512_broadcast_f32x8(_mm256_loadu_ps(dxv + m * vs + 8 * i));
          acc[h][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(da), dx), sa, acc[h][m]);
          acc[h][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(db), dx), sb, acc[h][m]);
        }
        continue;
      }
      const __m512 sv = _mm512_permutexvar_ps(lanes[h], s16);
      for (int m = 0; m < R; ++m) {
        const int8_t* x = xp + m * xs + i * QPAIR;
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(broadcast(xc + m * cs + 8 * i), a, broadcast(x)),
                                                b, broadcast(x + 32));
        const __m512 dx = _mm512_broadcast_f32x8(_mm256_loadu_ps(dxv + m * vs + 8 * i));
        acc[h][m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dx), sv, acc[h][m]);
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int h = 0; h < 2; ++h) {
      out[m][2 * h] = hsum(_mm512_castps512_ps256(acc[h][m]));
      out[m][2 * h + 1] = hsum(_mm512_extractf32x8_ps(acc[h][m], 1));
    }
}
#endif

// xc: the rows' unsigned_corrections where the 512-bit kernels take the tiles (null elsewhere); six: q is a six-bit
// tile (those kernels only: the others take tiles expanded).
template <int R = XROWS, typename P>
static inline void int8_dot4_pairs(int rows, const int8_t* xp, const float* dxv, const int32_t* xc, int64_t xs,
                                   int64_t vs, const int8_t* q, P s, int64_t K, int64_t group, const RowTile& t,
                                   bool six, float (*out)[4]) {
  if constexpr (R > 1) {
    if (rows < R) return int8_dot4_pairs<R - 1>(rows, xp, dxv, xc, xs, vs, q, s, K, group, t, six, out);
  }
  const bool tiles = t.q_unit == 4 * QBLOCK;
#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
  const auto kernel = [&](auto six) {
    constexpr bool SIX = decltype(six)::value;
    return group == 16       ? int8_dot4_pairs_512<false, true, SIX, R, P>
           : group == QBLOCK ? int8_dot4_pairs_512<true, false, SIX, R, P>
                             : int8_dot4_pairs_512<false, false, SIX, R, P>;
  };
  if (tiles)
    return (six ? kernel(std::true_type{}) : kernel(std::false_type{}))(xp, dxv, xc, xs, vs, q, s, K, group, out);
#endif
  if (group == 16)
    return (tiles ? int8_dot4_pairs_<true, false, true, R, P> : int8_dot4_pairs_<false, false, true, R, P>)(
        xp, dxv, xs, vs, q, s, K, group, t, out);
  (!tiles            ? int8_dot4_pairs_<false, false, false, R, P>
   : group == QBLOCK ? int8_dot4_pairs_<true, true, false, R, P>
                     : int8_dot4_pairs_<true, false, false, R, P>)(xp, dxv, xs, vs, q, s, K, group, t, out);
}

// Sums of a pair of blocks against pair_x's layout, the weights' nibbles unpacked (lo, hi): lanes 0-3 add up
// to block 2i's, lanes 4-7 to 2i+1's.
static inline __m256 int4_pair_sums(__m256i lo, __m256i hi, __m256i xlo, __m256i xhi) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
  return _mm256_cvtepi32_ps(dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, xlo), hi, xhi));
#else
  // Each int16 is at most 2 * 2 * 15 * 127 = 7620: the two halves add without overflow.
  const __m256i sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, _mm256_set1_epi16(1)));
#endif
}

// Four weight rows (K a multiple of 64) against R activation rows from pair_x (x rows xs bytes apart,
// their dxv and xbv vs floats apart), the minimums included: sum_k x[k] * (scale q[k] + min) =
// scale (q . x) + min sum(x) per group; without stored minimums (symmetric, min = -8 scale) that is
// scale (q . x - 8 sum(x)), one multiply-add fewer, and pair_x stored -8 sum(x) in xbv. out[m][r] is
// activation row m's sum for weight row r. The variants are templates so that the loop holds no branch
// and few enough vectors to stay in registers.
template <bool MINS, bool PACKED8, int R, typename P>
static inline void int4_dot4_pairs_(const int8_t* xp, const float* dxv, const float* xbv, int64_t xs, int64_t vs,
                                    const uint8_t* q, P s, P mins, int64_t K, int64_t group,
                                    const RowTile& layout, float (*out)[4]) {
  // PACKED8 implies tiles (K a multiple of 64 has more than one group a row): their strides as constants.
  const RowTile t = PACKED8 ? RowTile{QBLOCK, 4 * QBLOCK, 1, 4} : layout;
  __m256 acc[4][R];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < R; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t ahead = PREFETCH_ROWS * K / 2, pairs_per_group = std::max<int64_t>(group / QPAIR, 1);
  for (int64_t i = 0; i < K / QPAIR; ++i) {
    const int64_t g = group == QBLOCK ? 2 * i : i / pairs_per_group, g2 = group == QBLOCK ? g + 1 : g;
    const __m256 s8 = PACKED8 ? widen8(s + 8 * i) : _mm256_setzero_ps();
    const __m256 m8 = PACKED8 && MINS ? widen8(mins + 8 * i) : _mm256_setzero_ps();
    if (t.q_row == QBLOCK) {  // a tile: the four rows' pair is two cache lines
      _mm_prefetch(reinterpret_cast<const char*>(q + ahead + i * t.q_unit), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q + ahead + i * t.q_unit + 64), _MM_HINT_T0);
    } else {
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + r * t.q_row + i * t.q_unit + ahead), _MM_HINT_T0);
    }
    each_row([&](auto rc) {
      constexpr int r = decltype(rc)::value;
      const __m256 sv = PACKED8 ? row_of<r>(s8) : group_pair(s, r, g, g2, t);
      const __m256 mv = !MINS ? sv : PACKED8 ? row_of<r>(m8) : group_pair(mins, r, g, g2, t);
      const __m256i nibble = _mm256_set1_epi8(15);
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * t.q_row + i * t.q_unit));
      const __m256i lo = _mm256_and_si256(bytes, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      for (int m = 0; m < R; ++m) {
        const int8_t* x = xp + m * xs + i * QPAIR;
        const __m256 sums = int4_pair_sums(lo, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
        const __m256 dx = _mm256_loadu_ps(dxv + m * vs + 8 * i), xb = _mm256_loadu_ps(xbv + m * vs + 8 * i);
        if constexpr (MINS) {
          acc[r][m] = _mm256_fmadd_ps(mv, xb, _mm256_fmadd_ps(sums, _mm256_mul_ps(dx, sv), acc[r][m]));
        } else {
          acc[r][m] = _mm256_fmadd_ps(_mm256_fmadd_ps(sums, dx, xb), sv, acc[r][m]);
        }
      }
    });
  }
  for (int m = 0; m < R; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = hsum(acc[r][m]);
}

#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
// int4_dot4_pairs_ on tiles in 512-bit registers: a pair's 128 bytes hold the tile's four rows in turn, so one
// register takes two rows (h = 0: rows 0 and 1, h = 1: rows 2 and 3) against the pair's activations in both
// halves; about half the instructions per weight, where SmolLM2's batch-1 decode (its int4 weights in L3) is
// bound by them. Each row's lanes compute what the 256-bit kernel's do, and its half is summed by the same
// hsum: the same bits.
template <bool MINS, bool PACKED8, int R, typename P>
static inline void int4_dot4_pairs_512(const int8_t* xp, const float* dxv, const float* xbv, int64_t xs, int64_t vs,
                                       const uint8_t* q, P s, P mins, int64_t K, int64_t group,
                                       float (*out)[4]) {
  const __m512i lanes[2] = {pair_lanes(0), pair_lanes(1)};
  __m512 acc[2][R];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < R; ++m) acc[h][m] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(15);
  const int64_t ahead = PREFETCH_ROWS * K / 2, pairs_per_group = std::max<int64_t>(group / QPAIR, 1);
  for (int64_t i = 0; i < K / QPAIR; ++i) {
    const uint8_t* w = q + i * 4 * QBLOCK;
    _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + ahead + 64), _MM_HINT_T0);
    // Without PACKED8 (groups of 64 or more) both blocks of the pair are in group g: its four values twice.
    const int64_t g = i / pairs_per_group;
    const auto values = [&](P v) {
      return _mm512_castps256_ps512(PACKED8 ? widen8(v + 8 * i) : _mm256_set_m128(widen4(v + 4 * g), widen4(v + 4 * g)));
    };
    const __m512 s16 = values(s), m16 = MINS ? values(mins) : s16;
    for (int h = 0; h < 2; ++h) {
      const __m512i bytes = _mm512_loadu_si512(w + 64 * h);
      const __m512i lo = _mm512_and_si512(bytes, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      const __m512 sv = _mm512_permutexvar_ps(lanes[h], s16), mv = MINS ? _mm512_permutexvar_ps(lanes[h], m16) : sv;
      for (int m = 0; m < R; ++m) {
        const int8_t* x = xp + m * xs + i * QPAIR;
        const __m512i xlo = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
        const __m512i xhi = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo), hi, xhi);
        const __m512 sums = _mm512_cvtepi32_ps(dot);
        const __m512 dx = _mm512_broadcast_f32x8(_mm256_loadu_ps(dxv + m * vs + 8 * i));
        const __m512 xb = _mm512_broadcast_f32x8(_mm256_loadu_ps(xbv + m * vs + 8 * i));
        if constexpr (MINS) {
          acc[h][m] = _mm512_fmadd_ps(mv, xb, _mm512_fmadd_ps(sums, _mm512_mul_ps(dx, sv), acc[h][m]));
        } else {
          acc[h][m] = _mm512_fmadd_ps(_mm512_fmadd_ps(sums, dx, xb), sv, acc[h][m]);
        }
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int h = 0; h < 2; ++h) {
      out[m][2 * h] = hsum(_mm512_castps512_ps256(acc[h][m]));
      out[m][2 * h + 1] = hsum(_mm512_extractf32x8_ps(acc[h][m], 1));
    }
}
#endif

// R (at most XROWS) activation rows against four weight rows: the template instance for R and the layout.
template <int R = XROWS, typename P>
static inline void int4_dot4_pairs(int rows, const int8_t* xp, const float* dxv, const float* xbv, int64_t xs,
                                   int64_t vs, const uint8_t* q, P s, P mins, int64_t K,
                                   int64_t group, const RowTile& t, float (*out)[4]) {
  if constexpr (R > 1) {
    if (rows < R) return int4_dot4_pairs<R - 1>(rows, xp, dxv, xbv, xs, vs, q, s, mins, K, group, t, out);
  }
  const bool packed8 = t.s_row == 1 && group == QBLOCK;
#if defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
  if (t.q_unit == 4 * QBLOCK) {  // tiles
    auto f = mins ? (packed8 ? int4_dot4_pairs_512<true, true, R, P> : int4_dot4_pairs_512<true, false, R, P>)
                  : (packed8 ? int4_dot4_pairs_512<false, true, R, P> : int4_dot4_pairs_512<false, false, R, P>);
    return f(xp, dxv, xbv, xs, vs, q, s, mins, K, group, out);
  }
#endif
  auto f = mins ? (packed8 ? int4_dot4_pairs_<true, true, R, P> : int4_dot4_pairs_<true, false, R, P>)
                : (packed8 ? int4_dot4_pairs_<false, true, R, P> : int4_dot4_pairs_<false, false, R, P>);
  f(xp, dxv, xbv, xs, vs, q, s, mins, K, group, t, out);
}
#else
template <typename P>
static inline void int8_dot4(int rows, const int8_t* xq, const float* xd, int64_t xs, int64_t ds, const int8_t* q,
                             P s, int64_t K, int64_t group, const RowTile& t, float (*out)[4]) {
  const int64_t step = std::min(group, QBLOCK);  // one scale per step of values (group 16: half a block)
  for (int m = 0; m < rows; ++m) {
    for (int r = 0; r < 4; ++r) {
      float total = 0.f;
      for (int64_t k = 0; k < K; k += step) {
        const int8_t* w = q + r * t.q_row + k / QBLOCK * t.q_unit + k % QBLOCK;
        int32_t dot = 0;
        for (int64_t i = 0; i < step; ++i) dot += int32_t(xq[m * xs + k + i]) * int32_t(w[i]);
        // One explicit multiply-add: left to contraction, the float32 and float16 instances rounded differently.
        total = std::fma(float(dot) * xd[m * ds + k / QBLOCK], widen(s[r * t.s_row + k / group * t.s_group]), total);
      }
      out[m][r] = total;
    }
  }
}
#endif

// per_token: each activation row gets one int8 scale (W8A8) instead of one per block of 32.
static at::Tensor int8_matmul(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                              int64_t group, bool per_token, const c10::optional<at::Tensor>& scale_factors) {
  x = x.contiguous();  // here rather than in the caller: in a replayed step, one op less per linear
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "int8_linear: x, q and scales must be matrices");
  TORCH_CHECK(x.scalar_type() == at::kFloat && (q.scalar_type() == at::kChar || q.scalar_type() == at::kByte),
              "int8_linear: float32 x and int8 q (or its six-bit tiles) only");
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous(), "int8_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK((group == 16 || (group > 0 && group % QBLOCK == 0)) && K % QBLOCK == 0 && K % group == 0,
              "int8_linear: group must be 16 or a multiple of 32 dividing K");
  const int64_t groups = K / group;
  const bool six = six_bit(q, K, "int8_linear");
  const RowTile t = row_tile(q, scales, K, groups, "int8_linear", six);
  const int64_t N = six ? 4 * q.size(0) : q.size(0) * q.size(1) / K;
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const auto* qp = static_cast<const int8_t*>(q.data_ptr());
  float* yp = y.data_ptr<float>();
  const float* bp = bias_ptr(bias, N, "int8_linear");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * K / QBLOCK);
  for (int64_t m = 0; m < M; ++m)
    quantize_row_q8(xp + m * K, K, xq.data() + m * K, xd.data() + m * K / QBLOCK, per_token ? K : QBLOCK);
#if defined(__AVX2__) && defined(__FMA__)
  // Pairs of blocks share a conversion and the scales' arithmetic (groups of 16: a conversion for each half).
  const bool pairs = K % QPAIR == 0;
  const int64_t vs = K / QPAIR * 8;
  std::vector<int8_t> xpairs(pairs ? M * K : 0);
  std::vector<float> dxv(pairs ? M * vs : 0);
  for (int64_t m = 0; pairs && m < M; ++m)
    pair_x(xq.data() + m * K, xd.data() + m * K / QBLOCK, K, 0.f, xpairs.data() + m * K, dxv.data() + m * vs, nullptr);
  const bool tiled = t.q_unit == 4 * QBLOCK;
  std::vector<int32_t> xc(PAIRS_512 && pairs && tiled ? M * K / (group == 16 ? 4 : 8) : 0);
  if (!xc.empty()) unsigned_corrections(xpairs.data(), M, K, six ? 32 : 128, group == 16, xc.data());
#endif
  // Tiles of four weight rows; each tile stays in L1 across the activation rows, XROWS of them at a time.
  return with_scales(scales, c10::nullopt, scale_factors, c10::nullopt, groups, "int8_linear", [&](auto sp, auto) {
    using P = decltype(sp);
    at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
      float out[XROWS][4];
      std::vector<float> buffer;
      std::vector<int8_t> expanded(six && !PAIRS_512 ? 4 * K : 0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * 4;
        const int8_t* qt = six ? qp + b * 3 * K : qp + n * K;
        if (six && !PAIRS_512) {  // the 512-bit pair kernels expand six-bit tiles in registers
          expand_six_bit(reinterpret_cast<const uint8_t*>(qt), K, 3 * PREFETCH_ROWS * K / 4, expanded.data());
          qt = expanded.data();
        }
        with_tile_scales(sp + n * groups, P{}, 4 * groups, n + 4 <= N && M > XROWS, buffer, [&](auto st, auto) {
        for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
          const int64_t xrows = std::min<int64_t>(XROWS, M - m0);
          const int8_t* xr = xq.data() + m0 * K;
          const float* dr = xd.data() + m0 * K / QBLOCK;
          if (n + 4 <= N) {
  #if defined(__AVX2__) && defined(__FMA__)
            if (pairs)
              int8_dot4_pairs(int(xrows), xpairs.data() + m0 * K, dxv.data() + m0 * vs,
                              xc.empty() ? nullptr : xc.data() + m0 * xc.size() / M, K, vs, qt, st, K, group, t,
                              six && PAIRS_512, out);
            else
  #endif
              int8_dot4(int(xrows), xr, dr, K, K / QBLOCK, qt, st, K, group, t, out);
            for (int64_t m = 0; m < xrows; ++m)
              for (int r = 0; r < 4; ++r) yp[(m0 + m) * N + n + r] = out[m][r] + (bp ? bp[n + r] : 0.f);
            continue;
          }
          for (int64_t m = 0; m < xrows; ++m) {
            for (int64_t r = n; r < N; ++r) {  // the last rows of a layout in rows, fewer than four: scalar
              float total = 0.f;
              const int64_t step = std::min(group, QBLOCK);
              for (int64_t k = 0; k < K; k += step) {
                int32_t dot = 0;
                for (int64_t i = k; i < k + step; ++i) dot += int32_t(xr[m * K + i]) * int32_t(qp[r * K + i]);
                // One explicit multiply-add: left to contraction, the scale types' instances rounded differently.
                const float scaled = float(dot) * dr[m * K / QBLOCK + k / QBLOCK];
                total = std::fma(scaled, widen(sp[r * groups + k / group]), total);
              }
              yp[(m0 + m) * N + r] = total + (bp ? bp[r] : 0.f);
            }
          }
        }
        });
      }
    });
    return y;
  });
}

at::Tensor int8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                       int64_t group, c10::optional<at::Tensor> scale_factors) {
  return int8_matmul(x, q, scales, bias, group, false, scale_factors);
}

// w8a8_linear: W8A8 as SmoothQuant defines it: int8 weights with one scale per output channel
// (scales [N, 1]) times activations rounded to int8 with one scale per token (row). The integer dot
// products are exact; only their scaled sum over blocks of 32 is float.
at::Tensor w8a8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias) {
  return int8_matmul(x, q, scales, bias, x.size(1), true, c10::nullopt);
}

// The weights of int8_linear (int8_row) and int4_linear (int4_row) as float32: row n's values k0 .. k0 + kc
// (multiples of 32), for a float GEMM where many activation rows share each weight (prefills).
template <typename P>
struct QuantWeight {
  const uint8_t* q;  // the bytes of either format, in rows or tiles of four (t)
  P scales;
  P mins;  // int4: null when symmetric (min = -8 * scale)
  RowTile t;
  int64_t K, groups, group;
  bool six = false;  // int8 in six-bit tiles
};

// The 32 int8 values of unit u of weight row n (int8, either layout), expanded into `buffer` from six-bit tiles.
template <typename P>
static inline const int8_t* int8_unit(const QuantWeight<P>& w, int64_t n, int64_t u, int8_t* buffer) {
  const int64_t b = n / 4, r = n % 4;
  if (!w.six) return reinterpret_cast<const int8_t*>(w.q) + 4 * b * w.K + r * w.t.q_row + u * w.t.q_unit;
  six_bit_unit(w.q + b * 3 * w.K + u / 2 * SIX_CHUNK, int(u % 2), int(r), buffer);
  return buffer;
}

template <typename P>
static void int8_row(const QuantWeight<P>& w, int64_t n, int64_t k0, int64_t kc, float* out) {
  const int64_t b = n / 4 * 4, r = n % 4, step = std::min(w.group, QBLOCK);  // values sharing a scale and a unit
  P s = w.scales + b * w.groups + r * w.t.s_row;
  int8_t buffer[QBLOCK];
  for (int64_t k = k0; k < k0 + kc; k += step) {
    const int8_t* src = int8_unit(w, n, k / QBLOCK, buffer) + k % QBLOCK;
    const float scale = widen(s[k / w.group * w.t.s_group]);
    float* o = out + k - k0;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < step; i += 16) {
      const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(scale)));
    }
#elif defined(__AVX2__)
    for (; i < step; i += 8) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale)));
    }
#endif
    for (; i < step; ++i) o[i] = float(src[i]) * scale;
  }
}

// f(the QuantWeight of int8 q [N, K] and its scales, in rows or tiles).
template <typename F>
static at::Tensor with_int8_weight(const at::Tensor& q, const at::Tensor& scales,
                                   const c10::optional<at::Tensor>& scale_factors, int64_t K, int64_t group,
                                   const char* op, F&& f) {
  TORCH_CHECK(q.dim() == 2 && scales.dim() == 2 && (q.scalar_type() == at::kChar || q.scalar_type() == at::kByte) &&
                  q.is_contiguous() && scales.is_contiguous(),
              op, ": contiguous int8 q (or its six-bit tiles) and scales");
  TORCH_CHECK((group == 16 || (group > 0 && group % QBLOCK == 0)) && K % QBLOCK == 0 && K % group == 0,
              op, ": group must be 16 or a multiple of 32 dividing K");
  const bool six = six_bit(q, K, op);
  const RowTile t = row_tile(q, scales, K, K / group, op, six);
  return with_scales(scales, c10::nullopt, scale_factors, c10::nullopt, K / group, op, [&](auto sp, auto) {
    return f(QuantWeight<decltype(sp)>{static_cast<const uint8_t*>(q.data_ptr()), sp, {}, t, K, K / group, group, six});
  });
}

// As float32 w [N, K] (W8A8's weight with group = K): one pass instead of torch's untile, widen and scale.
at::Tensor int8_dequantize(at::Tensor q, at::Tensor scales, int64_t K, int64_t group,
                           c10::optional<at::Tensor> scale_factors) {
  return with_int8_weight(q, scales, scale_factors, K, group, "int8_dequantize", [&](const auto& qw) {
    const int64_t N = qw.six ? 4 * q.size(0) : q.size(0) * q.size(1) / K;
    auto w = at::empty({N, K}, scales.options().dtype(at::kFloat));
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) int8_row(qw, n, 0, K, wp + n * K);
    });
    return w;
  });
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
template <typename P>
static inline float int4_dot1(const int8_t* xq, const float* xd, const uint8_t* q, P s, P mins,
                              int64_t K, int64_t group, const RowTile& t, int r) {
  float total = 0.f;
  for (int64_t k = 0; k < K; k += QBLOCK) {
    const int64_t byte = k / 2, g = k / group;
    const uint8_t* w = q + r * t.q_row + byte / QBLOCK * t.q_unit + byte % QBLOCK;
    const float scale = widen(s[r * t.s_row + g * t.s_group]);
    const float minimum = mins ? widen(mins[r * t.s_row + g * t.s_group]) : -8.f * scale;
    int32_t xsum = 0;
    for (int64_t i = k; i < k + QBLOCK; ++i) xsum += xq[i];
    total += (float(int4_block_dot(xq + k, w)) * scale + float(xsum) * minimum) * xd[k / QBLOCK];
  }
  return total;
}

at::Tensor int4_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> bias, int64_t group, c10::optional<at::Tensor> scale_factors,
                       c10::optional<at::Tensor> min_factors) {
  x = x.contiguous();  // here rather than in the caller: in a replayed step, one op less per linear
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "int4_linear: x, q and scales must be matrices");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kByte, "int4_linear: float32 x and uint8 q only");
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous() && (!mins || mins->is_contiguous()),
              "int4_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && group % QBLOCK == 0 && K % group == 0 && (!mins || mins->sizes() == scales.sizes()),
              "int4_linear: group must be a multiple of 32 dividing K, mins shaped as scales");
  const int64_t groups = K / group;
  const RowTile t = row_tile(q, scales, K / 2, groups, "int4_linear");
  const int64_t N = q.size(0) * q.size(1) * 2 / K;
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const float* bp = bias_ptr(bias, N, "int4_linear");
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * K / QBLOCK);
  for (int64_t m = 0; m < M; ++m) quantize_row_q8(xp + m * K, K, xq.data() + m * K, xd.data() + m * K / QBLOCK);
#if defined(__AVX2__) && defined(__FMA__)
  const bool pairs = K % QPAIR == 0;
  std::vector<int8_t> xpairs(pairs ? M * K : 0);
  std::vector<float> dxv(pairs ? M * K / QPAIR * 8 : 0), xbv(dxv.size());
  const int64_t vs = K / QPAIR * 8;
  for (int64_t m = 0; pairs && m < M; ++m)
    pair_x(xq.data() + m * K, xd.data() + m * K / QBLOCK, K, mins ? 1.f : -8.f, xpairs.data() + m * K,
           dxv.data() + m * vs, xbv.data() + m * vs);
#endif
  // Tiles of four weight rows; each tile stays in L1 across the activation rows, XROWS of them at a time.
  // Without mins the weights are symmetric, every min -8 * scale, and a decode step reads a tenth fewer bytes
  // (groups of 32).
  return with_scales(scales, mins, scale_factors, min_factors, groups, "int4_linear", [&](auto sp, auto mp) {
    using P = decltype(sp);
    at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
      float out[XROWS][4];
      std::vector<float> buffer;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * 4, rows = std::min<int64_t>(4, N - n);
        const uint8_t* qt = qp + n * K / 2;
        const P mins = mp ? mp + n * groups : P{};
        with_tile_scales(sp + n * groups, mins, rows * groups, M > XROWS, buffer, [&](auto st, auto mt) {
        for (int64_t m0 = 0; m0 < M; m0 += XROWS) {
          const int64_t xrows = std::min<int64_t>(XROWS, M - m0);
  #if defined(__AVX2__) && defined(__FMA__)
          if (pairs && rows == 4) {
            int4_dot4_pairs(int(xrows), xpairs.data() + m0 * K, dxv.data() + m0 * vs, xbv.data() + m0 * vs, K, vs, qt,
                            st, mt, K, group, t, out);
          } else
  #endif
          {
            for (int64_t m = 0; m < xrows; ++m)
              for (int64_t r = 0; r < rows; ++r)
                out[m][r] = int4_dot1(xq.data() + (m0 + m) * K, xd.data() + (m0 + m) * K / QBLOCK, qt, st, mt, K, group,
                                      t, int(r));
          }
          for (int64_t m = 0; m < xrows; ++m)
            for (int64_t r = 0; r < rows; ++r) yp[(m0 + m) * N + n + r] = out[m][r] + (bp ? bp[n + r] : 0.f);
        }
        });
      }
    });
    return y;
  });
}

// int4_linear's weight as float32: one pass over the packed bytes instead of torch's unpack, widen, scale
// and add. The multiply and the add round separately, as torch's do, so both give the same bits (no fused
// multiply-add).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename P>
static void int4_row(const QuantWeight<P>& w, int64_t n, int64_t k0, int64_t kc, float* out) {
  const int64_t b = n / 4 * 4, r = n % 4;
  const uint8_t* q = w.q + b * w.K / 2 + r * w.t.q_row;
  for (int64_t k = k0; k < k0 + kc; k += QBLOCK) {
    const int64_t byte = k / 2, g = b * w.groups + r * w.t.s_row + k / w.group * w.t.s_group;
    const uint8_t* src = q + byte / QBLOCK * w.t.q_unit + byte % QBLOCK;
    const float scale = widen(w.scales[g]), minimum = w.mins ? widen(w.mins[g]) : -8.f * scale;
    float* o = out + k - k0;
#if defined(__AVX512F__)
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    const __m512 sv = _mm512_set1_ps(scale), mv = _mm512_set1_ps(minimum);
    const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(bytes, 4);
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), sv), mv));
    _mm512_storeu_ps(o + QBLOCK / 2, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), sv), mv));
#else
    for (int64_t i = 0; i < QBLOCK / 2; ++i) {
      o[i] = float(src[i] & 15) * scale + minimum;
      o[i + QBLOCK / 2] = float(src[i] >> 4) * scale + minimum;
    }
#endif
  }
}
#pragma GCC pop_options

// f(the QuantWeight of int4 q [N, K / 2], its scales and mins, in rows or tiles).
template <typename F>
static at::Tensor with_int4_weight(const at::Tensor& q, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                                   const c10::optional<at::Tensor>& scale_factors,
                                   const c10::optional<at::Tensor>& min_factors, int64_t K, int64_t group,
                                   const char* op, F&& f) {
  TORCH_CHECK(q.dim() == 2 && scales.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() &&
                  scales.is_contiguous() && (!mins || (mins->sizes() == scales.sizes() && mins->is_contiguous())),
              op, ": contiguous uint8 q, scales and mins shaped as scales");
  TORCH_CHECK(group > 0 && group % QBLOCK == 0 && K % group == 0, op, ": group must be a multiple of 32 dividing K");
  const RowTile t = row_tile(q, scales, K / 2, K / group, op);
  return with_scales(scales, mins, scale_factors, min_factors, K / group, op, [&](auto sp, auto mp) {
    return f(QuantWeight<decltype(sp)>{q.data_ptr<uint8_t>(), sp, mp, t, K, K / group, group});
  });
}

at::Tensor int4_dequantize(at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins, int64_t K, int64_t group,
                           c10::optional<at::Tensor> scale_factors, c10::optional<at::Tensor> min_factors) {
  const char* op = "int4_dequantize";
  return with_int4_weight(q, scales, mins, scale_factors, min_factors, K, group, op, [&](const auto& qw) {
    const int64_t N = q.size(0) * q.size(1) * 2 / K;
    auto w = at::empty({N, K}, scales.options().dtype(at::kFloat));
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) int4_row(qw, n, 0, K, wp + n * K);
    });
    return w;
  });
}

// Prefill against int8 or int4 weights: y = x @ w.T (+ bias) in float32 on the values int8_dequantize /
// int4_dequantize give, without their float copy of the whole matrix. The activations are packed once as
// panels of 16 rows ([ceil(M / 16), K, 16]) and the weights are the tile's broadcast operand, dequantized
// as stored (row-major, no transposition), so the tile computes y's transpose. Each thread takes its
// weight rows DEQUANT_NB at a time: for each slice of DEQUANT_KC input channels (whose panels stay in L2),
// MR rows at a time are dequantized and run against every panel, accumulating into the chunk's transpose,
// which is written into y's columns at the end. Each weight is read and dequantized once per call.
// Qwen2.5-Coder-1.5B's four layer shapes, 2 threads, Xeon with AMX (2026-12-04), ms at 64 / 128 / 512
// rows: int8 here 25.0 / 44.9 / 164.0 against 45.2 / 88.7 / 378.5 on int8_linear's integer dot products
// and 67.0 / 85.3 / 199.0 dequantized for torch's GEMM; int4 25.6 / 44.4 / 177.8 against 33.9 / 71.4 / 290.2
// and 68.1 / 82.9 / 196.4.
constexpr int64_t DEQUANT_KC = 256;  // a slice of 512 rows' panels: 512 KiB
constexpr int64_t DEQUANT_NB = 32;   // MR-row blocks a chunk holds: 384 rows' transpose at 512 rows, 768 KiB

// Rows of one pass: beyond 512 a slice's panels outgrow L2; more rows take several passes, each weight
// dequantized again (2048 rows, int8, above: 717.7 ms in four passes, 674.6 dequantized for torch's GEMM).
constexpr int64_t DEQUANT_M = 512;

template <typename Weight, typename Row>
static void dequant_pass(const float* xp, int64_t M, int64_t N, const float* bias, const Weight& w, Row row,
                         float* yp) {
  const int64_t K = w.K, P = (M + NR - 1) / NR, Mp = P * NR;
  std::vector<float> panels(P * K * NR, 0.f);
  float* pp = panels.data();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = 0; i < std::min(NR, M - p * NR); ++i)
        for (int64_t k = 0; k < K; ++k) pp[(p * K + k) * NR + i] = xp[(p * NR + i) * K + k];
  });
  at::parallel_for(0, (N + MR - 1) / MR, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> wrows(MR * DEQUANT_KC), yt(DEQUANT_NB * MR * Mp);
    for (int64_t c0 = b0; c0 < b1; c0 += DEQUANT_NB) {
      const int64_t c1 = std::min(b1, c0 + DEQUANT_NB);
      for (int64_t k0 = 0; k0 < K; k0 += DEQUANT_KC) {
        const int64_t kc = std::min(DEQUANT_KC, K - k0);
        for (int64_t b = c0; b < c1; ++b) {
          const int64_t n0 = b * MR, rows = std::min(MR, N - n0);
          for (int64_t r = 0; r < rows; ++r) row(w, n0 + r, k0, kc, wrows.data() + r * kc);
          float* out = yt.data() + (b - c0) * MR * Mp;
          int64_t p = 0;
          for (; p + TILE_PANELS <= P; p += TILE_PANELS)
            tile<TILE_PANELS>(rows, wrows.data(), kc, pp + (p * K + k0) * NR, K * NR, kc, out + p * NR, Mp, k0 > 0,
                              TILE_PANELS * NR, nullptr);
          for (; p < P; ++p)
            tile<1>(rows, wrows.data(), kc, pp + (p * K + k0) * NR, K * NR, kc, out + p * NR, Mp, k0 > 0, NR, nullptr);
        }
      }
      // The chunk's transpose into y, 16 x 16 at a time: both sides stay within a few cache lines.
      const int64_t n_begin = c0 * MR, n_end = std::min(N, c1 * MR);
      for (int64_t m0 = 0; m0 < M; m0 += 16)
        for (int64_t nb = n_begin; nb < n_end; nb += 16)
          for (int64_t m = m0; m < std::min(M, m0 + 16); ++m)
            for (int64_t n = nb; n < std::min(n_end, nb + 16); ++n)
              yp[m * N + n] = yt[(n - n_begin) * Mp + m] + (bias ? bias[n] : 0.f);
    }
  });
}

#if defined(__AVX512BF16__)
// r[i] lane j <- r[j] lane i: a 16 x 16 transpose of 32-bit values in four rounds of 16 shuffles.
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // lane L: rows i, i + 1 interleaved, columns 4L, 4L + 1 | 4L + 2, 4L + 3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c] lane L: rows i .. i + 3 of column 4L + c
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather lane L of r[c], r[4 + c], r[8 + c], r[12 + c] into column 4L + c
    const __m512i e0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), e1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i f0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), f1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(e0, f0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(e0, f0, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(e1, f1, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(e1, f1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// A PanelFill for filled_panels_linear: weight rows 16p .. 16p + 15, k-values k0 .. k0 + kc, dequantized as
// int8_row / int4_row do (INT4 picks which), rounded to bfloat16 (to nearest even, as
// pack_panels(dequantize().bfloat16()) holds them) and laid out in pairs: each row's 32 values of a step are
// 16 pairs in one register, and 16 rows' registers transposed are the step's 16 pair rows of the panel.
// Multiply and add round separately, as in int4_row (fp-contract off).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <bool INT4, typename P>
static void fill_panel(const QuantWeight<P>& w, int64_t N, int64_t p, int64_t k0, int64_t kc, at::BFloat16* out) {
  const uint8_t* q[NR];  // int4's rows (int8 reads its units through int8_unit)
  P s[NR];
  for (int64_t j = 0; j < NR; ++j) {
    const int64_t n = std::min(p * NR + j, N - 1), b = n / 4 * 4, r = n % 4;
    q[j] = w.q + b * w.K / 2 + r * w.t.q_row;
    s[j] = w.scales + b * w.groups + r * w.t.s_row;
  }
  const int64_t rows = std::min(NR, N - p * NR);
  for (int64_t k = k0; k < k0 + kc; k += QBLOCK) {
    __m512i v[16];
    const int64_t g_lo = k / w.group, g_hi = (k + 16) / w.group;  // int8's groups of 16: two a step
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t off = s[j] - w.scales;
      __m512 lo, hi;
      if constexpr (INT4) {
        const int64_t byte = k / 2;
        const __m512i bytes = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[j] + byte / QBLOCK * w.t.q_unit + byte % QBLOCK)));
        const float scale = widen(s[j][g_lo * w.t.s_group]);
        const __m512 sv = _mm512_set1_ps(scale),
                     mv = _mm512_set1_ps(w.mins ? widen(w.mins[off + g_lo * w.t.s_group]) : -8.f * scale);
        lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), sv), mv);
        hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), sv), mv);
      } else {
        int8_t buffer[QBLOCK];
        const auto* src = reinterpret_cast<const __m128i*>(int8_unit(w, p * NR + j, k / QBLOCK, buffer));
        lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src))),
                           _mm512_set1_ps(widen(s[j][g_lo * w.t.s_group])));
        hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1))),
                           _mm512_set1_ps(widen(s[j][g_hi * w.t.s_group])));
      }
      v[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    for (int64_t j = rows; j < NR; ++j) v[j] = _mm512_setzero_si512();
    transpose16(v);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + ((k - k0) / 2 + i) * 2 * NR, v[i]);
  }
}
#pragma GCC pop_options
#endif

// Where the CPU's bfloat16 products serve (AMX tiles, AVX-512 BF16 dot products: ops.h, bf16_products), the
// weights are dequantized into bfloat16 panels a slice at a time for them (filled_panels_linear); elsewhere
// the float32 tile multiplies them (dequant_pass).
template <bool INT4, typename P>
static at::Tensor dequant_matmul(at::Tensor x, int64_t N, const float* bias, const QuantWeight<P>& w) {
  x = x.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == w.K, "dequant linear: float32 x [M, K]");
  const int64_t M = x.size(0);
  auto y = at::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  const PanelFill fill = [&](int64_t p, int64_t k0, int64_t kc, at::BFloat16* out) {
    fill_panel<INT4, P>(w, N, p, k0, kc, out);
  };
  float* yp = y.data_ptr<float>();
  if (filled_panels_linear(x.data_ptr<float>(), M, w.K, N, fill, yp)) {
    if (bias)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) yp[m * N + n] += bias[n];
    return y;
  }
#endif
  for (int64_t m0 = 0; m0 < M; m0 += DEQUANT_M)
    dequant_pass(x.data_ptr<float>() + m0 * w.K, std::min(DEQUANT_M, M - m0), N, bias, w,
                 INT4 ? int4_row<P> : int8_row<P>, y.data_ptr<float>() + m0 * N);
  return y;
}

at::Tensor int8_dequant_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                               int64_t group, c10::optional<at::Tensor> scale_factors) {
  const char* op = "int8_dequant_linear";
  return with_int8_weight(q, scales, scale_factors, x.size(-1), group, op, [&](const auto& w) {
    const int64_t N = w.six ? 4 * q.size(0) : q.size(0) * q.size(1) / w.K;
    return dequant_matmul<false>(x, N, bias_ptr(bias, N, op), w);
  });
}

at::Tensor int4_dequant_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins,
                               c10::optional<at::Tensor> bias, int64_t group, c10::optional<at::Tensor> scale_factors,
                               c10::optional<at::Tensor> min_factors) {
  const char* op = "int4_dequant_linear";
  return with_int4_weight(q, scales, mins, scale_factors, min_factors, x.size(-1), group, op, [&](const auto& w) {
    const int64_t N = q.size(0) * q.size(1) * 2 / w.K;
    return dequant_matmul<true>(x, N, bias_ptr(bias, N, op), w);
  });
}
