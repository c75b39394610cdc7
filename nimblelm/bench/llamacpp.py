"""The llama.cpp peer: llama-bench / llama-batched-bench for latency, llama-server for throughput.

It runs a GGUF of the very weights nimblelm runs, at the same precision class: for a float32 run an F32
GGUF written from the packaged file (see gguf_convert), for nimblelm's int8 / int4 weights a Q8_0 / Q4_0
one written from the same weights, and for an int8 KV cache llama.cpp's q8_0 K and V cache. Binaries
come from `nimblelm bench setup llama.cpp` (or NIMBLELM_LLAMA_CPP_BIN). Anything missing makes the
backend skip with one line.

Throughput uses llama-server with one slot per concurrent request (`-np N`, continuous batching),
token-id prompts sent over HTTP on 127.0.0.1 from a thread pool: it replays the same variable-length
requests as the other backends. llama-batched-bench only runs uniform prompt/output lengths, so it
could not replay a ShareGPT sample.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nimblelm.bench import prefix_cache
from nimblelm.bench.backends import Backend, BackendUnavailable, BenchContext, LatencyTest, ThroughputRun
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.llamacpp_build import TARGETS, bin_dir, cache_dir, find_binary

GGUF_TYPES = ("auto", "f32", "f16", "q8_0", "q4_0", "q4_1", "source")
#: --llamacpp-gguf auto for each nimblelm quantization: the llama.cpp block format of the same weight bits
#: (Q4_0 over Q4_1 for int4: the fastest llama.cpp 4-bit variant here, see shared/peers.md); for "gguf",
#: where nimblelm serves the packaged file's own tensors, llama.cpp runs that file as is
GGUF_FOR_QUANTIZATION = {"int8": "q8_0", "w8a8": "q8_0", "int4": "q4_0", "gguf": "source"}


def auto_gguf_type(dtype: str, quantization: str | None) -> str:
    """The GGUF type matching nimblelm's precision: by quantization, else f32 for float32 and f16 otherwise."""
    if quantization:
        if quantization not in GGUF_FOR_QUANTIZATION:
            raise BackendUnavailable(f"no GGUF type matches quantization {quantization!r}: pass --llamacpp-gguf")
        return GGUF_FOR_QUANTIZATION[quantization]
    return "f32" if dtype == "float32" else "f16"


def _one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line[:limit]


