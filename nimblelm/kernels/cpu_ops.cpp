// CPU kernels for the decode step, where eager torch is bound by per-op overhead and by GEMM
// kernels tuned for large matrices.
//
// skinny_linear: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for a few rows m. With one to a few
// activation rows the product is bound by reading w once from memory; the general GEMM kernels torch
// dispatches to reach well under the memory bandwidth there. This kernel streams each weight row
// exactly once, eight rows at a time with independent FMA chains (eight concurrent streams measured
// ~10% more bandwidth than four on this 2-core EPYC), and splits the rows over torch's own OpenMP pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
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

constexpr int ROWS = 8;

// ROWS weight rows against one activation row.
static inline void dot_rows(const float* x, const float* w, int64_t K, float* out) {
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) out[r] = hsum(acc[r]);
  for (; k < K; ++k) {
    for (int r = 0; r < ROWS; ++r) out[r] += w[r * K + k] * x[k];
  }
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

constexpr int ROWS = 8;

static inline void dot_rows(const float* x, const float* w, int64_t K, float* out) {
  for (int r = 0; r < ROWS; ++r) out[r] = dot1(x, w + r * K, K);
}
#endif

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "skinny_linear: float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "skinny_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "skinny_linear: bad bias");
    bp = bias->data_ptr<float>();
  }
  // Blocks of 64 rows: large enough to amortize scheduling, small enough to balance two threads.
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 64 / ROWS, [&](int64_t b0, int64_t b1) {
    float out[ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float* yr = yp + m * N;
        if (n + ROWS <= N) {
          dot_rows(xr, wp + n * K, K, out);
          for (int r = 0; r < ROWS; ++r) yr[n + r] = out[r] + (bp ? bp[n + r] : 0.f);
        } else {
          for (int64_t r = n; r < N; ++r) yr[r] = dot1(xr, wp + r * K, K) + (bp ? bp[r] : 0.f);
        }
      }
    }
  });
  return y;
}

// int8_linear: y = x @ (q * scales).T (+ bias) for int8 weights q [N, K] with one float32 scale per
// group of `group` input channels (scales [N, K / group], group a multiple of 32). Each activation row
// is quantized on the fly to int8 per block of 32 values (one float32 scale per block, as llama.cpp's
// Q8_0 x Q8_0 dot product does), so the inner loop is integer multiply-adds on 32 values per
// instruction and a decode step reads about a quarter of the fp32 bytes.
constexpr int64_t QBLOCK = 32;

