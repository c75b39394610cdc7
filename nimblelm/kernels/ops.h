// The ops cpu_ops.cpp exports, by the file that defines them, and the decode stack that composes them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

// gemm.cpp: the float32 linear over weights packed in panels.
at::Tensor pack_panels(at::Tensor w);
at::Tensor packed_linear(at::Tensor x, at::Tensor panels, int64_t N, c10::optional<at::Tensor> bias);

// quant_gemm.cpp: the int8, W8A8 and int4 linears, and their weights dequantized.
at::Tensor int8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias,
                       int64_t group);
at::Tensor w8a8_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> bias);
at::Tensor int8_dequantize(at::Tensor q, at::Tensor scales, int64_t K, int64_t group);
at::Tensor int4_linear(at::Tensor x, at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> bias, int64_t group);
at::Tensor int4_dequantize(at::Tensor q, at::Tensor scales, c10::optional<at::Tensor> mins, int64_t K,
                           int64_t group);

// elementwise.cpp: norms, rotary embedding, the MLP's activation.
at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps);
void add_rms_norm_(at::Tensor x, at::Tensor residual, at::Tensor w, double eps);
at::Tensor silu_mul(at::Tensor gate_up);
void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t head_dim);

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

// decode_stack.cpp
// The decode step as one call: a whole stack of decoder layers over a batch of one-token queries.
// Each layer is the same kernels the Python model calls one by one, composed here, so the Python and
// dispatch overhead between them (about a quarter of a batch-1 step on this CPU) goes away.

// One layer's cache as layers/attention.py's KVCache: (values [2, blocks, block_size, kv_heads, head_dim] in
// float32 or float16, or int8 with float32 scales [2, blocks, block_size, kv_heads]).
using KVCache = std::tuple<at::Tensor, c10::optional<at::Tensor>>;

// One linear layer as its LinearMethod stored it: (weight, scales, mins, bias, group, out_features).
// group 0: float32 panels from pack_panels; an int8 weight [N, K] with float32 scales [N, K / group];
// a uint8 weight [N, K / 2] of 4-bit values with float32 scales and mins [N, K / group] (no mins:
// symmetric, as int4_linear takes them); either in rows or row tiles (RowTile); group -1: W8A8,
// an int8 weight [N, K] with float32 scales [N, 1] and per-token int8 activations.
using LinearSpec = std::tuple<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                              c10::optional<at::Tensor>, int64_t, int64_t>;
// (input norm weight, post-attention norm weight, qkv, o, gate_up, down)
using LayerSpec = std::tuple<at::Tensor, at::Tensor, LinearSpec, LinearSpec, LinearSpec, LinearSpec>;

class DecodeStack {
 public:
  DecodeStack(std::vector<LayerSpec> layers, double eps, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : layers_(std::move(layers)), eps_(eps), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {}

  // x: [B, hidden] embeddings of the batch's new tokens; cos, sin: [B, head_dim] at their positions;
  // kv_caches: per layer a KVCache (above); window as paged_decode_attention takes it. Returns the last
  // hidden state (before the final norm), as the Python model does.
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, std::vector<KVCache> kv_caches,
                     at::Tensor slots, at::Tensor block_tables, at::Tensor context_lens, int64_t window);

 private:
  std::vector<LayerSpec> layers_;
  double eps_;
  int64_t heads_, kv_heads_, head_dim_;
};
