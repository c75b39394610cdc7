"""Reading GGUF files: hyper-parameters from the metadata, and the tensors dequantized to fp32 under
Hugging Face names, so the model definition sees the same weights whichever format they came from."""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from nimblelm.config import ModelConfig
from nimblelm.errors import ModelFormatError, UnsupportedModelError
from nimblelm.models.hparams import GEMMA3, Fields, check_attention, sliding_pattern

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# Texts llama.cpp also treats as end of generation when they are control tokens of the vocabulary:
# chat models end a turn with one of these even where the file's eos id names another token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
_CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 names its norms after Gemma 2's: llama.cpp's ffn_norm is the norm before the MLP in both, which
# Llama calls post_attention_layernorm and Gemma pre_feedforward_layernorm.
_GEMMA3_LAYER_TENSORS = _LAYER_TENSORS | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


_HALF_TYPES = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}


def stored_dtype(model_file: GGUFFile) -> torch.dtype:
    """The 16-bit type every matrix of the file is stored in (an F16 or BF16 GGUF), else float32: what
    platform.stored_dtype tells of a folder's safetensors."""
    types = {t.qtype for t in model_file.tensors if len(t.shape) > 1}
    if len(types) == 1 and (only := types.pop()) in _HALF_TYPES:
        return _HALF_TYPES[only]
    return torch.float32


def first_line(exc: BaseException) -> str:
    """A library's error message cut to its first line, since ours must stay one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------- the file format


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # outermost first, as numpy orders dims (GGUF lists them innermost first)
    data: np.ndarray  # raw bytes, one row per innermost line: (*shape[:-1], bytes per row)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


# numpy dtypes of the fixed-size GGUF value types; strings and arrays are read separately.
_VALUE_DTYPES = {
    gguf.GGUFValueType.UINT8: np.dtype("<u1"),
    gguf.GGUFValueType.INT8: np.dtype("<i1"),
    gguf.GGUFValueType.UINT16: np.dtype("<u2"),
    gguf.GGUFValueType.INT16: np.dtype("<i2"),
    gguf.GGUFValueType.UINT32: np.dtype("<u4"),
    gguf.GGUFValueType.INT32: np.dtype("<i4"),
    gguf.GGUFValueType.FLOAT32: np.dtype("<f4"),
    gguf.GGUFValueType.BOOL: np.dtype("?"),
    gguf.GGUFValueType.UINT64: np.dtype("<u8"),
    gguf.GGUFValueType.INT64: np.dtype("<i8"),
    gguf.GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_U32, _U64 = np.dtype("<u4"), np.dtype("<u8")


class _Cursor:
    """Sequential little-endian reads from the memory-mapped file.

    Not gguf.GGUFReader: it builds a numpy object per element of every metadata array, which takes 20 s
    for a 150k-token vocabulary on a small CPU; reading each numeric array at once takes milliseconds.
    """

    def __init__(self, data: np.ndarray, pos: int):
        self.data, self.pos = data, pos

    def take(self, dtype: np.dtype, count: int) -> np.ndarray:
        # frombuffer raises ValueError when the file ends before `count` items.
        items = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += dtype.itemsize * count
        return items

    def scalar(self, dtype: np.dtype):
        return self.take(dtype, 1)[0].item()

    def string(self) -> str:
        size = self.scalar(_U64)
        # Invalid UTF-8 in one vocabulary piece must not make the whole file unreadable.
        return self.take(np.dtype("u1"), size).tobytes().decode("utf-8", errors="replace")

    def value(self, kind: gguf.GGUFValueType):
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind == gguf.GGUFValueType.ARRAY:
            item_kind = gguf.GGUFValueType(self.scalar(_U32))
            count = self.scalar(_U64)
            if item_kind in _VALUE_DTYPES:
                return self.take(_VALUE_DTYPES[item_kind], count).tolist()
            return [self.value(item_kind) for _ in range(count)]
        return self.scalar(_VALUE_DTYPES[kind])


def open_gguf(path: Path) -> GGUFFile:
    """Parse the header, metadata and tensor table, turning every failure into one clear ModelFormatError."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (wrong magic bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        return _parse(path, data)
    except (ValueError, KeyError, IndexError, OverflowError) as exc:
        raise ModelFormatError(f"{path}: truncated or corrupt GGUF file ({first_line(exc)})") from None


