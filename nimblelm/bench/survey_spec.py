"""`nimblelm bench survey speculative`: the survey's Table 5 (speculative decoding) on this machine.

Batch 1: every request of each workload alone, greedy, up to its max_tokens or the end of sequence. For each
method, on one backend: output tokens / wall seconds summed over the requests, the speedup over that
backend's own plain decoding of the same requests, tokens per target step (the survey's "acceptance rate":
generated tokens / generation steps), the share of draft tokens kept, and how many outputs are identical to
plain decoding's. The backends, in the same run and on the same weights: nimblelm's methods; transformers'
assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`) against its own `generate`; llama.cpp's
server with the draft model and with its n-gram modes against its plain decoding.

Under load: for each batch size b, b ShareGPT chat requests at once (nimblelm only; its max_num_seqs is the
largest b): output tokens/s of each method over plain decoding's, speculation inside continuous batching.
And for each request rate, 2 x num_prompts more of them arriving at Poisson times: output tokens/s and mean
latency from arrival to the last token, against plain decoding's at the same rate.

The report puts the survey's own numbers (7B-33B models on a GPU) beside ours, labelled as theirs.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence

from nimblelm.bench.backends import BackendUnavailable, BenchContext
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.machine import CpuMonitor, activity_text
from nimblelm.bench.runner import one_line

#: Table 5 of the survey (arXiv:2404.14294), [VERBATIM]: ranges over five 7B-33B targets (Vicuna, LLaMA-2),
#: Vicuna-80 questions; "acceptance rate" = accepted tokens / generation steps.
SURVEY_TABLE5 = [
    {"method": "SpD", "draft": "small speculative model", "construction": "one draft sequence",
     "verifier": "speculative sampling", "overhead_gpu_h": "275", "acceptance": "1.77~2.02×", "speedup": "1.05~1.77×"},
    {"method": "LADE", "draft": "LLM + NGrams", "construction": "one draft sequence", "verifier": "greedy sampling",
     "overhead_gpu_h": "0", "acceptance": "1.92~2.14×", "speedup": "1.12~1.30×"},
    {"method": "SSD", "draft": "sub-LLM", "construction": "one draft sequence", "verifier": "speculative sampling",
     "overhead_gpu_h": "4", "acceptance": "1.64~1.74×", "speedup": "1.01~1.23×"},
    {"method": "REST", "draft": "datastore", "construction": "token tree", "verifier": "speculative sampling",
     "overhead_gpu_h": "1.5", "acceptance": "2.18~2.31×", "speedup": "1.72~2.27×"},
    {"method": "Medusa-1", "draft": "four LLM heads", "construction": "token tree",
     "verifier": "speculative sampling", "overhead_gpu_h": "~24", "acceptance": "2.52~2.62×", "speedup": "2.04~2.86×"},
    {"method": "Eagle", "draft": "one Transformer Layer", "construction": "token tree",
     "verifier": "speculative sampling", "overhead_gpu_h": "96~192", "acceptance": "3.47~3.72×",
     "speedup": "2.77~3.74×"},
]

#: What each of our methods costs before it can run, in the survey's "additional overhead" column.
EXTRA_COST = {"plain": "-", "ngram": "none", "lookahead": "none", "draft_model": "none here (a released smaller model, same tokenizer)",
              "prompt lookup": "none", "assisted generation": "none here (the same drafter)"}
#: Methods that draft with heads trained here (`nimblelm spec train`); their cost is read from the heads file.
TRAINED = ("medusa", "eagle")
#: llama.cpp's speculative modes (llama-server --spec-type), each with its own defaults but the draft length.
LLAMACPP_NGRAM_MODES = ("ngram-simple", "ngram-mod")


def _record(tokens: Sequence[int], seconds: float, accepted: int | None = None, drafted: int | None = None,
            draft_seconds: float | None = None) -> dict:
    return {"tokens": [int(t) for t in tokens], "seconds": seconds, "accepted": accepted, "drafted": drafted,
            "draft_seconds": draft_seconds}


class _DraftClock:
    """Seconds the engine's proposer spends drafting: its propose_all, timed from outside the engine."""

    def __init__(self, proposer):
        self.seconds = 0.0
        self._propose = proposer.propose_all
        proposer.propose_all = self

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self._propose(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def _arriving(llm, requests: Sequence[BenchRequest], rate: float, seed: int, params) -> dict:
    """The requests sent to the engine at Poisson arrival times of the rate: the run's seconds, output tokens,
    each request's tokens and its latency from arrival to its last token."""
    from nimblelm.bench.arrivals import arrival_times

    engine = llm.llm_engine
    times = arrival_times(len(requests), rate, seed=seed)
    done: dict[int, tuple[list[int], float]] = {}
    sent, t0 = 0, time.perf_counter()
    while len(done) < len(requests):
        now = time.perf_counter() - t0
        while sent < len(requests) and times[sent] <= now:
            engine.add_request(f"arrival-{sent}", list(requests[sent].prompt_token_ids), params(requests[sent]))
            sent += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, times[sent] - now))
            continue
        for out in engine.step():
            if out.finished:
                i = int(out.request_id.removeprefix("arrival-"))
                done[i] = (list(out.outputs[0].token_ids), time.perf_counter() - t0 - times[i])
    tokens = [done[i][0] for i in range(len(requests))]
    return {"seconds": time.perf_counter() - t0, "output_tokens": sum(map(len, tokens)), "tokens": tokens,
            "latencies": [done[i][1] for i in range(len(requests))]}


