"""NVIDIA's `kvpress` as the peer of nimblelm's KV cache policies (SnapKV, StreamingLLM): their oracle and benchmark.

kvpress 0.5.5 needs transformers<5.3, which nimblelm's own pin rules out, so it runs in a worker process
(kvpress_worker.py) from an env of its own in `<cache>/peers/kvpress`. That env reuses the project's torch
rather than installing another: a venv of the project's interpreter whose site-packages holds an overlay,
installed --no-deps from the exact pins of kvpress-requirements.txt (kvpress, transformers 5.2 and the few
packages that version needs at other versions), ahead of a .pth line naming the project's site-packages for
everything else. The env is rebuilt when the pins, the interpreter or the project's site-packages change.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REQUIREMENTS = Path(__file__).with_name("kvpress-requirements.txt")
WORKER = Path(__file__).with_name("kvpress_worker.py")
STAMP = "nimblelm-env.txt"
METHODS = ("snapkv", "pyramidkv", "streaming")


class KvpressEnvError(RuntimeError):
    """The kvpress env could not be created; the message ends with the failing command's last line."""


def env_dir() -> Path:
    from nimblelm.bench.llamacpp_build import cache_dir

    return cache_dir() / "peers" / "kvpress"


def _project_site() -> Path:
    """The site-packages that holds the project's torch (found without importing it)."""
    return Path(importlib.util.find_spec("torch").origin).parents[1]


def _stamp() -> str:
    return f"{sys.version}\n{_project_site()}\n{REQUIREMENTS.read_text()}"


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise KvpressEnvError(f"could not create the kvpress env in {env_dir()} ({what}): {last}")


def ensure_env() -> Path:
    """The python to run the worker with, the env created first if it is missing or stale."""
    root = env_dir()
    python = root / "bin" / "python"
    stamp = _stamp()
    if python.exists() and (root / STAMP).is_file() and (root / STAMP).read_text() == stamp:
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kvpress.", dir=root.parent))  # built aside, renamed when complete
    try:
        _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], "python -m venv")
        site = tmp / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-deps",
              "--only-binary=:all:", "--target", str(site), "-r", str(REQUIREMENTS)], "pip install")
        (site / "nimblelm-project.pth").write_text(f"{_project_site()}\n")
        (tmp / STAMP).write_text(stamp)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def _ask(request: dict | list[dict]) -> dict | list[dict]:
    """One worker process for a request, or for a list of them on one model (their answers, in order); -I keeps
    its folder (nimblelm/bench, with a datasets.py) and PYTHONPATH off its path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(ensure_env()), "-I", str(WORKER)], check=False, input=json.dumps(request),
                          capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@"):
            return json.loads(line[2:])
    lines = proc.stderr.strip().splitlines()
    raise RuntimeError(f"kvpress worker failed (status {proc.returncode}): {lines[-1] if lines else 'no output'}")


def kept_each(model_dir, presses: list[tuple[list[int], str, float, dict]],
              max_new_tokens: int = 0) -> list[tuple[list[torch.Tensor], list[int]]]:
    """Per press (token_ids, method, keep_ratio, params): per decoder layer, a LongTensor [num_kv_heads, n_kept] of
    the prompt positions kvpress's press kept for each KV head in one prefill of token_ids, ascending; and the
    greedy token ids generate gives token_ids with the same press (max_new_tokens of them, or fewer at the end of
    sequence; none for 0). One worker loads the model once for them all. method: "snapkv" (params window_size=64,
    kernel_size=5), "pyramidkv" (those and beta=20) or "streaming" (num_sinks=4); compression_ratio =
    1 - keep_ratio, as kvpress counts it."""
    op = "both" if max_new_tokens else "kept"
    answers = _ask([_kept_request(op, model_dir, token_ids, method, keep_ratio, params)
                    | {"max_new_tokens": max_new_tokens} for token_ids, method, keep_ratio, params in presses])
    return [(_kept(a), a["outputs"][0]["token_ids"] if max_new_tokens else []) for a in answers]


def _kept_request(op: str, model_dir, token_ids: list[int], method: str, keep_ratio: float, params: dict) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")
    return {"op": op, "model": str(Path(model_dir).resolve()), "token_ids": [int(t) for t in token_ids],
            "method": method, "keep_ratio": keep_ratio, "params": params}


def _kept(answer: dict) -> list[torch.Tensor]:
    import torch

    return [torch.tensor(layer, dtype=torch.long) for layer in answer["kept"]]


def generate(model_dir, prompts: list[list[int]], method: str | None, keep_ratio: float, max_new_tokens: int,
             threads: int | None = None, **params) -> list[dict]:
    """Greedy generation, the press (None: none, the full cache) applied to each prompt's prefill, in one worker
    that loads the model once, on `threads` torch threads (None: torch's default). Per prompt: token_ids
    (stopping early at end-of-sequence), prefill_s (the prompt's forward pass, which yields the first token) and
    decode_s (the forward passes of the others)."""
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)}, or None)")
    answer = _ask({"op": "generate", "model": str(Path(model_dir).resolve()), "method": method,
                   "keep_ratio": keep_ratio, "max_new_tokens": max_new_tokens, "params": params, "threads": threads,
                   "prompts": [[int(t) for t in p] for p in prompts]})
    return answer["outputs"]