def _parse(path: Path, data: np.ndarray) -> GGUFFile:
    cursor = _Cursor(data, len(GGUF_MAGIC))
    version = cursor.scalar(_U32)
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    tensor_count, metadata_count = cursor.scalar(_U64), cursor.scalar(_U64)
    metadata = {}
    for _ in range(metadata_count):
        key = cursor.string()
        metadata[key] = cursor.value(gguf.GGUFValueType(cursor.scalar(_U32)))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.take(_U64, cursor.scalar(_U32)).tolist()
        qtype = gguf.GGMLQuantizationType(cursor.scalar(_U32))
        infos.append((name, dims, qtype, cursor.scalar(_U64)))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: invalid GGUF alignment {alignment!r}")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = [_tensor(path, data, data_start + offset, name, dims, qtype) for name, dims, qtype, offset in infos]
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _tensor(path: Path, data: np.ndarray, start: int, name: str, dims: list[int], qtype) -> GGUFTensor:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if dims[0] % block_size:
        raise ModelFormatError(f"{path}: tensor {name}: rows of {dims[0]} values do not fill {qtype.name} blocks")
    shape = tuple(reversed(dims))
    row_bytes = dims[0] // block_size * block_bytes
    end = start + row_bytes * math.prod(dims[1:])
    if end > len(data):
        raise ModelFormatError(f"{path}: truncated GGUF file (tensor {name} ends at byte {end} of {len(data)})")
    return GGUFTensor(name, qtype, shape, data[start:end].reshape(*shape[:-1], row_bytes))


# ---------------------------------------------------------------- hyper-parameters


