"""C++ kernels compiled on first use with torch's extension builder (gcc, -march=native).

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
        name = build_name(folder)
        _drop_stale_lock(name)
        load(name=name, sources=[str(p) for p in sorted(folder.glob("*.cpp"))],
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False)
        return torch.ops.nimblelm
    except Exception as e:  # noqa: BLE001 - any build failure means: fall back to torch ops
        warnings.warn(f"nimblelm: C++ kernels unavailable, using torch ops ({e.__class__.__name__}: {e})", stacklevel=2)
        return None


def build_name(folder: Path) -> str:
    """The extension's name, from a hash of every source and header in `folder` (names and contents):
    checkouts with different kernels (other branches, versions) never load or overwrite each other's
    build in torch's shared extensions folder."""
    digest = hashlib.sha256()
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
