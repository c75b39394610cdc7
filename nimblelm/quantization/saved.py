"""Quantized model folders: what `nimblelm quantize` writes and `LLM(model=DIR)` reads back.

A folder holds the model's config.json and tokenizer files, `quantization_config.json` (how it was
made) and `model.safetensors` with
- every weight that is not a linear layer's (embeddings, norms, possibly rescaled by AWQ or
  SmoothQuant), under its Hugging Face name;
- each linear layer's quantized tensors under its fused module name, e.g.
  `model.layers.0.self_attn.qkv_proj.qweight` (q, k and v in one matrix, as the decoder holds them),
  plus its bias if it has one. The formats are those of the linear methods: int4.py, int8.py, w8a8.py.

The loader hands the linear layers' tensors to the engine as they are, in the folder's format
(formats.py), and the layers adopt them: the kernels see exactly the saved values, and no fp32 copy of
a quantized layer is ever made.
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
from nimblelm.quantization import formats
from nimblelm.quantization.int4 import GROUP_SIZES

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

    @property
    def format(self) -> str:
        """The linear layers' format name (formats.py)."""
        return formats.format_name(self.linear_format, self.group_size)

    def linear_method(self) -> LinearMethod:
        return formats.linear_method(self.format, self.symmetric)


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


def read_quantized(
    folder: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, dict[str, torch.Tensor]]]] | None:
    """For a quantized folder: (its float weights under Hugging Face names, its linear layers as module
    name -> (format name, tensors)); else None.

    Every inconsistency (unknown format, a missing, extra or misshapen tensor) is a ModelFormatError.
    """
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    qconfig = _read_config(path)
    weights = dict(tensors)  # what is left once the layers take theirs: embeddings, norms, biases
    quantized: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for module, (n, k) in linear_shapes(config).items():
        expected = expected_tensors(qconfig, n, k)
        if module.endswith("qkv_proj") and config.attention_bias:
            expected["bias"] = (torch.float32, (n,))
        layer = {}
        for name, (dtype, shape) in expected.items():
            key = tensor_key(module, name)
            if key not in weights:
                raise ModelFormatError(f"{folder}: incomplete quantized model, {key} is missing")
            t = weights.pop(key)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ModelFormatError(
                    f"{folder}: {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} "
                    f"for {qconfig.linear_format}"
                )
            layer[name] = t
        symmetric_int4 = qconfig.linear_format == "int4" and qconfig.symmetric
        if symmetric_int4 and not torch.equal(layer["mins"], -8 * layer["scales"]):
            raise ModelFormatError(
                f"{folder}: {module}: its int4 minimums are not -8 * scales, as its symmetric config says"
            )
        if "bias" in layer:
            weights |= _hf_biases(config, module, layer.pop("bias"))
        quantized[module] = (qconfig.format, layer)
    return weights, quantized


def _hf_biases(config: ModelConfig, module: str, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """A qkv_proj's bias split back into its checkpoint tensors: the model loads biases with the float weights."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    base = module.rpartition(".")[0]
    parts = zip(("q_proj", "k_proj", "v_proj"), bias.split([q, kv, kv]))
    return {f"model.{base}.{part}.bias": t for part, t in parts}


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
