"""GGUF weights served as they are stored: `quantization="gguf"`.

Every linear-layer tensor whose GGUF type maps exactly onto one of nimblelm's formats is converted
straight from the file's bytes into that format, never passing through fp32:

| GGUF type | nimblelm format (int8.py / int4.py) | values | scale, min |
| --- | --- | --- | --- |
| Q8_0 | int8, group 32 | q | d |
| Q5_0 | int8, group 32 | q - 16 | d |
| Q6_K | int8, group 16 | q - 32 | sc, times the factor d (per 16, 256) |
| Q4_0 | int4, group 32 | q | d, -8 d |
| Q4_1 | int4, group 32 | q | d, m |
| Q4_K | int4, group 32 | q (nibbles reordered) | sc_j, m_j, times the factors d, -dmin (per 32, 256) |

The K-quants keep their scales in two levels, as stored: an int8 sub-scale per group and a float16 factor per
super-block of 256 weights (`scale_factors`, and `min_factors` for Q4_K's minimums), which the kernels multiply
where they read them; a group's scale costs 1 byte and 2/8 or 2/16 of a factor instead of 4 bytes of float32.
Dequantizing what is stored gives exactly (bit for bit) what `gguf.quants.dequantize` gives: every product of
an fp16 scale by the small integers above is exact in float32, so only the final add of Q4_1/Q4_K rounds, and
it rounds the same way in both.

A fused layer (q/k/v, gate/up) is fused in one format when its parts share one: int8 parts with
different groups take the finest group (the coarser scales repeated, exact; K-quant parts among them have
their factors multiplied in first). Parts of both families (int8 and int4) are stacked: consecutive parts
that fuse are one part, each part keeps its format (stacked.py). A layer with a part of a type without an
exact mapping (F32, F16, ...) has its parts dequantized to fp32 and takes the unquantized path.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from nimblelm.config import ModelConfig
from nimblelm.errors import ModelFormatError, UnsupportedModelError
from nimblelm.quantization import stacked
from nimblelm.quantization.formats import format_name
from nimblelm.quantization.int8 import plain_scales

Q = gguf.GGMLQuantizationType
QK_K = 256

# module name of a checkpoint weight's layer in the decoder, and the part it fills of a fused layer
_PACKED = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
           "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}


@dataclass
class Converted:
    """One tensor in a nimblelm format: 'int8' (qweight, scales) or 'int4' (qweight, scales, mins), K-quants with
    their factors (scale_factors, min_factors)."""

    kind: str
    group: int
    tensors: dict[str, torch.Tensor]


def _f16(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


def _rows(values: np.ndarray, dtype, n: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=dtype).reshape(n, -1))


def _int8(q: np.ndarray, scales: np.ndarray, n: int, group: int, factors: np.ndarray | None = None) -> Converted:
    tensors = {"qweight": _rows(q, np.int8, n)}
    if factors is None:
        tensors["scales"] = _rows(scales, np.float32, n)
    else:
        tensors |= {"scales": _rows(scales, np.int8, n), "scale_factors": _rows(factors, np.float16, n)}
    return Converted("int8", group, tensors)


def _int4(packed: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int,
          factors: tuple[np.ndarray, np.ndarray] | None = None) -> Converted:
    tensors = {"qweight": _rows(packed, np.uint8, n)}
    if factors is None:
        tensors |= {"scales": _rows(scales, np.float32, n), "mins": _rows(mins, np.float32, n)}
    else:
        tensors |= {"scales": _rows(scales, np.int8, n), "mins": _rows(mins, np.int8, n),
                    "scale_factors": _rows(factors[0], np.float16, n), "min_factors": _rows(factors[1], np.float16, n)}
    return Converted("int4", 32, tensors)


def _q8_0(b: np.ndarray, n: int) -> Converted:
    return _int8(b[:, 2:].view(np.int8), _f16(b[:, :2]), n, 32)


def _q5_0(b: np.ndarray, n: int) -> Converted:
    d, qh, qs = _f16(b[:, :2]), np.ascontiguousarray(b[:, 2:6]).view(np.uint32), b[:, 6:]
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # bit i: the 5th bit of weight i
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # byte i: weight i low nibble, weight i + 16 high
    return _int8((low | (high << 4)).astype(np.int8) - np.int8(16), d, n, 32)


def _q6_k(b: np.ndarray, n: int) -> Converted:
    nb = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    # 128 weights per half: low nibbles of 64 bytes are weights 0..63, high nibbles 64..127; the 2-bit
    # high parts of 32 bytes give weights 0..31, 32..63, 64..95, 96..127 at shifts 0, 2, 4, 6.
    low = (ql.reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(nb, 256) | (high.reshape(nb, 256) << 4)).astype(np.int8) - np.int8(32)
    return _int8(q, np.ascontiguousarray(sc).view(np.int8), n, 16, factors=d)


def _q4_0(b: np.ndarray, n: int) -> Converted:
    d = _f16(b[:, :2])
    return _int4(b[:, 2:], d, -8 * d, n)  # the nibble order is int4.py's block layout already


def _q4_1(b: np.ndarray, n: int) -> Converted:
    return _int4(b[:, 4:], _f16(b[:, :2]), _f16(b[:, 2:4]), n)


def q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 6-bit scales and mins of each Q4_K super-block, from its 12 packed bytes."""
    nb = scales.shape[0]
    d, m, m_d = (scales.reshape(nb, 3, 4)[:, i] for i in range(3))
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def q4_k_to_blocks(qs: np.ndarray) -> np.ndarray:
    """Q4_K's 128 nibble bytes per super-block -> int4.py's layout of the same 256 weights.

    Q4_K: 4 chunks of 32 bytes, chunk j's low nibbles are weights 64j..64j+31 and its high nibbles
    64j+32..64j+63. int4.py: 8 blocks of 16 bytes, block i's byte t holds weights 32i+t (low) and
    32i+t+16 (high).
    """
    nb = qs.shape[0]
    chunks = qs.reshape(nb, 4, 32)
    q = np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(nb, 8, 2, 16)  # weights in order, by block
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)


