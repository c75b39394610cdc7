// CPU kernels for the model's forward pass, where eager torch is bound by per-op overhead and by GEMM
// kernels tuned for other shapes. This file registers them as torch custom ops, torch.ops.nimblelm.*, so
// that a traced decode step (engine/step_capture.py) can call them from TorchScript; they live by topic:
//   gemm.cpp          packed_linear, the float32 linear over weights packed in panels (pack_panels)
//   bf16_gemm.cpp     its bfloat16 path for several rows: AMX tiles or AVX-512 BF16 dot products
//   quant_gemm.cpp    int8_linear, w8a8_linear, int4_linear, int8_dequantize, int4_dequantize,
//                     int8_dequant_linear, int4_dequant_linear
//   attention.cpp     write_kv_cache_(int8_), paged_decode_attention(_int8), paged_decode_received_ (H2O),
//                     prefill_attention, paged_prefill_attention, lowbit_decode_attention (an int4 or int2 cache)
//   elementwise.cpp   rms_norm, add_rms_norm_, rope_, silu_mul, greedy_tokens
//   ops.h             their declarations; simd.h, panel_tile.h: helpers shared between the files
// The schemas mark the tensors an op writes (Tensor(a!)), so that a trace keeps those calls in order.
#include <torch/library.h>

#include "ops.h"
#include "panel_tile.h"

static std::string simd() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
  const std::string vnni = ", VNNI int8 dot products";
#else
  const std::string vnni;
#endif
#if defined(__AVX512F__)
  return "AVX-512 (16-float registers)" + vnni;
#elif defined(HAVE_FVEC)
  return "AVX2 with FMA (8-float registers)" + vnni;
#else
  return "scalar (no AVX2: loops the compiler vectorizes as it can)";
#endif
}

