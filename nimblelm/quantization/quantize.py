"""`nimblelm quantize`: load a model, calibrate, quantize every linear layer, write a quantized folder.

The model is the engine's own: an LLM loaded in fp32, whose model runner (model and paged KV cache)
the calibration drives layer by layer. Its layers are quantized in place, so after `quantize_model` the
returned LLM is the in-memory quantized model, the same as what `LLM(model=output)` later loads.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nimblelm.errors import InvalidRequestError, UnsupportedModelError
from nimblelm.layers.linear import Linear
from nimblelm.llm import LLM
from nimblelm.models import registry
from nimblelm.quantization import awq, smoothquant
from nimblelm.quantization.calibration import CALIBRATION_SETS, calibration_samples, capture_inputs
from nimblelm.quantization.gptq import gptq_quantize
from nimblelm.quantization.saved import QuantizationConfig, save_quantized
from nimblelm.quantization.smoothing import scalable_inputs

# Symmetric int4 (as llama.cpp's Q4_0) unless the method is defined with zero points (AWQ).
_SYMMETRIC = {"rtn": True, "gptq": True, "awq": False, "smoothquant": True}


OFFLINE_ARCHITECTURES = ("llama", "qwen2")

def default_group_size(method: str, bits: int) -> int | None:
    """32 for int8 (the on-the-fly int8's group), 128 for int4, none for W8A8."""
    if method == "smoothquant":
        return None
    return 32 if bits == 8 else 128


def _version() -> str:
    try:
        return importlib.metadata.version("nimblelm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def quantize_model(
    model: str, method: str, bits: int, output: str | Path | None = None, group_size: int | None = None,
    calib: str = "sharegpt", calib_samples: int = 64, calib_seq_len: int = 512, seed: int = 0,
    act_order: bool = False, threads: int | None = None, progress: bool = True, texts: list[str] | None = None,
):
    """Quantize `model` and write it to `output` (when given); returns (the in-memory quantized LLM, its
    QuantizationConfig). `texts` replaces the calibration set's texts (tests)."""
    qconfig = make_config(model, method, bits, group_size, calib, calib_samples, calib_seq_len, seed, act_order)
    if output is not None:
        output = Path(output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise InvalidRequestError(f"{output} exists and is not an empty folder")
    llm = dense_llm(model, threads, calib_seq_len)
    stats = calibrate(llm, qconfig, texts, progress) if qconfig.calibration else None
    quantize_loaded(llm, qconfig, stats, output, progress)
    return llm, qconfig


def make_config(
    model: str, method: str, bits: int, group_size: int | None = None, calib: str = "sharegpt",
    calib_samples: int = 64, calib_seq_len: int = 512, seed: int = 0, act_order: bool = False,
) -> QuantizationConfig:
    """The recipe, checked (method, bits, group size, calibration set) before anything loads."""
    group_size = default_group_size(method, bits) if group_size is None else group_size
    calibrated = method != "rtn"
    qconfig = QuantizationConfig(
        method=method, bits=bits, group_size=group_size, symmetric=_SYMMETRIC.get(method, True),
        calibration=calib if calibrated else None, calib_samples=calib_samples if calibrated else None,
        calib_seq_len=calib_seq_len if calibrated else None, seed=seed if calibrated else None,
        act_order=act_order and method == "gptq", source=model, nimblelm_version=_version(),
    )
    if calibrated and calib not in CALIBRATION_SETS:
        raise InvalidRequestError(f"unknown calibration set {calib!r}: use {', '.join(CALIBRATION_SETS)}")
    return qconfig


def dense_llm(model: str, threads: int | None = None, max_len: int = 512) -> LLM:
    """The model loaded with plain fp32 weights (dense_weights), ready to calibrate and quantize in place.
    One sequence: calibration runs one sample at a time, so the KV cache needs room for one only. Eager:
    traces of decode steps (engine/step_capture.py) would hold the weights this replaces."""
    llm = LLM(model=model, dtype="float32", max_model_len=max(max_len, 2), max_num_seqs=1, num_threads=threads,
              enforce_eager=True)
    arch = llm.llm_engine.model_config.architecture
    if arch not in OFFLINE_ARCHITECTURES:
        # Calibration, smoothing and saved folders know the Llama layer's norms and checkpoint names only.
        raise UnsupportedModelError(
            f"{model}: nimblelm quantize supports {', '.join(OFFLINE_ARCHITECTURES)} models, not {arch}; "
            "quantize it at load instead (--quantization int8, int4 or w8a8)"
        )
    dense_weights(llm.llm_engine.runner.model)
    return llm


def calibrate(llm: LLM, qconfig: QuantizationConfig, texts: list[str] | None = None, progress: bool = True):
    """Input statistics of every linear layer over the recipe's calibration samples. One capture serves
    every method; GPTQ releases each layer's x^T x as it goes (_quantize_layers)."""
    samples = calibration_samples(llm.tokenizer, qconfig.calib_samples, qconfig.calib_seq_len, qconfig.seed, texts)
    return capture_inputs(llm.llm_engine.runner, samples, qconfig.seed, progress=progress)


def quantize_loaded(llm: LLM, qconfig: QuantizationConfig, stats, output: str | Path | None = None,
                    progress: bool = True) -> None:
    """Quantize the dense model of `llm` in place and write it to `output` (when given)."""
    lm = llm.llm_engine.runner.model
    _quantize_layers(lm, qconfig, stats, progress)
    if output is not None:
        save_quantized(Path(output), lm, registry.resolve(qconfig.source), llm.model_config, llm.tokenizer, qconfig)


@torch.no_grad()
def dense_weights(lm) -> None:
    """Undo the engine's fp32 storage choices that quantizing in place cannot keep: every Linear gets its
    weight back as a plain matrix (the engine repacks it into panels for its kernel), a tied embedding
    its own table (it reads the output layer's panels, which int4/int8/w8a8 storage does not offer)."""
    for module in lm.modules():
        if isinstance(module, Linear) and module.weight is None:
            module.weight = nn.Parameter(module.method.rows(module, torch.arange(module.out_features)).clone())
            for name, _ in list(module.named_buffers(recurse=False)):
                delattr(module, name)
    if not isinstance(lm.embed_tokens, nn.Embedding):
        lm.embed_tokens = nn.Embedding.from_pretrained(lm.lm_head.weight.detach().clone())


@torch.no_grad()
def _quantize_layers(lm, qconfig: QuantizationConfig, stats, progress: bool) -> None:
    method = qconfig.linear_method()
    if qconfig.method in ("awq", "smoothquant"):
        # Every scale is folded before any layer is rounded: o_proj's and down_proj's scales change
        # the rows of qkv_proj and gate_up_proj that produce their inputs.
        for entry in tqdm(scalable_inputs(lm), desc=f"{qconfig.method} scales", unit="layer", disable=not progress):
            if qconfig.method == "awq":
                entry.apply(awq.search_scale(entry, stats[entry.name], qconfig.group_size))
            else:
                entry.apply(smoothquant.smoothing_scale(entry, stats[entry.name]))
    linears = [(name, m) for name, m in lm.named_modules() if isinstance(m, Linear)]
    for name, layer in tqdm(linears, desc=f"{qconfig.method} int{qconfig.bits}", unit="layer", disable=not progress):
        if qconfig.method == "gptq":
            tensors = gptq_quantize(layer.weight, stats[name].take_hessian(), qconfig.bits, qconfig.group_size,
                                    qconfig.symmetric, qconfig.act_order)
            layer.adopt(method, tensors, layer.weight.dtype)
        else:
            layer.prepare(method)  # the method's own RTN (AWQ and SmoothQuant: of the scaled weight)