def architecture(model_file: GGUFFile) -> str:
    path, arch = model_file.path, Fields(model_file.metadata, str(model_file.path)).string("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise UnsupportedModelError(f"{path}: architecture {arch!r} is not supported (supported: {supported})")
    return arch


def read_config(model_file: GGUFFile) -> ModelConfig:
    path = model_file.path
    meta = Fields(model_file.metadata, str(path))
    arch = architecture(model_file)
    shapes = {t.name: t.shape for t in model_file.tensors}
    if "token_embd.weight" not in shapes:
        raise ModelFormatError(f"{path}: GGUF file has no token_embd.weight tensor")
    if "rope_freqs.weight" in shapes:
        # llama.cpp bakes llama3-style rope scaling into this tensor instead of describing it in metadata.
        raise UnsupportedModelError(
            f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported; use the HF folder"
        )

    def key(suffix: str) -> str:
        return f"{arch}.{suffix}"

    hidden = meta.integer(key("embedding_length"))
    num_heads = meta.integer(key("attention.head_count"))
    num_kv_heads = _kv_heads(meta, key("attention.head_count_kv"), num_heads)
    if not meta.has(key("attention.key_length")) and hidden % num_heads:
        raise meta.error(f"{key('embedding_length')} ({hidden}) is not a multiple of {key('attention.head_count')} "
                         f"({num_heads}) and {key('attention.key_length')} is not given")
    head_dim = meta.integer(key("attention.key_length"), hidden // num_heads)
    check_attention(
        meta, (key("attention.head_count"), num_heads), (key("attention.head_count_kv"), num_kv_heads),
        (key("attention.key_length"), head_dim),
    )
    num_layers = meta.integer(key("block_count"))
    options = {}
    if arch == "gemma3":
        options = GEMMA3 | {
            # Not in the files. llama.cpp, reading them, scales Gemma 3 27B's scores (62 layers) by hidden/heads
            # (its query_pre_attn_scalar, 168), every other size's by head_dim, as their configs say.
            "query_pre_attn_scalar": float(hidden // num_heads if num_layers == 62 else head_dim),
            "sliding_window": meta.integer(key("attention.sliding_window")),
            "layer_types": sliding_pattern(num_layers, 6),
            # Newer converters write the sliding layers' rope base; Gemma 3's is 10000 where they do not.
            "sliding_rope_theta": _decimal(meta.number(key("rope.freq_base_swa"), 10000.0)),
        }
    return ModelConfig(
        architecture=arch,
        # The embedding's rows are what the model can produce; the tokenizer may list fewer tokens.
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=meta.integer(key("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=_decimal(meta.number(key("rope.freq_base"), 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, path),
        rms_norm_eps=_decimal(meta.number(key("attention.layer_norm_rms_epsilon"))),
        max_position_embeddings=meta.integer(key("context_length"), 2048),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        bos_token_id=meta.integer("tokenizer.ggml.bos_token_id", None, minimum=0),
        eos_token_ids=_eos_ids(meta),
        **options,
    )


def _kv_heads(meta: Fields, key: str, num_heads: int) -> int:
    """llama.cpp writes one count, or one per layer for models whose layers differ."""
    counts = meta.array(key) if isinstance(meta.raw.get(key), list) else [meta.integer(key, num_heads)]
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in counts):
        raise meta.error(f"{key} must be a positive integer or a list of them, got {meta.raw.get(key)!r}")
    if len(set(counts)) != 1:
        raise UnsupportedModelError(f"{meta.source}: a different number of kv heads per layer is not supported")
    return counts[0]


def _decimal(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that
    round-trips through float32 is the value the model was configured with."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: Fields, arch: str, path: Path) -> dict | None:
    kind = meta.string(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _decimal(meta.number(f"{arch}.rope.scaling.factor"))}
    raise UnsupportedModelError(f"{path}: rope scaling {kind!r} is not supported (supported in GGUF: linear)")


def _eos_ids(meta: Fields) -> tuple[int, ...]:
    """The file's eos and eot ids, then every control token that ends a turn in some chat format."""
    ids = [i for key in ("eos_token_id", "eot_token_id") for i in meta.token_ids(f"tokenizer.ggml.{key}")]
    tokens = meta.array("tokenizer.ggml.tokens", [])
    token_types = meta.array("tokenizer.ggml.token_type", [])
    ids += [
        index
        for index, (token, kind) in enumerate(zip(tokens, token_types))
        if kind == _CONTROL_TOKEN and token in END_OF_TURN_TOKENS
    ]
    return tuple(dict.fromkeys(ids))


# ---------------------------------------------------------------- weights


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of architecture `arch`, or None when there is none."""
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match:
        layer, kind, suffix = match.groups()
        module = (_GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS).get(kind)
        return None if module is None else f"model.layers.{layer}.{module}.{suffix}"
    stem, _, suffix = gguf_name.rpartition(".")
    module = _GLOBAL_TENSORS.get(stem)
    return None if module is None else f"{module}.{suffix}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows for arch llama.

    llama.cpp's converter interleaves the two halves of every head's rows so that its rope can rotate
    adjacent pairs; Hugging Face's rotate_half pairs row i with row i + head_dim/2. This is its inverse.
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def release_pages(tensor: GGUFTensor) -> None:
    """Let the OS drop the file pages a tensor was read from (clean pages of a read-only mapping: touched
    again, they are read again), so a converted model does not keep its source resident too."""
    mapping = getattr(tensor.data, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    start = tensor.data.ctypes.data - np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + tensor.data.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.qtype).reshape(tensor.shape)


def read_weights(
    model_file: GGUFFile, config: ModelConfig, expected: dict[str, tuple[int, ...]], progress: bool
) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its Hugging Face name; `expected` (name -> shape) is checked
    before a tensor is converted."""
    path = model_file.path
    weights = {}
    for tensor in tqdm(model_file.tensors, desc=f"dequantize {path.name}", unit="tensor", disable=not progress):
        name = hf_name(tensor.name, config.architecture)
        if name is None:
            raise UnsupportedModelError(f"{path}: unexpected tensor {tensor.name!r} for arch {config.architecture}")
        if name in expected and tensor.shape != expected[name]:
            raise ModelFormatError(f"{path}: tensor {tensor.name} has shape {tensor.shape}, expected {expected[name]}")
        weights[name] = fp32_weight(model_file, tensor, name, config)
    return weights


def fp32_weight(model_file: GGUFFile, tensor: GGUFTensor, name: str, config: ModelConfig) -> torch.Tensor:
    """One tensor dequantized to fp32 under its Hugging Face `name`, in the row order and convention of
    Hugging Face checkpoints."""
    try:
        array = dequantize(tensor)
    except NotImplementedError as exc:
        raise UnsupportedModelError(f"{model_file.path}: cannot dequantize {tensor.name} ({first_line(exc)})") from None
    # A copy: F32 tensors come back as read-only views of the memory-mapped file.
    weight = torch.from_numpy(np.array(array, dtype=np.float32))
    if config.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
        weight = unpermute_qk(weight, heads).contiguous()
    if config.norm_weight_offset and name.endswith("norm.weight"):
        # llama.cpp's converter stores Gemma's norms as the factor they multiply by; checkpoints hold it minus 1.
        weight -= config.norm_weight_offset
    return weight