def blocks_to_q4_k(packed: np.ndarray) -> np.ndarray:
    """The inverse of q4_k_to_blocks."""
    nb = packed.shape[0]
    blocks = packed.reshape(nb, 8, 16)
    q = np.stack([blocks & 0x0F, blocks >> 4], axis=2).reshape(nb, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)


def _q4_k(b: np.ndarray, n: int) -> Converted:
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = q4_k_scale_min(b[:, 4:16])  # 6-bit: int8 holds them
    return _int4(q4_k_to_blocks(b[:, 16:]), sc, mn, n, factors=(d, -dmin))


CONVERTERS = {Q.Q8_0: _q8_0, Q.Q5_0: _q5_0, Q.Q6_K: _q6_k, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q4_K: _q4_k}


def convert(data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> Converted | None:
    """A 2-D GGUF tensor's raw bytes ([rows, bytes per row]) in a nimblelm format; None when its type has
    no exact mapping."""
    converter = CONVERTERS.get(qtype)
    if converter is None or len(shape) != 2:
        return None
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    return converter(np.ascontiguousarray(data).reshape(-1, type_size), shape[0])


def fuse(parts: list[Converted]) -> Converted | None:
    """The parts (stacked along the outputs) in one format, or None when they do not share one."""
    kinds = {c.kind for c in parts}
    if len(kinds) != 1:
        return None
    group = min(c.group for c in parts)
    if any(c.group % group for c in parts):
        return None
    if len({(c.group, tuple(c.tensors)) for c in parts}) > 1:  # factored parts with others: multiply them in
        parts = [Converted(c.kind, c.group, plain_scales(c.tensors)) for c in parts]
    tensors = {}
    for key in parts[0].tensors:
        pieces = [c.tensors[key] for c in parts]
        if key != "qweight":  # repeat a coarser group's scale over each of its finer groups: exact
            pieces = [t.repeat_interleave(c.group // group, dim=1) for t, c in zip(pieces, parts)]
        tensors[key] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return Converted(parts[0].kind, group, tensors)


def stack(parts: list[Converted]) -> tuple[str, dict[str, torch.Tensor]]:
    """Parts that share no format as a stacked layer (format name, tensors): runs of consecutive parts that fuse
    are one part."""
    runs = [parts[0]]
    for c in parts[1:]:
        merged = fuse([runs[-1], c])
        if merged is None:
            runs.append(c)
        else:
            runs[-1] = merged
    name = stacked.stack_name([(format_name(c.kind, c.group), c.tensors["qweight"].shape[0]) for c in runs])
    return name, {f"{index}.{key}": t for index, c in enumerate(runs) for key, t in c.tensors.items()}


def module_of(hf: str, config: ModelConfig) -> tuple[str, int, int] | None:
    """(decoder module, part index, number of parts) of a Hugging Face weight name that a linear layer
    holds (the token embedding counts as one: the lm_head it is tied to, or a table of rows)."""
    if hf == "model.embed_tokens.weight":
        return ("lm_head" if config.tie_word_embeddings else "embed_tokens", 0, 1)
    if hf == "lm_head.weight":
        return ("lm_head", 0, 1)
    if not hf.endswith(".weight") or not hf.startswith("model.layers."):
        return None
    module = hf.removeprefix("model.").removesuffix(".weight")
    base, _, leaf = module.rpartition(".")
    if leaf in _PACKED:
        fused, index, count = _PACKED[leaf]
        return (f"{base}.{fused}", index, count)
    if leaf in ("o_proj", "down_proj"):
        return (module, 0, 1)
    return None


def split_direct(model_file, config: ModelConfig, expected: dict[str, tuple[int, ...]], fp32) -> tuple[
        dict[str, torch.Tensor], dict[str, tuple[str, dict[str, torch.Tensor]]], dict[str, tuple[str, ...]]]:
    """What a GGUF file holds, split for quantization="gguf": fp32 weights under Hugging Face names for
    everything not served as stored; module name -> (format name, tensors) for the layers that are; and
    module name -> GGUF types of its parts for the layers that fell back to fp32.

    `fp32(tensor, hf_name)` dequantizes one tensor as the normal load does (gguf_file.py).
    """
    from nimblelm.models.gguf_file import hf_name, release_pages, unpermute_qk

    path = model_file.path
    weights: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, tuple[str, object]]] = {}
    counts: dict[str, int] = {}
    for tensor in model_file.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise UnsupportedModelError(f"{path}: unexpected tensor {tensor.name!r} for arch {config.architecture}")
        place = module_of(name, config)
        if place is None or name not in expected:
            weights[name] = fp32(tensor, name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise ModelFormatError(f"{path}: weight {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        module, index, count = place
        groups.setdefault(module, {})[index] = (name, tensor)
        counts[module] = count
    quantized: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    fallbacks: dict[str, tuple[str, ...]] = {}
    for module, parts in groups.items():
        if len(parts) != counts[module]:
            missing = [n for n in range(counts[module]) if n not in parts]
            raise ModelFormatError(f"{path}: {module} lacks part {missing[0]}")
        ordered = [parts[i] for i in range(counts[module])]
        converted = []
        for name, tensor in ordered:
            c = convert(tensor.data, tensor.qtype, tensor.shape)
            if c is None:
                break
            if config.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
                c.tensors = {k: unpermute_qk(t, heads).contiguous() for k, t in c.tensors.items()}
            converted.append(c)
        if len(converted) < len(ordered):
            fallbacks[module] = tuple(tensor.qtype.name for _, tensor in ordered)
            for name, tensor in ordered:
                weights[name] = fp32(tensor, name)
        elif (fused := fuse(converted)) is not None:
            quantized[module] = (format_name(fused.kind, fused.group), fused.tensors)
        else:
            quantized[module] = stack(converted)
        for _, tensor in ordered:
            release_pages(tensor)
    return weights, quantized, fallbacks
