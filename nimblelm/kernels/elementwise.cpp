// The row-wise ops between the linears: RMS norm (with the residual add), rotary embedding, silu * mul;
// and after the last one, each row's greedy token.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <cmath>

#include "ops.h"
#include "simd.h"

static void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2, name, ": contiguous 2-d float32 only");
}

// The sum of x's squares in double, in four vector accumulators where AVX2 is there: a sequential sum makes
// each addition wait for the one before (a 32-row SmolLM2 step's 59 norms took 0.8 ms so). Each square is exact
// in double; only the order of the additions differs, far below the float32 result's rounding.
static double sum_squares(const float* x, int64_t d) {
  double ss = 0.0;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (; i + 16 <= d; i += 16)
    for (int j = 0; j < 4; ++j) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * j));
      acc[j] = _mm256_fmadd_pd(v, v, acc[j]);
    }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; i < d; ++i) ss += double(x[i]) * x[i];
  return ss;
}

static void normalize_row(const float* in, float* out, const float* w, int64_t d, float eps) {
  const double ss = sum_squares(in, d);
  const float scale = 1.0f / std::sqrt(float(ss / d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = in[i] * scale * w[i];
}

// out = rms_norm(x) * w, one pass per row instead of six elementwise ops.
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps) {
  check_rows(x, "rms_norm");
  auto out = at::empty_like(x);
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
void add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor w, double eps) {
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
at::Tensor silu_mul(at::Tensor gate_up) {
  check_rows(gate_up, "silu_mul");
  const int64_t T = gate_up.size(0), f = gate_up.size(1) / 2;
  auto out = at::empty({T, f}, gate_up.options());
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
void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t head_dim) {
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

// Each row's index of its largest value, the first of equal ones (as torch's max; NaNs are passed over):
// the greedy tokens of a step's logits [rows, vocab]. A pass for the maximum (four independent maxima per
// lane), then a scan for its first position. torch's max(dim=-1) took 0.4 ms over [32, 49152] logits.
static int64_t first_max(const float* x, int64_t n) {
  float best = -INFINITY;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 m[4];
  for (auto& v : m) v = _mm256_set1_ps(-INFINITY);
  for (; i + 32 <= n; i += 32) {
    for (int j = 0; j < 4; ++j) m[j] = _mm256_max_ps(_mm256_loadu_ps(x + i + 8 * j), m[j]);  // a NaN keeps m[j]
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  for (float v : lanes) best = std::max(best, v);
#endif
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 target = _mm256_set1_ps(best);
  for (; i + 8 <= n; i += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hits) return i + __builtin_ctz(hits);
  }
#endif
  for (; i < n; ++i) {
    if (x[i] == best) return i;
  }
  return 0;  // no value above -inf: all -inf or NaN
}

at::Tensor greedy_tokens(at::Tensor logits) {
  logits = logits.contiguous();
  check_rows(logits, "greedy_tokens");
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = at::empty({R}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = first_max(lp + r * V, V);
  });
  return out;
}