TORCH_LIBRARY(nimblelm, m) {
  m.def("pack_panels(Tensor w) -> Tensor");  // w [N, K] as panels of 16 output columns, [ceil(N / 16), Kp, 16]
  m.def("packed_linear(Tensor x, Tensor panels, int N, Tensor? bias) -> Tensor");  // w as pack_panels stored it
  // bfloat16 products for bfloat16 panels from now on ("amx", "dot" or "off"), where offered: the fewest
  // rows they take, 0 for off. No tensor to dispatch on, so registered with their functions, for every
  // backend.
  m.def("set_bf16_products(str kind) -> int", &set_bf16_products);
  m.def("bf16_products() -> str", &bf16_products);  // the kind serving
  m.def("bf16_product_rows() -> int", &bf16_product_rows);  // the fewest rows it takes, 0 for off
  m.def("simd() -> str", &simd);  // the vector instructions this build's kernels use, in words
  // x @ dequantize(q, scales).T (+ bias): int8 weights, one scale per group (K-quants: int8 scales times the
  // float16 factors of their super-blocks)
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales, Tensor? bias, int group, "
        "Tensor? scale_factors=None) -> Tensor");
  // x @ (q * scales).T (+ bias) with x rounded to int8 per row: W8A8
  m.def("w8a8_linear(Tensor x, Tensor q, Tensor scales, Tensor? bias) -> Tensor");
  m.def("int8_dequantize(Tensor q, Tensor scales, int K, int group, Tensor? scale_factors=None) -> Tensor");  // [N, K]
  // x @ (scales * q + mins).T (+ bias): 4-bit weights, scale and min per group
  m.def("int4_linear(Tensor x, Tensor q, Tensor scales, Tensor? mins, Tensor? bias, int group, "
        "Tensor? scale_factors=None, Tensor? min_factors=None) -> Tensor");
  m.def("int4_dequantize(Tensor q, Tensor scales, Tensor? mins, int K, int group, Tensor? scale_factors=None, "
        "Tensor? min_factors=None) -> Tensor");
  // prefill: x @ dequantize(...).T (+ bias), the weights dequantized a slice at a time: into bfloat16 panels
  // for the bfloat16 products where they serve (bf16_products), for float32 FMAs elsewhere
  m.def("int8_dequant_linear(Tensor x, Tensor q, Tensor scales, Tensor? bias, int group, "
        "Tensor? scale_factors=None) -> Tensor");
  m.def("int4_dequant_linear(Tensor x, Tensor q, Tensor scales, Tensor? mins, Tensor? bias, int group, "
        "Tensor? scale_factors=None, Tensor? min_factors=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor w, float eps) -> ()");  // residual += x; x = norm
  m.def("silu_mul(Tensor gate_up) -> Tensor");  // silu(gate) * up of [gate | up]
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int head_dim) -> ()");  // q and k heads, in place
  m.def("greedy_tokens(Tensor logits) -> Tensor");  // each row's first largest value's index
  m.def("write_kv_cache_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  // k and v rounded per head to int8 as they are written
  m.def("write_kv_cache_int8_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scales, Tensor(d!) v_scales, "
        "Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> ()");
  m.def("paged_decode_attention_int8(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scales, "
        "Tensor v_scales, Tensor block_tables, Tensor context_lens, float scale, int window) -> ()");
  // H2O: each decode row's attention weights, summed over each KV head's query heads, added at its keys' slots
  // (of its draft rank's region).
  // Nothing in a step reads what it writes, so with received marked (a!) a trace's dead-code pass drops it and
  // the zeroing of the new entries before it; conservative aliasing (which takes no marks) keeps both.
  m.def(torch::schema("paged_decode_received_(Tensor received, Tensor q, Tensor k_cache, Tensor? k_scales, "
                      "Tensor block_tables, Tensor context_lens, float scale, Tensor? draft_ranks=None) -> ()",
                      c10::AliasAnalysisKind::CONSERVATIVE));
  // causal (and sliding-window) attention of a prompt chunk; with received [kv_heads, keys] (H2O's), each row's
  // weights are added there, summed over each KV head's query heads
  m.def("prefill_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, float scale, int window, "
        "Tensor(b!)? received=None) -> ()");
  // every prompt chunk of a step, straight from the paged cache (any stored type but int4/int2)
  m.def("paged_prefill_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_scales, "
        "Tensor? v_scales, Tensor block_tables, Tensor query_lens, Tensor context_lens, float scale, "
        "int window) -> ()");
  // a prompt chunk over an int4 or int2 cache: k, v as stored (dequantized), the entries from the first
  // query's residual on also at full precision (k_full, v_full): each query reads its last residual_length
  // entries, whole blocks, that way
  m.def("lowbit_prefill_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor k_full, Tensor v_full, "
        "float scale, int window, int block_size, int residual_length, Tensor(b!)? received=None) -> ()");
  // decode rows over an int4 or int2 cache: sealed blocks as stored, each row's last blocks from its residual ring
  m.def("lowbit_decode_attention(Tensor(a!) out, Tensor q, Tensor values, Tensor k_scale, Tensor k_min, "
        "Tensor v_scale, Tensor v_min, Tensor residual, Tensor block_tables, Tensor context_lens, "
        "Tensor residual_slots, float scale, int window, int bits, int residual_length, int ring_length, "
        "Tensor(b!)? received=None) -> ()");
  // decode rows' K/V into their residual rings, sealing (quantizing) the blocks they complete
  m.def("lowbit_decode_write_(Tensor(a!) values, Tensor(b!) k_scale, Tensor(c!) k_min, Tensor(d!) v_scale, "
        "Tensor(e!) v_min, Tensor(f!) residual, Tensor k, Tensor v, Tensor block_tables, Tensor context_lens, "
        "Tensor residual_slots, int bits, int ring_length) -> ()");
}

TORCH_LIBRARY_IMPL(nimblelm, CPU, m) {
  m.impl("pack_panels", &pack_panels);
  m.impl("packed_linear", &packed_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("int8_dequantize", &int8_dequantize);
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int8_dequant_linear", &int8_dequant_linear);
  m.impl("int4_dequant_linear", &int4_dequant_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_", &rope_);
  m.impl("greedy_tokens", &greedy_tokens);
  m.impl("write_kv_cache_", &write_kv_cache_);
  m.impl("write_kv_cache_int8_", &write_kv_cache_int8_);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_attention_int8", &paged_decode_attention_int8);
  m.impl("paged_decode_received_", &paged_decode_received_);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
  m.impl("lowbit_prefill_attention", &lowbit_prefill_attention);
  m.impl("lowbit_decode_attention", &lowbit_decode_attention);
  m.impl("lowbit_decode_write_", &lowbit_decode_write_);
}
