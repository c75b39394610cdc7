// CPU kernels for the model's forward pass, where eager torch is bound by per-op overhead and by GEMM
// kernels tuned for other shapes. This file binds them into one Python module; they live by topic:
//   gemm.cpp          packed_linear, the float32 linear over weights packed in panels (pack_panels)
//   quant_gemm.cpp    int8_linear, w8a8_linear, int4_linear, int8_dequantize, int4_dequantize
//   attention.cpp     write_kv_cache_(int8_), paged_decode_attention(_int8), prefill_attention
//   elementwise.cpp   rms_norm, add_rms_norm_, rope_, silu_mul
//   decode_stack.cpp  DecodeStack: all decoder layers of a decode step in one call
//   ops.h             their declarations; simd.h, panel_tile.h: helpers shared between the files
#include <torch/python.h>

#include "ops.h"

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
