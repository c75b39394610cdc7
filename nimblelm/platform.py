"""The machine as the engine sees it (cores, memory), and the device, dtype and thread choices made once at
engine start."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from nimblelm.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidRequestError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device cuda was asked for, but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {name!r} is not supported: use auto, cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype asked for; "auto" is float32 on the CPU until the checkpoint is read (auto_cpu_dtype)."""
    if name == "auto":
        # On CPUs without AVX512-BF16, torch's bf16 GEMMs run ~4x slower than fp32 (docs/architecture.md).
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPES:
        raise InvalidRequestError(f"unknown dtype {name!r}: use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def stored_dtype(weights: dict[str, torch.Tensor]) -> torch.dtype:
    """The 16-bit type a folder's checkpoint stores every matrix in (a GGUF's: gguf_file.stored_dtype);
    float32 for anything else (a float32 checkpoint, mixed or quantized storage)."""
    stored = {t.dtype for t in weights.values() if t.dim() == 2}
    if len(stored) == 1 and stored <= {torch.bfloat16, torch.float16}:
        return stored.pop()
    return torch.float32


def auto_cpu_dtype(stored: torch.dtype, simd: bool) -> torch.dtype:
    """dtype="auto" on the CPU kernels: 16-bit weights where the kernels widen them in vector registers
    (AVX2, AVX-512), which read half of float32's bytes per decode step and multiply as fast or faster at
    every row count (benchmarks/README.md, 16-bit weights). The checkpoint's own 16-bit type where it
    stores every matrix in one, which rounds nothing; else bfloat16, which rounds float32's weights, as
    vLLM's auto does on a CPU (its perplexity cost: `nimblelm eval quantization`). float32 on the scalar
    build, where widening costs more than the bytes it saves."""
    if stored in (torch.bfloat16, torch.float16):
        return stored
    return torch.bfloat16 if simd else torch.float32


# int4 and int2 are stored packed in bytes; torch's packed quantized dtypes name them (layers/kivi.py).
KV_CACHE_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
    "int4": torch.quint4x2, "int2": torch.quint2x4,
}


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """How K/V are stored: auto = in the model's dtype (a 16-bit one also where the CPU kernels compute in float32,
    as vLLM's auto keeps a bfloat16 model's cache in bfloat16); float32; float16 or bfloat16 = rounded to it (half the
    bytes of float32 for the decode attention to read); int8 = int8 with float32 scales; int4 and int2 = KIVI's
    keys per channel and values per token, the block being filled at full precision (layers/kivi.py)."""
    if name == "auto":
        return dtype
    if name in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[name]
    raise InvalidRequestError(f"unknown kv_cache_dtype {name!r}: use auto, {', '.join(KV_CACHE_DTYPES)}")


def physical_cores() -> int:
    """Cores, not hyper-threads: a second thread on a core only slows memory-bound matmuls."""
    cores = set()
    block: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("physical id", "core id"):
                    block[key.strip()] = value.strip()
                if not line.strip() and block:
                    cores.add((block.get("physical id"), block.get("core id")))
                    block = {}
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0))
    return max(1, min(len(cores) or usable, usable))


@functools.cache
def first_cpu() -> dict[str, str]:
    """The first processor's entries in /proc/cpuinfo (vendor_id, flags, ...); empty where there is none."""
    entries: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                entries[key.strip()] = value.strip()
    except OSError:
        pass
    return entries


def memory_total_bytes(meminfo: str | None = None) -> int | None:
    """The machine's memory (MemTotal of /proc/meminfo, else sysconf), or None where neither tells."""
    try:
        text = Path("/proc/meminfo").read_text(errors="replace") if meminfo is None else meminfo
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            return int(parts[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def set_threads(num_threads: int | None) -> int:
    if num_threads is not None and num_threads < 1:
        raise InvalidRequestError(f"num_threads must be >= 1, got {num_threads}")
    num_threads = num_threads or physical_cores()
    torch.set_num_threads(num_threads)
    return num_threads