def parse_llama_bench_json(text: str) -> list[dict]:
    """Rows of `llama-bench -o json` output (a JSON array; anything before it is ignored)."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench output")
    return json.loads(text[start:text.rindex("]") + 1])


def parse_batched_bench_jsonl(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    return rows


def built_version() -> str | None:
    """The sdist the installed tools were built from (the VERSION file build_llama_cpp writes), if known."""
    tool = find_binary("llama-bench")
    if tool is None:
        return None
    try:
        return (tool.parent / "VERSION").read_text().strip() or None
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    method = ("llama-bench (batch 1: pp = pN test, tg = tgN test), llama-batched-bench (batch > 1: "
              "S_PP of -npp p -ntg 1, S_TG of -npp 1 -ntg n), llama-server -np N for throughput")

    def __init__(self, ctx: BenchContext, gguf_type: str | None = None):
        super().__init__(ctx)
        self.gguf_type = (gguf_type or "auto").lower()
        self.gguf: Path | None = None
        self.gguf_kind: str | None = None  # the type chosen at load (auto resolved)
        self._nbytes: int | None = None
        self._token_nbytes: int | None = None
        self._types: list[str] = []  # tensor types in that file (1-D tensors stay F32)
        self._server: subprocess.Popen | None = None
        self._server_log = None
        self._server_url = ""
        self._server_slots = 0
        self.server_args: list[str] = []  # more llama-server options (speculative decoding: survey_spec.py)
        self.build_commit: str | None = None

    # ------------------------------------------------------------------------------------ setup

    def check(self) -> None:
        if self.ctx.kv_cache_dtype == "int2":
            raise BackendUnavailable("llama.cpp has no 2-bit KV cache type")
        missing = [t for t in TARGETS if t != "llama-perplexity" and find_binary(t) is None]
        if missing:
            where = os.environ.get("NIMBLELM_LLAMA_CPP_BIN") or str(bin_dir())
            raise BackendUnavailable(
                f"{missing[0]} not found in {where} (build it with `nimblelm bench setup llama.cpp`)")
        if self.gguf_type not in GGUF_TYPES:
            raise BackendUnavailable(f"unknown GGUF type {self.gguf_type!r} ({', '.join(GGUF_TYPES)})")
        self._target_type()  # no GGUF type for this quantization: skip before loading anything

    def _target_type(self) -> str:
        if self.gguf_type != "auto":
            return self.gguf_type
        return auto_gguf_type(self.ctx.dtype, self.ctx.quantization)

    def kv_cache_type(self) -> str:
        # nimblelm's int8 KV cache against llama.cpp's q8_0 cache, its int4 (KIVI) against q4_0 (a scale per 32
        # values of a token); a quantized V cache needs flash attention, which llama.cpp's default -fa auto turns on
        # for the CPU. Any other against llama.cpp's default, f16.
        return {"int8": "q8_0", "int4": "q4_0"}.get(self.ctx.kv_cache_dtype, "f16")

    def kv_args(self) -> list[str]:
        return ["-ctk", self.kv_cache_type(), "-ctv", self.kv_cache_type()]

    def load(self) -> None:
        from nimblelm.bench.gguf_convert import ensure_converted

        source = getattr(self.ctx.load(), "source", None)
        if source is None or not str(source).endswith(".gguf") or not Path(source).is_file():
            raise BackendUnavailable(f"model {self.ctx.model!r} has no GGUF source file to give llama.cpp")
        kind = self._target_type()
        self.gguf_kind = kind
        if kind == "source":
            self.gguf = Path(source)
        else:
            self.gguf = ensure_converted(source, kind, cache_dir() / "peers" / "gguf")
        import gguf

        reader = gguf.GGUFReader(self.gguf)
        self._nbytes = int(sum(int(t.n_bytes) for t in reader.tensors))
        names = {t.name: int(t.n_bytes) for t in reader.tensors}
        # Without output.weight the token table is the output layer too, read in full every step.
        self._token_nbytes = self._nbytes - (names.get("token_embd.weight", 0) if "output.weight" in names else 0)
        self._types = sorted({t.tensor_type.name for t in reader.tensors})
        del reader

    def info(self) -> dict:
        return {"weights": f"{self.gguf_kind.upper()} GGUF written from the same file"
                if self.gguf_kind != "source" else "the packaged GGUF as is",
                "gguf": str(self.gguf) if self.gguf else None, "gguf_type": self.gguf_kind,
                "gguf_tensor_types": self._types,
                "kv_cache_type": self.kv_cache_type(),
                "weights_nbytes": self._nbytes, "token_nbytes": self._token_nbytes,
                "version": built_version(), "build_commit": self.build_commit,
                "bin_dir": str(find_binary("llama-bench").parent)}

    def weights_nbytes(self) -> int | None:
        return self._nbytes

    def token_nbytes(self) -> int | None:
        return self._token_nbytes

    # ---------------------------------------------------------------------------------- latency

    def _run(self, cmd: list[str], timeout: float = 3600) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
                               f"{_one_line(proc.stderr or proc.stdout)}")
        return proc.stdout + "\n" + proc.stderr

    def latency(self, test: LatencyTest, repeat: int, warmup: int, progress=None) -> list[float]:
        t = str(self.ctx.threads)
        if test.batch == 1:
            # Each call is a fresh process, so llama-bench always runs its own untimed warmup first: the
            # interleaved runner calls it once per repetition, asking for warmup only on the first.
            cmd = [str(find_binary("llama-bench")), "-m", str(self.gguf), "-t", t, "-r", str(repeat),
                   "-o", "json", "-ngl", "0", *self.kv_args()]
            if test.kind == "pp":
                cmd += ["-p", str(test.n_tokens), "-n", "0"]
            elif test.kind == "pg":
                cmd += ["-p", "0", "-n", "0", "-pg", f"{test.n_prompt},{test.n_tokens}"]
            else:
                cmd += ["-p", "0", "-n", str(test.n_tokens)]
            rows = parse_llama_bench_json(self._run(cmd))
            if not rows:
                raise RuntimeError("llama-bench printed no result")
            row = rows[0]
            self.build_commit = row.get("build_commit", self.build_commit)
            samples = [float(x) for x in row.get("samples_ts") or [row["avg_ts"]]]
            if test.kind == "pg":  # llama-bench counts prompt + generated tokens; we count generated ones
                samples = [x * test.n_tokens / (test.n_prompt + test.n_tokens) for x in samples]
            if progress is not None:
                for _ in range(warmup + repeat):
                    progress()
            return samples
        if test.kind == "pg":
            raise RuntimeError("pg tests with batch > 1 are not run on llama.cpp (llama-batched-bench has no "
                               "end-to-end figure)")
        out = []
        for i in range(warmup + repeat):
            if test.kind == "pp":
                npp, ntg = test.n_tokens, 1
            else:
                npp, ntg = 1, test.n_tokens
            ctx_len = test.batch * (npp + ntg) + 16
            cmd = [str(find_binary("llama-batched-bench")), "-m", str(self.gguf), "-t", t, "-tb", t,
                   "-c", str(ctx_len), "-npp", str(npp), "-ntg", str(ntg), "-npl", str(test.batch),
                   "--output-format", "jsonl", "-ngl", "0", *self.kv_args()]
            rows = parse_batched_bench_jsonl(self._run(cmd))
            if not rows:
                raise RuntimeError("llama-batched-bench printed no result")
            if i >= warmup:
                out.append(float(rows[0]["speed_pp" if test.kind == "pp" else "speed_tg"]))
            if progress is not None:
                progress()
        return out

    # ------------------------------------------------------------------------------- throughput

    def start_server(self, slots: int) -> None:
        if self._server is not None and self._server_slots >= slots:
            return
        self.stop_server()
        port = _free_port()
        t = str(self.ctx.threads)
        cmd = [str(find_binary("llama-server")), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", t, "-tb", t, "-np", str(slots), "-c", str(slots * self.ctx.max_model_len), "-cb",
               "--cache-ram", "0", "--no-webui", "-ngl", "0", *self.kv_args(), *self.server_args]
        self._server_log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop_server)
        self._server = subprocess.Popen(cmd, stdout=self._server_log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        self._server_slots = slots
        self._server_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                self._server_log.seek(0)
                log = self._server_log.read()
                self._server = None
                raise RuntimeError(f"llama-server exited ({_one_line(log)})")
            try:
                with urllib.request.urlopen(self._server_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop_server()
        raise RuntimeError("llama-server did not become healthy within 600 s")

    def stop_server(self) -> None:
        srv, self._server = self._server, None
        if srv is not None and srv.poll() is None:
            srv.terminate()
            try:
                srv.wait(timeout=20)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        if self._server_log is not None:
            self._server_log.close()
            self._server_log = None

    def complete(self, req: BenchRequest, ignore_eos: bool = True) -> dict:
        """llama-server's /completion response to one greedy request (its timings, and its token ids)."""
        # cache_prompt: the slot reuses the K/V of its previous prompt's common start (llama-server's default)
        body = json.dumps({"prompt": list(req.prompt_token_ids), "n_predict": req.output_len,
                           "ignore_eos": ignore_eos, "temperature": 0.0, "cache_prompt": True,
                           "return_tokens": True, "stream": False}).encode()
        r = urllib.request.Request(self._server_url + "/completion", data=body,
                                   headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=3600) as resp:
            return json.loads(resp.read())

    def _send_all(self, requests: Sequence[BenchRequest]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=max(1, min(len(requests), self._server_slots))) as pool:
            return list(pool.map(self.complete, requests))

    def warmup_throughput(self, concurrency: int) -> None:
        self.start_server(concurrency)
        reqs = [BenchRequest(tuple(self.ctx.prompt(16, 10_000 + i)), 4) for i in range(2)]
        self._send_all(reqs)

    def throughput(self, requests: Sequence[BenchRequest]) -> ThroughputRun:
        """All requests sent at once (the server runs max_num_seqs of them concurrently, one slot each).

        Counted: each request's own prompt tokens and the tokens the server reports it generated.
        """
        self.start_server(min(len(requests), self.ctx.max_num_seqs))
        t0 = time.perf_counter()
        results = self._send_all(requests)
        elapsed = time.perf_counter() - t0
        out_tokens = sum(int(r.get("tokens_predicted", 0)) for r in results)
        short = sum(1 for q, r in zip(requests, results) if int(r.get("tokens_predicted", 0)) != q.output_len)
        extra = {"slots": self._server_slots,
                 "server_prompt_tokens": sum(int(r.get("tokens_evaluated", 0)) for r in results)}
        counts = [prefix_cache.response_counts(r) for r in results]
        extra["prefix_cache"] = (prefix_cache.counted(sum(c[0] for c in counts), sum(c[1] for c in counts),
                                                      "per-response counts")
                                 if all(counts) else prefix_cache.unavailable("no timings.cache_n in its responses"))
        if short:
            extra["requests_with_wrong_length"] = short
        return ThroughputRun(elapsed, sum(q.prompt_len for q in requests), out_tokens, len(requests), extra)

    def close(self) -> None:
        self.stop_server()
        super().close()


def setup_llama_cpp(force: bool = False) -> Path:
    """CLI helper: build the peer, report where it is."""
    from nimblelm.bench.llamacpp_build import build_llama_cpp

    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise BackendUnavailable(f"{tool} not found: install it (e.g. apt-get install cmake ninja-build)")
    return build_llama_cpp(force=force)
