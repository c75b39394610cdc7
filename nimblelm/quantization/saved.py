"""Quantized model folders: what `nimblelm quantize` writes and `LLM(model=DIR)` reads back.

A folder holds the model's config.json and tokenizer files, `quantization_config.json` (how it was
made) and `model.safetensors` with
- every weight that is not a linear layer's (embeddings, norms, possibly rescaled by AWQ or
  SmoothQuant), under its Hugging Face name;
- each linear layer's quantized tensors under its fused module name, e.g.
  `model.layers.0.self_attn.qkv_proj.qweight` (q, k and v in one matrix, as the decoder holds them),
  plus its bias if it has one. The formats are those of the linear methods: int4.py, int8.py, w8a8.py.

Loading keeps the engine's single path: the loader hands the engine fp32 weights (the quantized ones
dequantized), the engine builds the model with the folder's linear method, then `load_into` copies
the saved tensors over the ones that method made, in place, so the kernels see exactly the saved values.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from nimblelm.config import ModelConfig
from nimblelm.errors import InvalidRequestError, ModelFormatError
from nimblelm.layers.linear import Linear, LinearMethod
from nimblelm.models.hf_config import hf_config_from
from nimblelm.quantization.int4 import GROUP_SIZES, Int4WeightOnly, dequantize_int4
from nimblelm.quantization.int8 import Int8WeightOnly, dequantize_int8
from nimblelm.quantization.w8a8 import W8A8

CONFIG_FILE = "quantization_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

# The bit widths each method can produce; smoothquant is W8A8 only.
METHOD_BITS = {"rtn": (4, 8), "gptq": (4, 8), "awq": (4,), "smoothquant": (8,)}


@dataclass(frozen=True)
class QuantizationConfig:
    method: str
    bits: int
    group_size: int | None  # None: one scale per output channel (W8A8)
    symmetric: bool
    calibration: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    seed: int | None = None
    act_order: bool = False
    source: str | None = None
    nimblelm_version: str = "unknown"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        check_options(self.method, self.bits, self.group_size)

    @property
    def linear_format(self) -> str:
        return "w8a8" if self.method == "smoothquant" else f"int{self.bits}"

    def linear_method(self) -> LinearMethod:
        if self.linear_format == "w8a8":
            return W8A8()
        if self.bits == 8:
            return Int8WeightOnly(self.group_size)
        return Int4WeightOnly(self.group_size, self.symmetric)


def check_options(method: str, bits: int, group_size: int | None) -> None:
    """Reject method, bits and group-size combinations nimblelm cannot produce (InvalidRequestError)."""
    if method not in METHOD_BITS:
        raise InvalidRequestError(f"unknown quantization method {method!r}: use {', '.join(METHOD_BITS)}")
    if bits not in METHOD_BITS[method]:
        allowed = " or ".join(map(str, METHOD_BITS[method]))
        raise InvalidRequestError(f"{method} cannot quantize to {bits} bits (it supports {allowed})")
    if method == "smoothquant":
        if group_size is not None:
            raise InvalidRequestError("smoothquant uses one scale per output channel: it takes no group size")
    elif group_size not in GROUP_SIZES:
        raise InvalidRequestError(f"group size must be one of {GROUP_SIZES}, got {group_size}")


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) features of every linear layer, by the decoder's module name."""
    from nimblelm.models.decoder import DecoderLM

    with torch.device("meta"):
        model = DecoderLM(config, max_positions=1)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, Linear)}


def tensor_key(module: str, tensor: str) -> str:
    """The file's key of a linear layer's tensor: the decoder's body is `model.` as in Hugging Face names."""
    return f"{module}.{tensor}" if module == "lm_head" else f"model.{module}.{tensor}"


