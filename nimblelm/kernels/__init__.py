"""C++ kernels compiled on first use with torch's extension builder (gcc, -march=native): the build targets
the CPU it runs on, so each machine gets the widest variant its features allow (scalar, AVX2, AVX-512),
and bfloat16 weights at several rows multiply on AMX tiles or by AVX-512 BF16 dot products where the CPU
and the OS offer them and they are faster (choose_bf16_products).

NIMBLELM_KERNEL_ISA caps the variant: "avx512" (no AMX tiles), "avx2" or "scalar" build the kernels as for
a CPU without the wider features, which is how tests check every narrower variant on a wide CPU.
If the build is impossible (no compiler), nimblelm says so once and runs on torch's own ops.
NIMBLELM_DISABLE_KERNELS=1 chooses torch's ops on purpose: the reference path the kernels are tested against.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch


@functools.cache
def cpu_ops():
    """The compiled ops (torch.ops.nimblelm), or None when it cannot be built here or is disabled."""
    from torch.utils.cpp_extension import load

    if os.environ.get("NIMBLELM_DISABLE_KERNELS") == "1":
        return None
    # pip installs ninja into the venv's bin folder, which is not on PATH unless the venv is activated.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    folder = Path(__file__).parent
    try:
        # -fopenmp: at::parallel_for is an inline OpenMP region, serial unless compiled with it; the
        # library it links is torch's own libgomp (same soname, already loaded), so one thread pool.
        isa = kernel_isa_cap()
        flags = ["-O3", "-march=native", *ISA_FLAGS[isa], "-fopenmp"]
        name = build_name(folder, flags)
        _drop_stale_lock(name)
        load(name=name, sources=[str(p) for p in sorted(folder.glob("*.cpp"))],
             extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False)
        ops = torch.ops.nimblelm
        choose_bf16_products(ops, isa)
        return ops
    except Exception as e:  # noqa: BLE001 - any build failure means: fall back to torch ops
        warnings.warn(f"nimblelm: C++ kernels unavailable, using torch ops ({e.__class__.__name__}: {e})", stacklevel=2)
        return None


# The compiler flags of each cap on the variant; -mno-avx512f also drops the bfloat16 products (AMX tiles,
# AVX-512 BF16), which need AVX-512 to round activations. "avx512" is the native build with AMX switched off
# at run time (AVX-512 BF16 dot products instead, where the CPU has them).
ISA_FLAGS = {"native": [], "avx512": [], "avx2": ["-mno-avx512f"], "scalar": ["-mno-avx"]}


def choose_bf16_products(ops, isa: str) -> None:
    """Switch on the bfloat16 products that multiply fastest here. AMX tiles where offered (the avx512 cap
    leaves them out): 2-4x the panel kernel from 16 rows. AVX-512 BF16 dot products only where a start-up
    probe (32 rows of a SmolLM2-sized layer, best of 5 each, alternated) finds them at least 1.2x the panel kernel: their
    throughput differs by CPU (0.6x on the Xeon of 2026-12-04), and the margin keeps a close call from
    flipping between runs, which would change how activations are rounded."""
    if isa == "native" and ops.set_bf16_products("amx"):
        return
    if not ops.set_bf16_products("dot"):
        ops.set_bf16_products("off")
        return
    panels, x = ops.pack_panels(torch.randn(1536, 576).bfloat16()), torch.randn(32, 576)

    def seconds(kind: str) -> float:
        ops.set_bf16_products(kind)
        start = time.perf_counter()
        ops.packed_linear(x, panels, 1536, None)
        return time.perf_counter() - start

    # Each kind's calls alternate with the other's after an untimed first one, so that both see the same machine
    # state: timed one kind after the other, dot products (first, on the process's cold threads) lost the probe
    # in 2 of 24 starts on EPYC Zen 4, where they run 1.5-1.9x the panel kernel (alternated: none of 16).
    kinds = ("dot", "off")
    for kind in kinds:
        seconds(kind)
    best = dict.fromkeys(kinds, float("inf"))
    for _ in range(5):
        for kind in kinds:
            best[kind] = min(best[kind], seconds(kind))
    ops.set_bf16_products("dot" if 1.2 * best["dot"] <= best["off"] else "off")


def kernel_isa_cap() -> str:
    isa = os.environ.get("NIMBLELM_KERNEL_ISA", "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"NIMBLELM_KERNEL_ISA={isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    return isa


def kernels_in_use() -> str:
    """The kernels this process runs, in words, for benchmark headers."""
    ops = cpu_ops()
    if ops is None:
        return "torch ops (no C++ kernels)"
    text = f"C++ kernels, {ops.simd()}"
    products = bf16_products_in_words()
    return text + (f"; bfloat16 weights {products}" if products else "")


BF16_PRODUCTS = {"amx": "on AMX tiles", "dot": "by AVX-512 BF16 dot products"}


def bf16_products_in_words() -> str:
    """How bfloat16 linears of several rows multiply, e.g. "on AMX tiles from 8 rows"; "" for the panel
    kernel's float32 FMAs throughout."""
    ops = cpu_ops()
    if ops is None or not ops.bf16_product_rows():
        return ""
    return f"{BF16_PRODUCTS[ops.bf16_products()]} from {ops.bf16_product_rows()} rows"


def widens_in_registers() -> bool:
    """Whether these kernels widen 16-bit weights in vector registers (AVX2, AVX-512): there 16-bit panels
    run as fast as float32's or faster; the scalar build's run at half their speed."""
    ops = cpu_ops()
    return ops is not None and not ops.simd().startswith("scalar")


def build_name(folder: Path, flags: list[str] = ()) -> str:
    """The extension's name, from a hash of every source and header in `folder` (names and contents) and
    of the compiler flags: checkouts with different kernels (other branches, versions) and builds of other
    variants never load or overwrite each other's build in torch's shared extensions folder."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".cpp", ".h")):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return f"nimblelm_cpu_ops_{digest.hexdigest()[:12]}"


# A build killed midway (Ctrl-C during a first start) leaves torch's lock file behind, and every later
# start would wait on it forever, silently. The build takes about a minute on 2 cores, so a lock this
# old belongs to a dead build.
STALE_LOCK_S = 300


def _drop_stale_lock(name: str) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            warnings.warn(f"nimblelm: removed the lock of an interrupted kernel build ({lock})", stacklevel=3)
    except FileNotFoundError:
        pass


def ops_for(x: torch.Tensor):
    """The compiled ops when they apply to tensor x (float32 on the CPU), else None: use torch's."""
    # Called several times per layer and step: the cheapest checks torch offers.
    if x.dtype is torch.float32 and x.is_cpu:
        return cpu_ops()
    return None