static void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* d) {
  for (int64_t b = 0; b < K / QBLOCK; ++b) {
    float amax = 0.f;
    for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    d[b] = scale;
    for (int64_t k = b * QBLOCK; k < (b + 1) * QBLOCK; ++k) q[k] = int8_t(std::nearbyint(x[k] * inv));
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Sum over the 32 int8 pairs of a and b as 8 int32 lanes. maddubs wants unsigned x signed, so a's
// sign moves onto b; pairs of products stay within int16 as |a|, |b| <= 127.
static inline __m256i dot32_i8(__m256i a, __m256i b) {
  const __m256i prod16 = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
  return _mm256_madd_epi16(prod16, _mm256_set1_epi16(1));
}

// Rows ahead to prefetch: without it the int8 rows streamed at ~4 GB/s, a third of what fp32 rows
// reach, as the integer arithmetic leaves fewer loads in flight.
constexpr int64_t PREFETCH_ROWS = 16;

// Four weight rows against one quantized activation row.
static inline void int8_dot4(const int8_t* xq, const float* xd, const int8_t* q, const float* s, int64_t K,
                             int64_t group, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t groups = K / group;
  for (int64_t j = 0; j < groups; ++j) {  // groups outside, blocks inside: no division in the loop
    for (int64_t k = j * group; k < (j + 1) * group; k += QBLOCK) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
      const float dx = xd[k / QBLOCK];
      for (int r = 0; r < 4; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(q + (r + PREFETCH_ROWS) * K + k), _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + k));
        const __m256 d = _mm256_set1_ps(dx * s[r * groups + j]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_i8(xv, wv)), d, acc[r]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) out[r] = hsum(acc[r]);
}
#else
static inline void int8_dot4(const int8_t* xq, const float* xd, const int8_t* q, const float* s, int64_t K,
                             int64_t group, float* out) {
  const int64_t groups = K / group;
  for (int r = 0; r < 4; ++r) {
    float total = 0.f;
    for (int64_t k = 0; k < K; k += QBLOCK) {
      int32_t dot = 0;
      for (int64_t i = k; i < k + QBLOCK; ++i) dot += int32_t(xq[i]) * int32_t(q[r * K + i]);
      total += float(dot) * xd[k / QBLOCK] * s[r * groups + k / group];
    }
    out[r] = total;
  }
}
#endif

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                          int64_t group) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_linear: float32 x, int8 q and float32 scales only");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scales.is_contiguous(), "int8_linear: contiguous inputs only");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(group % QBLOCK == 0 && K % group == 0 && scales.size(0) == N && scales.size(1) == K / group,
              "int8_linear: group must be a multiple of 32 dividing K, scales [N, K / group]");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "int8_linear: bad bias");
    bp = bias->data_ptr<float>();
  }
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * K / QBLOCK);
  for (int64_t m = 0; m < M; ++m) quantize_row_q8(xp + m * K, K, xq.data() + m * K, xd.data() + m * K / QBLOCK);
  const int64_t groups = K / group;
  // Blocks of 64 weight rows, as in skinny_linear; each block's int8 rows stay in L1 across activation rows.
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    float out[4];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * 4;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.data() + m * K;
        const float* dr = xd.data() + m * K / QBLOCK;
        if (n + 4 <= N) {
          int8_dot4(xr, dr, qp + n * K, sp + n * groups, K, group, out);
          for (int r = 0; r < 4; ++r) yp[m * N + n + r] = out[r] + (bp ? bp[n + r] : 0.f);
          continue;
        }
        for (int64_t r = n; r < N; ++r) {  // the last rows, fewer than four: one at a time, scalar
          float total = 0.f;
          for (int64_t k = 0; k < K; k += QBLOCK) {
            int32_t dot = 0;
            for (int64_t i = k; i < k + QBLOCK; ++i) dot += int32_t(xr[i]) * int32_t(qp[r * K + i]);
            total += float(dot) * dr[k / QBLOCK] * sp[r * groups + k / group];
          }
          yp[m * N + r] = total + (bp ? bp[r] : 0.f);
        }
      }
    }
  });
  return y;
}

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
      for (int64_t i = 0; i < f; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
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

// k_cache[slot] = k and v_cache[slot] = v for each new token: one call instead of two index_copy_.
void write_kv_cache_(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
                     torch::Tensor slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "write_kv_cache_: cache layout");
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.dim() == 3 && v.dim() == 3,
              "write_kv_cache_: k and v must be float32 [tokens, kv_heads, head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), "write_kv_cache_: slots");
  const int64_t row = k.size(1) * k.size(2), num_slots = k_cache.numel() / row;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t* sp = slots.contiguous().data_ptr<int64_t>();
  // k and v are views into the fused qkv row, so each token's heads are contiguous but tokens are strided.
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "write_kv_cache_: each token's k and v heads must be contiguous");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t t = 0; t < k.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "write_kv_cache_: slot out of range");
    std::copy(kp + t * ks, kp + t * ks + row, kc + sp[t] * row);
    std::copy(vp + t * vs, vp + t * vs + row, vc + sp[t] * row);
  }
}

// Decode attention straight from the paged cache: one query token per sequence, each KV head's
// group of query heads scored against the sequence's cached keys block by block, so K and V are
// read once and never gathered into a padded copy. Positions before context_len - window are
// skipped when window > 0 (sliding-window attention).
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 3, "paged_decode_attention: q");
  TORCH_CHECK(out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: layout");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "paged_decode_attention: int64 tables");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2), G = H / KVH;
  const int64_t max_blocks = block_tables.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.contiguous().data_ptr<int64_t>();
  const int64_t* lens = context_lens.contiguous().data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KVH, kvh = i % KVH, len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - start;
      scores.assign(G * n, 0.f);
      const float* qg = qp + (b * H + kvh * G) * D;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = start + t;
        const float* k = kp + ((bt[b * max_blocks + pos / bs] * bs + pos % bs) * KVH + kvh) * D;
        for (int64_t g = 0; g < G; ++g) scores[g * n + t] = dot1(qg + g * D, k, D) * float(scale);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
        for (int64_t t = 0; t < n; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
        for (int64_t t = 0; t < n; ++t) s[t] /= sum;
      }
      float* o = op + (b * H + kvh * G) * D;
      std::fill(o, o + G * D, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = start + t;
        const float* v = vp + ((bt[b * max_blocks + pos / bs] * bs + pos % bs) * KVH + kvh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t];
          float* og = o + g * D;
          for (int64_t d = 0; d < D; ++d) og[d] += p * v[d];
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache");
  m.def("write_kv_cache_", &write_kv_cache_, "write new k and v rows into their cache slots");
  m.def("int8_linear", &int8_linear, "x @ dequantize(q, scales).T (+ bias): int8 weights, one scale per group");
  m.def("skinny_linear", &skinny_linear, "x @ w.T (+ bias) for a few rows of x, bound by reading w once");
  m.def("rms_norm", &rms_norm, "RMS norm of each row, times w");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; x = rms_norm(residual) * w, in place");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
  m.def("rope_", &rope_, "rotary embedding of the q and k heads of qkv, in place");
}