def expected_tensors(qconfig: QuantizationConfig, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """What one linear layer of n outputs and k inputs stores in this folder's format."""
    if qconfig.linear_format == "w8a8":
        return {"qweight": (torch.int8, (n, k)), "scales": (torch.float32, (n,))}
    groups = (n, k // qconfig.group_size)
    if qconfig.bits == 8:
        return {"qweight": (torch.int8, (n, k)), "scales": (torch.float32, groups)}
    return {"qweight": (torch.uint8, (n, k // 2)), "scales": (torch.float32, groups), "mins": (torch.float32, groups)}


def dequantize(qconfig: QuantizationConfig, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if qconfig.linear_format == "w8a8":
        return t["qweight"].float() * t["scales"][:, None]
    if qconfig.bits == 8:
        return dequantize_int8(t["qweight"], t["scales"])
    return dequantize_int4(t["qweight"], t["scales"], t["mins"])


@dataclass
class SavedQuantization:
    """A quantized folder's config and its linear layers' tensors (module name -> tensor name -> tensor)."""

    config: QuantizationConfig
    linears: dict[str, dict[str, torch.Tensor]]

    def linear_method(self, on_the_fly: str | None) -> LinearMethod:
        if on_the_fly not in (None, "none"):
            raise InvalidRequestError(
                f"the model is already quantized ({self.config.method}, {self.config.bits} bits): "
                f"drop quantization={on_the_fly!r}"
            )
        return self.config.linear_method()

    @torch.no_grad()
    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the saved tensors over those the linear method made from the dequantized weights."""
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                try:
                    module.method.overwrite(module, self.linears[name])
                except ValueError as e:
                    raise ModelFormatError(f"{name}: {e}") from None


def read_quantized(folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]):
    """For a quantized folder: (fp32 weights under Hugging Face names, SavedQuantization); else None.

    Every inconsistency (unknown format, a missing, extra or misshapen tensor) is a ModelFormatError.
    """
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    qconfig = _read_config(path)
    tensors = dict(tensors)
    linears: dict[str, dict[str, torch.Tensor]] = {}
    for module, (n, k) in linear_shapes(config).items():
        expected = expected_tensors(qconfig, n, k)
        if module.endswith("qkv_proj") and config.attention_bias:
            expected["bias"] = (torch.float32, (n,))
        linears[module] = {}
        for name, (dtype, shape) in expected.items():
            key = tensor_key(module, name)
            if key not in tensors:
                raise ModelFormatError(f"{folder}: incomplete quantized model, {key} is missing")
            t = tensors.pop(key)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ModelFormatError(
                    f"{folder}: {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} "
                    f"for {qconfig.linear_format}"
                )
            linears[module][name] = t
    weights = tensors  # what is left: embeddings and norms, checked by the loader like any folder's
    for module, t in linears.items():
        weights |= _hf_weights(config, module, dequantize(qconfig, t), t.get("bias"))
    return weights, SavedQuantization(qconfig, linears)


def _hf_weights(config: ModelConfig, module: str, w: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """A fused layer's weight (and bias) split back into its checkpoint tensors."""
    prefix = "" if module == "lm_head" else "model."
    if module.endswith("qkv_proj"):
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        parts = dict(zip(("q_proj", "k_proj", "v_proj"), w.split([q, kv, kv])))
        biases = dict(zip(parts, bias.split([q, kv, kv]))) if bias is not None else {}
    elif module.endswith("gate_up_proj"):
        parts = dict(zip(("gate_proj", "up_proj"), w.split(config.intermediate_size)))
        biases = {}
    else:
        return {f"{prefix}{module}.weight": w}
    base = module.rpartition(".")[0]
    out = {f"{prefix}{base}.{part}.weight": t for part, t in parts.items()}
    return out | {f"{prefix}{base}.{part}.bias": t for part, t in biases.items()}


def _read_config(path: Path) -> QuantizationConfig:
    try:
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(QuantizationConfig)}
        qconfig = QuantizationConfig(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, missing keys, bad values
        raise ModelFormatError(f"{path}: not a valid quantization config ({exc})") from None
    if qconfig.format_version != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: format version {qconfig.format_version}, this nimblelm reads {FORMAT_VERSION}")
    return qconfig


def write_config(folder: Path, qconfig: QuantizationConfig) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(qconfig), indent=2) + "\n")


# Files of a Hugging Face folder that describe the model and its tokenizer (everything but weights).
_COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)


def save_quantized(
    output: Path, model: torch.nn.Module, source: Path, config: ModelConfig, tokenizer, qconfig: QuantizationConfig
) -> None:
    """Write `model` (a DecoderLM whose linear layers hold `qconfig`'s format), quantized from the model
    at `source` (a Hugging Face folder or a GGUF file), into an empty folder."""
    from safetensors.torch import save_file

    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            owned = {tensor_key(name, key): t for key, t in module.method.stored(module).items()}
            owned[tensor_key(name, "bias")] = module.bias
        else:  # embeddings and norms (the model itself owns no parameter directly)
            owned = {f"model.{name}.{key}": p for key, p in module.named_parameters(recurse=False)}
        # Clones: the engine packs its tensors into one buffer, and safetensors refuses shared storage.
        tensors |= {key: t.detach().clone() for key, t in owned.items() if t is not None}
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, output / WEIGHTS_FILE)
    if source.is_dir():
        for file in _COPIED_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, output / file)
    else:  # a GGUF: its metadata becomes a Hugging Face config and tokenizer
        hf_config_from(config).save_pretrained(output)
        tokenizer.save_pretrained(output)
    write_config(output, qconfig)