def _nimblelm(ctx: BenchContext, config: dict | None, workloads: dict[str, list[BenchRequest]],
              load_sets: dict[int, list[BenchRequest]], rate_sets: dict[float, list[BenchRequest]],
              max_num_seqs: int, warm: BenchRequest) -> tuple[dict, dict, dict, dict]:
    """One engine with speculative_config=config: (batch-1 records per workload, load records per batch size,
    records per request rate, the engine's measured costs: seconds of a decode step by rows, as its draft
    budget sees them)."""
    from nimblelm import LLM, SamplingParams

    llm = LLM(model=ctx.model, dtype=ctx.dtype, max_model_len=ctx.max_model_len, max_num_seqs=max_num_seqs,
              num_threads=ctx.threads, quantization=ctx.quantization, kv_cache_dtype=ctx.kv_cache_dtype,
              speculative_config=config)
    try:
        def params(r: BenchRequest):
            return SamplingParams(temperature=0.0, max_tokens=r.output_len)

        runner = llm.llm_engine.runner
        clock = _DraftClock(runner.proposer) if runner.proposer is not None else None
        llm.generate([list(warm.prompt_token_ids)], params(warm), use_tqdm=False)
        batch1 = {}
        for name, requests in workloads.items():
            records = []
            for r in requests:
                drafting = clock.seconds if clock else 0.0
                t0 = time.perf_counter()
                out = llm.generate([list(r.prompt_token_ids)], params(r), use_tqdm=False)[0]
                seconds = time.perf_counter() - t0
                spec = out.metrics.spec
                if config is None:
                    records.append(_record(out.outputs[0].token_ids, seconds))
                else:  # a request that never took drafts has no spec stats
                    records.append(_record(out.outputs[0].token_ids, seconds, spec.num_accepted_tokens if spec else 0,
                                           spec.num_draft_tokens if spec else 0, clock.seconds - drafting))
            batch1[name] = records
        load = {}
        if load_sets:  # the first steps of the largest batch pay one-off costs (its KV blocks' first touch)
            top = max(load_sets)
            llm.generate([ctx.prompt(warm.prompt_len, 20_000 + i) for i in range(top)],
                         SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
        for b, requests in load_sets.items():
            t0 = time.perf_counter()
            outs = llm.generate([list(r.prompt_token_ids) for r in requests], [params(r) for r in requests],
                                use_tqdm=False)
            load[b] = {"seconds": time.perf_counter() - t0,
                       "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                       "tokens": [list(o.outputs[0].token_ids) for o in outs]}
        rates = {rate: _arriving(llm, requests, rate, ctx.seed, params) for rate, requests in rate_sets.items()}
        cost = runner.step_cost
        costs = {"decode_step_s_by_rows": dict(zip(cost.rows, cost.seconds))} if cost is not None else {}
        if config is not None and config["method"] in TRAINED:  # what the heads it drafted with cost to train
            costs["heads"] = runner.proposer.meta
        return batch1, load, rates, costs
    finally:
        del llm
        gc.collect()


def _transformers(ctx: BenchContext, draft: BenchContext | None, k: int, lookup_max: int,
                  workloads: dict[str, list[BenchRequest]], warm: BenchRequest) -> tuple[dict[str, dict], dict]:
    """Batch-1 records per mode and workload (generate() alone, with prompt lookup, with the assistant model)
    and the peer's info."""
    import torch
    import transformers

    from nimblelm.bench.backends import hf_model_from

    lm = ctx.load()
    model = hf_model_from(lm.config, lm.weights, ctx.dtype)
    eos = list(lm.config.eos_token_ids)
    modes: dict[str, dict] = {"plain": {}, "prompt lookup": {"prompt_lookup_num_tokens": k,
                                                             "max_matching_ngram_size": lookup_max}}
    if draft is not None:
        d = draft.load()
        assistant = hf_model_from(d.config, d.weights, ctx.dtype)
        modes["assisted generation"] = {"assistant_model": assistant}

    def generate(r: BenchRequest, extra: dict) -> dict:
        ids = torch.tensor([list(r.prompt_token_ids)], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.output_len,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                                 pad_token_id=eos[0], **extra)
        return _record(gen[0, ids.shape[1]:].tolist(), time.perf_counter() - t0)

    out: dict[str, dict] = {}
    for mode, extra in modes.items():
        generate(warm, extra)
        out[mode] = {name: [generate(r, extra) for r in requests] for name, requests in workloads.items()}
    info = {"version": transformers.__version__, "weights": f"{ctx.dtype} (the nimblelm loader's tensors)",
            "prompt lookup": f"prompt_lookup_num_tokens={k}, max_matching_ngram_size={lookup_max}"}
    if draft is not None:  # assisted generation with its own defaults for how many tokens to draft
        g = assistant.generation_config
        info["assisted generation"] = (f"num_assistant_tokens={g.num_assistant_tokens} "
                                       f"({g.num_assistant_tokens_schedule}), assistant_confidence_threshold="
                                       f"{g.assistant_confidence_threshold}")
    return out, info


def _llamacpp(ctx: BenchContext, draft: BenchContext | None, k: int, workloads: dict[str, list[BenchRequest]],
              warm: BenchRequest) -> tuple[dict[str, dict], dict]:
    """Batch-1 records per mode and workload from llama-server (one slot): plain, each n-gram mode, and the
    draft model (--spec-draft-n-max k); and the peer's info."""
    from nimblelm.bench.llamacpp import LlamaCppBackend

    target = LlamaCppBackend(ctx)
    target.check()
    target.load()
    t = str(ctx.threads)
    modes = {"plain": [], **{m: ["--spec-type", m] for m in LLAMACPP_NGRAM_MODES}}
    if draft is not None:
        drafter = LlamaCppBackend(draft)
        drafter.load()
        # -md alone loads the drafter but drafts nothing: the type turns it on
        modes["draft model"] = ["--spec-type", "draft-simple", "-md", str(drafter.gguf), "--spec-draft-n-max", str(k),
                                "-td", t, "-tbd", t]
    out: dict[str, dict] = {}
    try:
        for mode, args in modes.items():
            target.stop_server()
            target.server_args = args
            target.start_server(1)
            target.complete(warm)
            out[mode] = {}
            for name, requests in workloads.items():
                records = []
                for r in requests:
                    t0 = time.perf_counter()
                    resp = target.complete(r, ignore_eos=False)
                    seconds = time.perf_counter() - t0
                    if mode == "plain":
                        records.append(_record(resp.get("tokens") or [], seconds))
                        continue
                    timings = resp.get("timings") or {}  # without draft_n where no drafts were made
                    records.append(_record(resp.get("tokens") or [], seconds, timings.get("draft_n_accepted", 0),
                                           timings.get("draft_n", 0)))
                out[mode][name] = records
        return out, target.info()
    finally:
        target.close()


def _summary(records: Sequence[dict], plain: Sequence[dict]) -> dict:
    """One (backend, method, workload) row from its records and the same backend's plain ones."""
    tokens = sum(len(r["tokens"]) for r in records)
    seconds = sum(r["seconds"] for r in records)
    plain_rate = sum(len(r["tokens"]) for r in plain) / sum(r["seconds"] for r in plain)
    row = {"requests": len(records), "output_tokens": tokens, "seconds": round(seconds, 3),
           "tok_s": tokens / seconds, "speedup": tokens / seconds / plain_rate,
           "identical": sum(r["tokens"] == p["tokens"] for r, p in zip(records, plain))}
    if all(r["accepted"] is not None for r in records):
        accepted = sum(r["accepted"] for r in records)
        drafted = sum(r["drafted"] or 0 for r in records)
        decoded = sum(max(0, len(r["tokens"]) - 1) for r in records)  # the first token comes from the prefill
        row["tokens_per_step"] = decoded / max(1, decoded - accepted)
        row["draft_acceptance"] = accepted / drafted if drafted else None
    if all(r["draft_seconds"] is not None for r in records):
        row["drafting_share"] = sum(r["draft_seconds"] for r in records) / seconds
    return row


def _rows(backend: str, by_mode: dict[str, dict], plain_mode: str = "plain") -> list[dict]:
    rows = []
    for mode, by_workload in by_mode.items():
        for workload, records in by_workload.items():
            summary = _summary(records, by_mode[plain_mode][workload])
            if mode == plain_mode:
                summary["tokens_per_step"] = 1.0
            rows.append({"backend": backend, "method": mode, "workload": workload, **summary})
    return rows


def run_survey_speculative(ctx: BenchContext, methods: dict[str, dict], *, draft: BenchContext | None,
                           workloads: dict[str, list[BenchRequest]], load_sets: dict[int, list[BenchRequest]],
                           rate_sets: dict[float, list[BenchRequest]], backends: Sequence[str],
                           logger: Callable[[str], None]) -> dict:
    """Every method of every backend; methods: nimblelm's speculative_config per method name."""
    k = max((c["num_speculative_tokens"] for c in methods.values()), default=4)
    lookup_max = next((c.get("prompt_lookup_max", 3) for c in methods.values() if c["method"] == "ngram"), 3)
    max_num_seqs = max([1, *load_sets])
    # One untimed request first on every engine and mode, as long as the longest prompt (up to 256 tokens):
    # the first prefill of a length pays one-off costs (allocations, kernel set-up) no run should carry.
    longest = max(r.prompt_len for rs in workloads.values() for r in rs)
    warm = BenchRequest(tuple(ctx.prompt(min(256, longest), 10_000)), 8)
    statuses: dict[str, dict] = {}
    rows: list[dict] = []
    load_rows: list[dict] = []
    records: dict[str, dict] = {}
    load: dict[str, dict] = {}
    arrivals: dict[str, dict] = {}
    monitor = CpuMonitor()
    for method, config in {"plain": None, **methods}.items():
        logger(f"nimblelm {method}: {sum(map(len, workloads.values()))} requests at batch 1, then batch sizes "
               f"{', '.join(map(str, load_sets)) or 'none'}, then request rates {', '.join(map(str, rate_sets)) or 'none'}")
        try:
            records[method], load[method], arrivals[method], costs = _nimblelm(
                ctx, config, workloads, load_sets, rate_sets, max_num_seqs, warm)
        except Exception as e:  # a method that cannot run is reported; the others still run
            if method == "plain":
                raise
            logger(f"nimblelm {method} failed: {one_line(e)}")
            statuses[f"nimblelm {method}"] = {"status": "failed", "reason": one_line(e)}
            continue
        statuses[f"nimblelm {method}"] = {"status": "ok", "speculative_config": config, "max_num_seqs": max_num_seqs,
                                          **costs}
    statuses["nimblelm"] = {"status": "ok", "other_activity": monitor.stop()}
    rows += _rows("nimblelm", records)
    for method, by_batch in load.items():
        for b, run in by_batch.items():
            base = load["plain"][b]
            rate = run["output_tokens"] / run["seconds"]
            load_rows.append({"backend": "nimblelm", "method": method, "batch": b, "output_tokens": run["output_tokens"],
                              "seconds": round(run["seconds"], 3), "tok_s": rate,
                              "speedup": rate / (base["output_tokens"] / base["seconds"]),
                              "identical": sum(a == p for a, p in zip(run["tokens"], base["tokens"])),
                              "requests": len(run["tokens"])})
    rate_rows = []
    for method, by_rate in arrivals.items():
        for rate, run in by_rate.items():
            base = arrivals["plain"][rate]
            latency, base_latency = statistics.mean(run["latencies"]), statistics.mean(base["latencies"])
            rate_rows.append({"backend": "nimblelm", "method": method, "rate": rate, "requests": len(run["tokens"]),
                              "output_tokens": run["output_tokens"], "seconds": round(run["seconds"], 3),
                              "tok_s": run["output_tokens"] / run["seconds"], "mean_latency_s": latency,
                              "latency_speedup": base_latency / latency,
                              "identical": sum(a == p for a, p in zip(run["tokens"], base["tokens"]))})
    peers = {"transformers": lambda: _transformers(ctx, draft, k, lookup_max, workloads, warm),
             "llama.cpp": lambda: _llamacpp(ctx, draft, k, workloads, warm)}
    for name in backends:
        if name == "nimblelm":
            continue
        if name not in peers:
            statuses[name] = {"status": "skipped", "reason": "vLLM's CPU backend does not run speculative decoding"
                              if name == "vllm" else f"no speculative decoding measured for {name}"}
            continue
        logger(f"{name}: plain and speculative modes at batch 1")
        monitor = CpuMonitor()
        try:
            by_mode, info = peers[name]()
        except BackendUnavailable as e:
            logger(f"skipping {name}: {e}")
            statuses[name] = {"status": "skipped", "reason": str(e)}
            continue
        except Exception as e:  # noqa: BLE001 - one peer failing must not lose the others
            logger(f"{name} failed: {one_line(e)}")
            statuses[name] = {"status": "failed", "reason": one_line(e)}
            continue
        finally:
            gc.collect()
        statuses[name] = {"status": "ok", **info, "other_activity": monitor.stop()}
        rows += _rows(name, by_mode)
    return {"results": rows, "load": load_rows, "rates": rate_rows, "backends": statuses}


# ------------------------------------------------------------------------------------------ report


def _f(v, digits: int = 2, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _targets(report: dict) -> list[str]:
    """The issue's targets, each said as met or missed with the measured figure (never asserted)."""
    rows, cfg = report["results"], report["config"]
    out = []

    def row(backend, method, workload):
        return next((r for r in rows if (r["backend"], r["method"], r["workload"]) == (backend, method, workload)), None)

    dm = row("nimblelm", "draft_model", "humaneval")
    if dm:
        out.append(f"draft model on HumanEval, batch 1: {dm['speedup']:.2f}× plain decoding (target 2.0× for a "
                   f"float32 target, 1.3× for int4; this run: {cfg.get('quantization') or cfg['dtype']})")
    ng = row("nimblelm", "ngram", "edit")
    if ng:
        out.append(f"ngram on the editing workload: {ng['speedup']:.2f}× (target 2.0×)")
    for workload in cfg["workloads"]:
        ours = [r for r in rows if r["backend"] == "nimblelm" and r["method"] != "plain" and r["workload"] == workload]
        theirs = [r for r in rows if r["backend"] == "llama.cpp" and r["method"] != "plain" and r["workload"] == workload]
        if ours and theirs:
            a, b = max(ours, key=lambda r: r["tok_s"]), max(theirs, key=lambda r: r["tok_s"])
            out.append(f"{workload}, batch 1: our best ({a['method']}, {a['tok_s']:.2f} tok/s) is {a['tok_s'] / b['tok_s']:.2f}× "
                       f"llama.cpp's best speculative mode ({b['method']}, {b['tok_s']:.2f} tok/s) (target 1.2×)")
    top = max((r["batch"] for r in report["load"]), default=None)
    if top is not None and top > 1:
        worst = min((r for r in report["load"] if r["batch"] == top and r["method"] != "plain"),
                    key=lambda r: r["speedup"], default=None)
        if worst:
            out.append(f"batch {top}, ShareGPT chat: the slowest method ({worst['method']}) is {worst['speedup']:.2f}× "
                       "plain decoding (target: none below 0.95×)")
    return out


def survey_spec_markdown(report: dict) -> str:
    from nimblelm.bench.report import machine_lines

    cfg = report["config"]
    out = ["# bench survey speculative: the survey's Table 5 on this machine", "", *machine_lines(report),
           (f"- target {cfg['model']} ({cfg.get('quantization') or cfg['dtype']}), drafter {cfg.get('draft_model') or '-'}"
           f"{' (' + cfg['draft_quantization'] + ')' if cfg.get('draft_quantization') else ''}, "
           f"{cfg['num_speculative_tokens']} draft tokens at most; greedy; each request up to {cfg['gen_len']} "
           f"tokens or its end of sequence; {cfg['num_prompts']} requests per workload; {cfg['threads']} threads"), ""]
    for name, s in report["backends"].items():
        if s.get("status") != "ok":
            out.append(f"- {name}: {s.get('status')} ({s.get('reason')})")
        elif activity_text(s.get("other_activity") or {}):
            out.append(f"- {name}: {activity_text(s['other_activity'])}")
        if s.get("decode_step_s_by_rows"):  # what verifying drafts costs: the rows they add to a step
            steps = ", ".join(f"{rows}: {1e3 * sec:.1f}" for rows, sec in s["decode_step_s_by_rows"].items())
            out.append(f"- {name}: decode step milliseconds by rows (measured at start, the draft budget's costs): {steps}")
    out += ["", "## Batch 1", "",
            ("Speedup: output tokens/s over the same backend's plain decoding of the same requests. Tokens per "
            "step: generated tokens / target decode steps (the survey's \"acceptance rate\"). Kept: the share "
            "of draft tokens the target accepted. Drafting: the share of the time nimblelm's proposer took. "
            "Identical: outputs equal to plain decoding's."), "",
            "| backend | method | extra cost | workload | tokens/s | speedup | tokens per step | kept | drafting | identical |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    costs = dict(EXTRA_COST)
    for name, backend in report["backends"].items():
        heads = backend.get("heads")
        if heads and name.startswith("nimblelm "):
            c = heads["cost"]
            costs[name.removeprefix("nimblelm ")] = (
                f"{heads['method']} heads: {c['cpu_hours']:.2f} CPU-hours ({c['wall_s'] / 60:.0f} min × "
                f"{c['threads']} threads: {heads['prompts']} answers distilled, {heads['epochs']} epochs)")
    if report.get("datastore"):
        d = report["datastore"]
        costs["suffix"] = (f"datastore: {d['tokens'] / 1e6:.1f}M tokens in {d['tokenize_s'] + d['sort_s']:.0f} s "
                           f"({d['bytes'] / 2**20:.0f} MiB)")
    if report.get("layer_search"):
        f = report["layer_search"]
        skipped = report["config"]["methods"]["layer_skip"]["skip_layers"]
        costs["layer_skip"] = (f"layer search: {f['search_seconds']:.0f} s on {f['calibration_tokens']} tokens; "
                               f"skips {len(skipped)} of {f['num_layers']} layers"
                               + ("" if f["skip_layers"] else " (no subset modeled a gain: the first tried)"))
    for r in report["results"]:
        out.append(f"| {r['backend']} | {r['method']} | {costs.get(r['method'], 'none')} | {r['workload']} | "
                   f"{r['tok_s']:.2f} | {r['speedup']:.2f}× | {_f(r.get('tokens_per_step'))} | "
                   f"{_pct(r.get('draft_acceptance'))} | {_pct(r.get('drafting_share'))} | "
                   f"{r['identical']}/{r['requests']} |")
    if report["load"]:
        batches = sorted({r["batch"] for r in report["load"]})
        out += ["", "## Under load: ShareGPT chat, b requests at once (nimblelm)", "",
                "Output tokens/s, and the speedup over plain decoding at the same batch size.", "",
                "| method | " + " | ".join(f"batch {b}" for b in batches) + " |",
                "| --- | " + " | ".join("---:" for _ in batches) + " |"]
        for method in dict.fromkeys(r["method"] for r in report["load"]):
            cells = {r["batch"]: r for r in report["load"] if r["method"] == method}
            out.append(f"| {method} | " + " | ".join(
                f"{cells[b]['tok_s']:.1f} ({cells[b]['speedup']:.2f}×)" if b in cells else "-" for b in batches) + " |")
    if report.get("rates"):
        rates = sorted({r["rate"] for r in report["rates"]})
        out += ["", "## Under load: ShareGPT chat requests arriving at Poisson rates (nimblelm)", "",
                ("Output tokens/s, mean latency from a request's arrival to its last token, and in brackets the "
                 "latency of plain decoding over the method's at the same rate."), "",
                "| method | " + " | ".join(f"{r:g} req/s" for r in rates) + " |",
                "| --- | " + " | ".join("---:" for _ in rates) + " |"]
        for method in dict.fromkeys(r["method"] for r in report["rates"]):
            cells = {r["rate"]: r for r in report["rates"] if r["method"] == method}
            out.append(f"| {method} | " + " | ".join(
                f"{cells[r]['tok_s']:.1f} tok/s, {cells[r]['mean_latency_s']:.2f} s ({cells[r]['latency_speedup']:.2f}×)"
                if r in cells else "-" for r in rates) + " |")
    if report.get("layer_search"):
        f = report["layer_search"]
        out += ["", "## layer_skip's search", "",
                (f"Greedy next-token agreement with the whole model, teacher forced on {f['calibration_tokens']} "
                 f"calibration tokens, as the search took layers out two at a time, and the speedup it models at "
                 f"k={f['num_speculative_tokens']} (tokens per step over 1 + k × the drafting pass's share of the "
                 "weights)."), "",
                "| layers kept | skipped | agreement | modeled speedup |", "| ---: | --- | ---: | ---: |"]
        out += [f"| {p['kept']} | {p.get('skip_layers', [])} | {_pct(p['agreement'])} | {p['modeled_speedup']:.2f}× |"
                for p in f["path"]]
    out += ["", "## Targets", "", *(f"- {t}" for t in _targets(report)), "",
            "## The survey's Table 5 (theirs: 7B-33B targets on a GPU, Vicuna-80; not comparable with the rows above)",
            "", "| method | draft model | draft construction | verifier | extra cost (GPU hours) | acceptance rate | speedup |",
            "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for s in SURVEY_TABLE5:
        out.append(f"| {s['method']} | {s['draft']} | {s['construction']} | {s['verifier']} | {s['overhead_gpu_h']} | "
                   f"{s['acceptance']} | {s['speedup']} |")
    return "\n".join(out) + "\n"
