// The ops cpu_ops.cpp registers, by the file that defines them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

// gemm.cpp: the float32 linear over weights packed in panels.
at::Tensor pack_panels(at::Tensor w);
at::Tensor packed_linear(at::Tensor x, at::Tensor panels, int64_t N, c10::optional<at::Tensor> bias);

// amx_gemm.cpp: packed_linear's bfloat16 path on AMX tiles; false (and nothing done) where it does not apply.
bool amx_linear(const float* x, const at::BFloat16* panels, float* y, int64_t M, int64_t K, int64_t Kp, int64_t N);
// Whether AMX tiles serve from now on (enable, and the CPU, the build and the OS allow them): the fewest
// rows they take, 0 for off.
int64_t set_amx(bool enable);
int64_t amx_rows();

// quant_gemm.cpp: the int8, W8A8 and int4 linears, and their weights dequantized.
at::Tensor int8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                       int64_t group);
at::Tensor w8a8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias);
at::Tensor int8_dequantize(at::Tensor q, at::Tensor scales, int64_t K, int64_t group);
at::Tensor int4_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> bias, int64_t group);
at::Tensor int4_dequantize(at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins, int64_t K,
                           int64_t group);

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
void prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, double scale,
                       int64_t window);
