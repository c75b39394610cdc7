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
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <algorithm>

#include "ops.h"
#include "panel_tile.h"

constexpr int64_t MC = 72;       // rows per pass over a panel slice
constexpr int64_t KC_MAX = 1024; // deepest slice: a slice (64 KiB) and 72 rows of it (288 KiB) stay in L2

// Depth of a panel for K input columns: bfloat16 panels are padded to whole AMX tiles (32 k-values).
static int64_t panel_depth(at::ScalarType type, int64_t K) { return type == at::kBFloat16 ? (K + 31) / 32 * 32 : K; }

// w [N, K] -> panels [ceil(N / 16), Kp, 16]: panel p is w[16p : 16p + 16, :] transposed, zero padded. A
// bfloat16 panel interleaves k-values in pairs, [Kp / 2, 16, 2], and pads K to Kp (panel_depth).
at::Tensor pack_panels(at::Tensor w) {
  const auto type = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf),
              "pack_panels: a float32, bfloat16 or float16 matrix only");
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR, Kp = panel_depth(type, K);
  auto padded = w.contiguous();
  if (N % NR || Kp != K) {
    padded = at::zeros({P * NR, Kp}, w.options());
    padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  }
  if (type == at::kBFloat16) return padded.view({P, NR, Kp / 2, 2}).permute({0, 2, 1, 3}).contiguous().view({P, Kp, NR});
  return padded.view({P, NR, K}).transpose(1, 2).contiguous();
}

// One or two rows against a thread's run of panels [p0, p1), several panels at a time: more weight
// streams in flight per core read memory faster. Two streams against one: about 1.2x on an AMD EPYC
// (AVX2, 120 SmolLM2-shaped layers, 2 threads, 2026-11-28); four against two, one register per panel
// row: 22.1 against 24.4 ms a batch-1 pass over SmolLM2's layers on an AVX-512 Xeon, medians of 10
// alternated (eight streams were slower, as was a software prefetch of the next panels; 2026-11-29).
constexpr int SKINNY_PANELS = VPP == 1 ? 4 : 2;

template <int PANELS, typename W>
static int64_t skinny_run(int64_t rows, const float* x, int64_t K, const W* w, int64_t ld, int64_t p, int64_t p1,
                          int64_t N, float* y) {
  for (; p + PANELS <= p1; p += PANELS) {
    const int64_t ncols = std::min(PANELS * NR, N - p * NR);
    if (rows == 1) panel_tile<1, PANELS, W>(x, K, w + p * ld, ld, K, y + p * NR, N, false, ncols, nullptr);
    else panel_tile<2, PANELS, W>(x, K, w + p * ld, ld, K, y + p * NR, N, false, ncols, nullptr);
  }
  return p;
}

template <typename W>
static void skinny_panels(int64_t rows, const float* x, int64_t K, const W* w, int64_t ld, int64_t p0, int64_t p1,
                          int64_t N, float* y) {
  int64_t p = skinny_run<SKINNY_PANELS>(rows, x, K, w, ld, p0, p1, N, y);
  if constexpr (SKINNY_PANELS > 2) p = skinny_run<2>(rows, x, K, w, ld, p, p1, N, y);
  if (p < p1) tile<1>(rows, x, K, w + p * ld, ld, K, y + p * NR, N, false, std::min(NR, N - p * NR), nullptr);
}

// y = x @ w.T for x [M, K] and w as pack_panels stored it, Kp deep, in float32, bfloat16 or float16 (W).
// With bfloat16 panels, pairs may hold x rounded to bfloat16 pairs [M, Kp / 2] (dot_pairs): then the tiles
// are AVX-512 BF16 dot products.
template <typename W>
static void panels_matmul(const float* xp, const W* wp, float* yp, int64_t M, int64_t K, int64_t Kp, int64_t N,
                          int64_t P, const int32_t* pairs = nullptr) {
  const int64_t slices = (K + KC_MAX - 1) / KC_MAX, KC = ((K + slices - 1) / slices + 1) & ~int64_t(1);  // even: whole bfloat16 pairs
  const int64_t ld = Kp * NR;
  // Each thread owns a run of panels; activations are re-read from cache instead.
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    if (M <= 2 && !pairs) return skinny_panels(M, xp, K, wp, ld, p0, p1, N, yp);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t m1 = std::min(M, m0 + MC);
        for (int64_t p = p0; p < p1; p += TILE_PANELS) {
          const int64_t panels = std::min<int64_t>(TILE_PANELS, p1 - p);
          const W* b = wp + p * ld + k0 * NR;
          const W* next = p + panels + panels <= P ? b + panels * ld : nullptr;
          const int64_t ncols = std::min(panels * NR, N - p * NR);
          for (int64_t m = m0; m < m1; m += MR) {
            const int64_t rows = std::min(MR, m1 - m);
            const W* pf = m == m0 ? next : nullptr;
#if defined(__AVX512BF16__)
            if constexpr (std::is_same_v<W, at::BFloat16>) {
              if (pairs) {
                const int32_t* a = pairs + m * (Kp / 2) + k0 / 2;
                if (panels == TILE_PANELS)
                  dot_rows<TILE_PANELS>(rows, a, Kp / 2, b, ld, (kc + 1) / 2, yp + m * N + p * NR, N, k0 > 0, ncols, pf);
                else
                  dot_rows<1>(rows, a, Kp / 2, b, ld, (kc + 1) / 2, yp + m * N + p * NR, N, k0 > 0, ncols, pf);
                continue;
              }
            }
#endif
            if (panels == TILE_PANELS)
              tile<TILE_PANELS>(rows, xp + m * K + k0, K, b, ld, kc, yp + m * N + p * NR, N, k0 > 0, ncols, pf);
            else
              tile<1>(rows, xp + m * K + k0, K, b, ld, kc, yp + m * N + p * NR, N, k0 > 0, ncols, pf);
          }
        }
      }
    }
  });
}

// y = x @ w.T (+ bias) for x [M, K] and w as pack_panels stored it; N is w's row count before padding.
// 16-bit panels are widened in registers: half the bytes of float32 to stream, the same float32 FMAs.
at::Tensor packed_linear(at::Tensor x, at::Tensor panels, int64_t N, c10::optional<at::Tensor> bias) {
  x = x.contiguous();  // here rather than in the caller: in a replayed step, one op less per linear
  const auto type = panels.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
              "packed_linear: float32, bfloat16 or float16 panels only");
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(1) == panel_depth(type, x.size(1)) &&
                  panels.size(2) == NR && panels.size(0) == (N + NR - 1) / NR, "packed_linear: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "packed_linear: float32 activations only");
  TORCH_CHECK(panels.is_contiguous(), "packed_linear: contiguous panels only");
  const int64_t M = x.size(0), K = x.size(1), Kp = panels.size(1), P = panels.size(0);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  if (type == at::kFloat)
    panels_matmul(x.data_ptr<float>(), panels.data_ptr<float>(), yp, M, K, Kp, N, P);
  else if (type == at::kBFloat16) {
    const auto* wp = panels.data_ptr<at::BFloat16>();
    if (!amx_linear(x.data_ptr<float>(), wp, yp, M, K, Kp, N))
      panels_matmul(x.data_ptr<float>(), wp, yp, M, K, Kp, N, P, dot_pairs(x.data_ptr<float>(), M, K, Kp));
  } else
    panels_matmul(x.data_ptr<float>(), panels.data_ptr<at::Half>(), yp, M, K, Kp, N, P);
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "packed_linear: bad bias");
    y.add_(*bias);
  }
  return y;
}
