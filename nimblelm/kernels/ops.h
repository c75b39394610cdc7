// The ops cpu_ops.cpp registers, by the file that defines them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

// gemm.cpp: the float32 linear over weights packed in panels.
at::Tensor pack_panels(at::Tensor w);
at::Tensor packed_linear(at::Tensor x, at::Tensor panels, int64_t N, c10::optional<at::Tensor> bias);

// bf16_gemm.cpp: bfloat16 panels at several rows, with the activations rounded to bfloat16. amx_linear:
// packed_linear on AMX tiles, false (nothing done) where they do not serve M rows. dot_pairs: x rounded to
// bfloat16 pairs [M, Kp / 2] for the dot-product tiles (this thread's buffer, until its next call), nullptr
// where they do not serve M rows.
bool amx_linear(const float* x, const at::BFloat16* panels, float* y, int64_t M, int64_t K, int64_t Kp, int64_t N);
const int32_t* dot_pairs(const float* x, int64_t M, int64_t K, int64_t Kp);
// filled_panels_linear: y = x @ w.T for x [M, K] (K a multiple of 32) on the same products, w's bfloat16
// panels made as it goes by fill(p, k0, kc, out): panel p's k-values k0 .. k0 + kc (a multiple of 32) in the
// pair layout, [kc / 2, 16, 2], zero past N; false (nothing done) where the products do not serve M rows.
using PanelFill = std::function<void(int64_t p, int64_t k0, int64_t kc, at::BFloat16* out)>;
bool filled_panels_linear(const float* x, int64_t M, int64_t K, int64_t N, const PanelFill& fill, float* y);
// Which bfloat16 products serve from now on: "amx" (tiles), "dot" (AVX-512 BF16) or "off" (the panel
// kernel); a kind the CPU, the build or the OS lacks turns them off. Returns the fewest rows they take, 0
// for off.
int64_t set_bf16_products(const std::string& kind);
std::string bf16_products();
int64_t bf16_product_rows();

// quant_gemm.cpp: the int8, W8A8 and int4 linears, and their weights dequantized.
at::Tensor int8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                       int64_t group, c10::optional<at::Tensor> scale_factors);
at::Tensor w8a8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias);
at::Tensor int8_dequantize(at::Tensor q, at::Tensor scales, int64_t K, int64_t group,
                           c10::optional<at::Tensor> scale_factors);
at::Tensor int4_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> bias, int64_t group, c10::optional<at::Tensor> scale_factors,
                       c10::optional<at::Tensor> min_factors);
at::Tensor int4_dequantize(at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins, int64_t K, int64_t group,
                           c10::optional<at::Tensor> scale_factors, c10::optional<at::Tensor> min_factors);
// Prefill: x @ w.T (+ bias) in float32 on the dequantized values, a slice at a time.
at::Tensor int8_dequant_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                               int64_t group, c10::optional<at::Tensor> scale_factors);
at::Tensor int4_dequant_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins,
                               c10::optional<at::Tensor> bias, int64_t group, c10::optional<at::Tensor> scale_factors,
                               c10::optional<at::Tensor> min_factors);

// elementwise.cpp: norms, rotary embedding, the MLP's activation, greedy tokens.
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
void add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor w, double eps);
at::Tensor silu_mul(at::Tensor gate_up);
void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t head_dim);
at::Tensor greedy_tokens(at::Tensor logits);

// attention.cpp: new K/V into the paged cache, decode attention over it, prefill attention.
void write_kv_cache_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v,
                     at::Tensor slots);
void write_kv_cache_int8_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k_scales, at::Tensor v_scales,
                          at::Tensor k, at::Tensor v, at::Tensor slots);
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, double scale, int64_t window);
void paged_decode_attention_int8(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                 at::Tensor k_scales, at::Tensor v_scales, at::Tensor block_tables,
                                 at::Tensor context_lens, double scale, int64_t window);
void paged_decode_received_(at::Tensor received, at::Tensor q, at::Tensor k_cache, std::optional<at::Tensor> k_scales,
                            at::Tensor block_tables, at::Tensor context_lens, double scale,
                            std::optional<at::Tensor> draft_ranks);
void prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t window,
                       std::optional<at::Tensor> received);
void paged_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                             std::optional<at::Tensor> k_scales, std::optional<at::Tensor> v_scales,
                             at::Tensor block_tables, at::Tensor query_lens, at::Tensor context_lens, double scale,
                             int64_t window);
void lowbit_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor k_full,
                              at::Tensor v_full, double scale, int64_t window, int64_t block_size,
                              int64_t residual_length, std::optional<at::Tensor> received);
void lowbit_decode_attention(at::Tensor out, at::Tensor q, at::Tensor values, at::Tensor k_scale, at::Tensor k_min,
                             at::Tensor v_scale, at::Tensor v_min, at::Tensor residual, at::Tensor block_tables,
                             at::Tensor context_lens, at::Tensor residual_slots, double scale, int64_t window,
                             int64_t bits, int64_t residual_length, int64_t ring_length,
                             std::optional<at::Tensor> received);
void lowbit_decode_write_(at::Tensor values, at::Tensor k_scale, at::Tensor k_min, at::Tensor v_scale,
                          at::Tensor v_min, at::Tensor residual, at::Tensor k, at::Tensor v, at::Tensor block_tables,
                          at::Tensor context_lens, at::Tensor residual_slots, int64_t bits, int64_t ring_length);
