"""`nimblelm bench survey engines`: the survey's Table 6 (engines and serving systems) on this machine.

(a) Inference: batch 1, a 1k-token prompt, 128 generated tokens, speculative decoding off; generated
    tokens / end-to-end time (the `pg1024+128` latency test).
(b) Serving: the maximum request throughput on ShareGPT (every request sent at once, `rate = inf`, to
    the backend's OpenAI-compatible server; all servers up, one untimed round, then their runs
    interleaved, the mean of `--repeat` rounds), then the offered rates a fraction of that maximum,
    and the highest rate whose p99 TPOT stayed under the bound. A backend without a server here is
    measured offline instead (all requests to its generate call), and the table says so.

The report puts the survey's own A100 numbers (Llama2-7B) beside ours, labelled as theirs: they are a
different model on a different machine, shown for what each engine does, not to be compared.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from nimblelm.bench import prefix_cache
from nimblelm.bench.backends import BackendUnavailable, BenchContext, LatencyTest
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.latency import run_latency
from nimblelm.bench.machine import activity_text
from nimblelm.bench.metrics import SLO, max_sustained_rate
from nimblelm.bench.runner import log, one_line

#: Table 6 of the survey (arXiv:2404.14294), [VERBATIM] numbers: Llama2-7B, one A100 80GB, batch 1,
#: 1k input, 128 output, speculative decoding off; serving = max req/s on ShareGPT. None = "-".
SURVEY_TABLE6 = [
    {"framework": "HuggingFace", "inference_tok_s": 38.963, "serving_req_s": None, "memory": "-",
     "batching": "-", "scheduling": "-"},
    {"framework": "DeepSpeed", "inference_tok_s": 80.947, "serving_req_s": 6.78, "memory": "blocked",
     "batching": "split-and-fuse", "scheduling": "decode prioritized"},
    {"framework": "vLLM", "inference_tok_s": 90.052, "serving_req_s": 7.11, "memory": "paged",
     "batching": "continuous batching", "scheduling": "prefill prioritized"},
    {"framework": "OpenPPL", "inference_tok_s": 81.169, "serving_req_s": None, "memory": "-", "batching": "-",
     "scheduling": "-"},
    {"framework": "FlashDecoding++", "inference_tok_s": 106.636, "serving_req_s": None, "memory": "-",
     "batching": "-", "scheduling": "-"},
    {"framework": "LightLLM", "inference_tok_s": 73.599, "serving_req_s": 10.29, "memory": "token-wise",
     "batching": "split-and-fuse", "scheduling": "prefill prioritized"},
    {"framework": "TensorRT-LLM", "inference_tok_s": 92.512, "serving_req_s": 5.87, "memory": "paged",
     "batching": "continuous batching", "scheduling": "-"},
]

#: What each backend does here, in the survey's columns (as configured by this harness on a CPU).
WHAT_IT_DOES = {
    "nimblelm": {"attention": "C++ kernels: paged decode attention, packed-panel prefill attention",
                 "linear": "C++ packed-panel GEMM at every batch size (fp32), int8/int4 dot-product kernels",
                 "graph": "none (eager torch, per-step batch tensors built once)",
                 "memory": "paged (block tables)", "batching": "continuous batching, chunked prefill",
                 "scheduling": "token budget per step (prefill and decode share steps)"},
    "transformers": {"attention": "SDPA", "linear": "torch (oneDNN/MKL) GEMM", "graph": "none (eager)",
                     "memory": "contiguous dynamic cache", "batching": "static batches, left-padded",
                     "scheduling": "-"},
    "llama.cpp": {"attention": "ggml CPU flash-attention/softmax kernels", "linear": "ggml SIMD GEMV/GEMM",
                  "graph": "ggml compute graph, reused", "memory": "unified KV cache with slots",
                  "batching": "continuous batching (llama-server -np, -cb)", "scheduling": "FCFS slots"},
    "vllm": {"attention": "CPU paged attention kernels (IPEX-style)", "linear": "torch/oneDNN",
             "graph": "torch.compile of the model (CPU build default)", "memory": "paged",
             "batching": "continuous batching, chunked prefill", "scheduling": "token budget (v1 scheduler)"},
}


def _offline_req_s(ctx: BenchContext, name: str, requests: Sequence[BenchRequest], opts: dict,
                   logger: Callable[[str], None]) -> dict:
    from nimblelm.bench.throughput import run_throughput

    out = run_throughput(ctx, [name], [requests], warmup=1, backend_opts=opts, progress=False, logger=logger)
    st = out["backends"][name]
    if not out["results"]:
        return {"status": st.get("status"), "reason": st.get("reason")}
    r = out["results"][0]
    return {"status": "ok", "method": "offline (no server here): all requests to its generate call",
            "max_req_s": r["mean_req_s"], "output_tok_s": r["mean_output_tok_s"],
            "total_tok_s": r["mean_total_tok_s"], "other_activity": st.get("other_activity")}


def _serve_all(ctx: BenchContext, names: Sequence[str], passes: Sequence[Sequence[BenchRequest]],
               warm: Sequence[BenchRequest], opts: dict, fractions: Sequence[float], slo: SLO, rounds: int, logger: Callable[[str], None],
               progress: bool) -> dict[str, dict]:
    """(b) for every backend: {name: record}.

    A backend without a server here is measured offline first (transformers; nimblelm when its serve
    command is missing). Then every server is started and serves a whole workload once, untimed, and
    the maximum-throughput runs (every request at once) are interleaved, `rounds` of them, rotating which
    server goes first, so that the machine's drift lands on every backend alike (idle servers here take
    0-1.2% of a core). Last, each server's offered rates, fractions of its mean maximum. passes: one
    workload per run in that order (the untimed one, the rounds, the fractions), the same for every
    backend, each drawn with its own seed so that no run finds its prompts in a prefix cache. warm: the
    untimed requests that precede the untimed run.
    """
    from nimblelm.bench.machine import CpuMonitor
    from nimblelm.bench.serve import SERVED_NAME, benchmark_server, start_backend_server

    slots = max(1, min(len(passes[0]), ctx.max_num_seqs))
    out: dict[str, dict] = {}
    servers = {}
    for name in names:
        try:
            try:
                servers[name] = start_backend_server(name, ctx, slots, opts)
            except BackendUnavailable as e:
                if name not in ("transformers", "nimblelm"):
                    raise
                logger(f"{name}: no server ({e}); measuring offline throughput instead")
                out[name] = _offline_req_s(ctx, name, passes[1], opts, logger) | {"server_skipped": str(e)}
        except BackendUnavailable as e:
            logger(f"skipping {name} serving: {e}")
            out[name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others
            out[name] = _serving_failed(name, e, logger)
    points: dict[str, list] = {}
    try:
        for name, server in list(servers.items()):
            try:
                logger(f"{name}: starting its server on {server.url}")
                server.start()
                points[name] = []
                continue
            except BackendUnavailable as e:
                logger(f"skipping {name} serving: {e}")
                out[name] = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - one backend failing must not lose the others
                out[name] = _serving_failed(name, e, logger)
            server.stop()
            del servers[name]
        monitor = CpuMonitor(lambda: sum(s.tree_cpu_s() for s in servers.values()))
        live = list(servers)
        # Round -1 is the untimed one. Timed straight after the servers started, every backend's first
        # round was slower than its second (nimblelm's TTFT p50 4.1 s against 2.6), the first server's most.
        for r in range(-1, rounds):
            k = max(r, 0) % len(live) if live else 0
            for name in live[k:] + live[:k]:
                try:
                    server = servers[name]
                    got = benchmark_server(server.url, SERVED_NAME, [passes[r + 1]], [math.inf], warm=warm,
                                           seed=ctx.seed, slo=slo, extra_body=server.extra_body,
                                           prefix_caching=server.prefix_caching, warmup=1 if r < 0 else 0,
                                           progress=progress, logger=logger,
                                           label=name if r >= 0 else f"{name} warm-up")
                    if r >= 0:
                        points[name] += got
                except Exception as e:  # noqa: BLE001 - as above
                    out[name] = _serving_failed(name, e, logger)
                    live.remove(name)
        for name in list(live):
            top = statistics.fmean(p["metrics"]["request_throughput"] for p in points[name])
            rates = [round(f * top, 4) for f in fractions if f * top > 0]
            server = servers[name]
            try:
                points[name] += benchmark_server(server.url, SERVED_NAME, passes[rounds + 1:rounds + 1 + len(rates)],
                                                 rates, warm=warm, seed=ctx.seed, slo=slo,
                                                 extra_body=server.extra_body, prefix_caching=server.prefix_caching,
                                                 warmup=0, progress=progress, logger=logger, label=name)
            except Exception as e:  # noqa: BLE001 - as above
                out[name] = _serving_failed(name, e, logger)
                live.remove(name)
        activity = monitor.stop()  # while the servers live: their whole process trees count as ours
    finally:
        for server in servers.values():
            server.stop()
    for name in live:
        maxima = [p["metrics"] for p in points[name] if math.isinf(p["rate"])]
        out[name] = {
            "status": "ok", "method": f"its OpenAI server, every request sent at once (rate inf), mean of {rounds}",
            "max_req_s": statistics.fmean(m["request_throughput"] for m in maxima),
            "max_req_s_rounds": [m["request_throughput"] for m in maxima],
            "output_tok_s": statistics.fmean(m["output_throughput"] for m in maxima),
            "total_tok_s": statistics.fmean(m["total_token_throughput"] for m in maxima),
            "sustained_req_s": max_sustained_rate(points[name], slo.tpot_s) if slo.tpot_s else None,
            "points": [{"rate": p["rate"], "metrics": p["metrics"], "prefix_cache": p["prefix_cache"]}
                       for p in points[name]],
            "server_startup_s": servers[name].startup_s, "other_activity": activity}
    return out


def _serving_failed(name: str, e: Exception, logger: Callable[[str], None]) -> dict:
    logger(f"{name} serving failed: {one_line(e)}")
    return {"status": "failed", "reason": one_line(e)}


def run_survey_engines(models: Sequence[str], backends: Sequence[str], *, threads: int, dtype: str, seed: int,
                       max_num_seqs: int, workload: Callable[[BenchContext, int], list[BenchRequest]],
                       prompt_len: int = 1024, gen_len: int = 128, repeat: int = 3, warmup: int = 1,
                       fractions: Sequence[float] = (0.5, 0.8), slo: SLO | None = None, opts: dict | None = None,
                       progress: bool = True, logger: Callable[[str], None] = log,
                       bandwidth_gbs: float | None = None, quantization: str | None = None,
                       kv_cache_dtype: str = "auto") -> dict:
    opts = opts or {}
    slo = slo or SLO(tpot_s=0.2)
    rows, statuses = [], {}
    for model in models:
        ctx = BenchContext(model=model, dtype=dtype, threads=threads, max_model_len=prompt_len + gen_len + 1,
                           max_num_seqs=max_num_seqs, seed=seed, quantization=quantization,
                           kv_cache_dtype=kv_cache_dtype)
        logger(f"== {model}: (a) batch 1, {prompt_len} prompt + {gen_len} generated tokens")
        lat = run_latency(ctx, backends, [LatencyTest("pg", gen_len, 1, n_prompt=prompt_len)], repeat=repeat,
                          warmup=warmup, backend_opts=opts, progress=progress, logger=logger,
                          bandwidth_gbs=bandwidth_gbs)
        # the untimed run, the timed rounds, and the fractions of the maximum: a workload each
        passes = [workload(ctx, k) for k in range(1 + repeat + len(fractions))]
        need = max(r.prompt_len + r.output_len for w in passes for r in w) + 1
        ctx.max_model_len = max(ctx.max_model_len, need, 32)  # 32: the warm-up requests
        requests = passes[0]
        logger(f"== {model}: (b) serving {len(requests)} ShareGPT requests")
        warm = [BenchRequest(tuple(ctx.prompt(16, 10_000 + i)), 4) for i in range(2)]
        serving = _serve_all(ctx, backends, passes, warm, opts, fractions, slo, repeat, logger, progress)
        for name in backends:
            row = {"model": model, "backend": name, "what_it_does": WHAT_IT_DOES.get(name, {})}
            a = next((r for r in lat["results"] if r["backend"] == name), None)
            if a is not None:
                row.update(inference_tok_s=a["mean_ts"], inference_std=a["std_ts"],
                           inference_samples=a["samples_ts"])
            else:
                row["inference_skipped"] = lat["backends"].get(name, {}).get("reason")
            b = row["serving"] = serving[name]
            if b.get("status") == "ok":
                row["serving_req_s"] = b["max_req_s"]
                row["sustained_req_s"] = b.get("sustained_req_s")
            rows.append(row)
        statuses[model] = {"latency_backends": lat["backends"], "workload": _summary(requests)}
    return {"results": rows, "backends": {}, "per_model": statuses,
            "survey_table6": SURVEY_TABLE6, "slo": slo.as_dict()}


def _summary(requests: Sequence[BenchRequest]) -> dict:
    from nimblelm.bench.throughput import workload_summary

    return workload_summary(requests)


def _f(v, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) else f"{v:.{digits}f}"


def _ms(d: dict, key: str) -> str:
    v = (d or {}).get(key)
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{1e3 * v:.0f}"


def survey_markdown(report: dict) -> str:
    from nimblelm.bench.report import machine_lines

    cfg = report["config"]
    slo = report.get("slo") or {}
    out = ["## nimblelm bench survey engines", ""] + machine_lines(report)
    for model, st in (report.get("per_model") or {}).items():
        w = st.get("workload") or {}
        if w:
            out.append(f"- {model} serving workload: ShareGPT (seed {cfg.get('seed')}), {w['num_requests']} "
                       f"requests, {w['prompt_tokens']} prompt + {w['output_tokens']} output tokens")
        for name, s in (st.get("latency_backends") or {}).items():
            activity = activity_text(s.get("other_activity") or {})
            if s.get("status") == "ok" and activity:
                out.append(f"- {model}, {name} (a): {activity}")
            elif s.get("status") != "ok":
                out.append(f"- {model}, {name} (a): {s.get('status')}: {s.get('reason')}")
    for r in report["results"]:
        activity = activity_text((r.get("serving") or {}).get("other_activity") or {})
        if activity:
            out.append(f"- {r['model']}, {r['backend']} (b): {activity}")
    out += ["", f"### Ours: this machine, {cfg.get('dtype')}, {cfg.get('threads')} threads", "",
            (f"| model | backend | (a) inference tok/s (batch 1, {cfg.get('prompt_len')} in, {cfg.get('gen_len')} out) "
            f"| (b) max serving req/s | output tok/s at max | rate sustained with p99 TPOT ≤ "
            f"{_f(slo.get('tpot_s'), 2)} s (offered; inf: its achieved rate) | how (b) was measured |"),
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["results"]:
        b = r.get("serving") or {}
        a = (f"{_f(r['inference_tok_s'])} ± {_f(r.get('inference_std'))}" if "inference_tok_s" in r
             else "skipped")
        if b.get("status") == "ok":
            how = b.get("method", "")
            sustained = _f(b.get("sustained_req_s"), 3) if "sustained_req_s" in b else "n/a (no server)"
            out.append(f"| {r['model']} | {r['backend']} | {a} | {_f(b['max_req_s'], 3)} | "
                       f"{_f(b.get('output_tok_s'), 1)} | {sustained} | {how} |")
        else:
            out.append(f"| {r['model']} | {r['backend']} | {a} | – | – | – | {b.get('status')}: "
                       f"{(b.get('reason') or '')[:120]} |")
    points = [(r, p) for r in report["results"] for p in (r.get("serving") or {}).get("points") or []]
    if points:
        out += ["", "### (b) every serving run: Poisson arrivals at fractions of the maximum (rate inf)", "",
                ("| model | backend | offered req/s | achieved req/s | output tok/s | TTFT ms p50 / p99 | "
                "TPOT ms p50 / p99 | E2E s p50 / p99 | prefix cache hit | failed |"),
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r, p in points:
            m = p["metrics"]
            rate = p["rate"]
            rate_s = "inf" if rate is None or (isinstance(rate, float) and math.isinf(rate)) else f"{rate:.3f}"
            out.append(f"| {r['model']} | {r['backend']} | {rate_s} | {_f(m['request_throughput'], 3)} | "
                       f"{_f(m['output_throughput'], 1)} | {_ms(m['ttft_s'], 'p50')} / {_ms(m['ttft_s'], 'p99')} | "
                       f"{_ms(m['tpot_s'], 'p50')} / {_ms(m['tpot_s'], 'p99')} | {_f(m['e2e_s'].get('p50'))} / "
                       f"{_f(m['e2e_s'].get('p99'))} | {prefix_cache.cell(p.get('prefix_cache'))} | "
                       f"{m['failed']} |")
    out += ["", "### What each backend does here (the survey's columns)", "",
            "| backend | attention | linear | graph | memory | batching | scheduling |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["backend"] for r in report["results"]):
        d = WHAT_IT_DOES.get(name, {})
        out.append(f"| {name} | {d.get('attention', '')} | {d.get('linear', '')} | {d.get('graph', '')} | "
                   f"{d.get('memory', '')} | {d.get('batching', '')} | {d.get('scheduling', '')} |")
    out += ["", "### Theirs: the survey's Table 6 (NOT this machine)", "",
            ("Llama2-7B on one NVIDIA A100 80GB, as printed in the survey (arXiv:2404.14294, Table 6). A different "
            "model on a different machine: shown beside ours for what each engine does, not for comparison."), "",
            ("| framework (survey) | inference tok/s (A100, theirs) | serving req/s (A100, theirs) | memory | "
            "batching | scheduling |"), "| --- | ---: | ---: | --- | --- | --- |"]
    for t in report.get("survey_table6") or SURVEY_TABLE6:
        out.append(f"| {t['framework']} | {t['inference_tok_s']:.3f} | "
                   f"{'-' if t['serving_req_s'] is None else t['serving_req_s']} | {t['memory']} | "
                   f"{t['batching']} | {t['scheduling']} |")
    out += ["", _targets(report)]
    return "\n".join(out) + "\n"


def _targets(report: dict) -> str:
    """The issue's targets for this experiment, with how far each is met (recorded, never asserted)."""
    lines = ["### Targets (recorded, not asserted)", ""]
    by = {(r["model"], r["backend"]): r for r in report["results"]}
    for model in dict.fromkeys(r["model"] for r in report["results"]):
        ours = by.get((model, "nimblelm"))
        if not ours:
            continue
        a = ours.get("inference_tok_s")
        for peer, want in (("transformers", 1.8), ("llama.cpp", 1.0)):
            p = (by.get((model, peer)) or {}).get("inference_tok_s")
            if a and p:
                ratio = a / p
                lines.append(f"- {model} (a): nimblelm / {peer} = {ratio:.2f}× (target ≥ {want}×): "
                             f"{'met' if ratio >= want else f'missed by {want - ratio:.2f}×'}")
        b = ours.get("serving_req_s")
        for peer, want in (("vllm", 1.5), ("llama.cpp", 2.0), ("transformers", 2.0)):
            p = (by.get((model, peer)) or {}).get("serving_req_s")
            if b and p:
                ratio = b / p
                lines.append(f"- {model} (b): nimblelm / {peer} max req/s = {ratio:.2f}× (target ≥ {want}×): "
                             f"{'met' if ratio >= want else f'missed by {want - ratio:.2f}×'}")
    if len(lines) == 2:
        lines.append("- no nimblelm figure beside a peer's: nothing to compare")
    return "\n".join(lines)
