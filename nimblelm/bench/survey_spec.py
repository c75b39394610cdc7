"""`nimblelm bench survey speculative`: the survey's Table 5 (speculative decoding) on this machine.

Batch 1: every request of each workload alone, greedy, up to its max_tokens or the end of sequence. For each
method, on one backend: output tokens / wall seconds summed over the requests, the speedup over that
backend's own plain decoding of the same requests, tokens per target step (the survey's "acceptance rate":
generated tokens / generation steps), the share of draft tokens kept, and how many outputs are identical to
plain decoding's. The backends, in the same run and on the same weights: nimblelm's methods; transformers'
assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`) against its own `generate`; llama.cpp's
server with the draft model and with its n-gram modes against its plain decoding.

Plain decoding runs in turn with each method, request by request, the first of the two rotating: a shared
machine's speed drifts (on the 2-core guest of 2026-12-04, the same plain engine decoded HumanEval at 47.9
and at 65.7 tokens/s in runs minutes apart, nothing else running in the guest), which a method measured
minutes after plain decoding would read as its own speedup. nimblelm keeps its plain engine up beside
each method's; llama.cpp runs one server per mode, transformers one model for all its modes.

Under load: for each batch size b, b ShareGPT chat requests at once (nimblelm only; its max_num_seqs is the
largest b): output tokens/s of each method over plain decoding's, speculation inside continuous batching.
And for each request rate, 2 x num_prompts more of them arriving at Poisson times: output tokens/s and mean
latency from arrival to the last token, against plain decoding's at the same rate.

The report puts the survey's own numbers (7B-33B models on a GPU) beside ours, labelled as theirs.
"""

from __future__ import annotations

import gc
import json
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


class _Engine:
    """One nimblelm engine with speculative_config=config, warmed up: batch-1 requests, batches at once and
    Poisson arrivals, each measured alone; and the engine's measured costs."""

    def __init__(self, ctx: BenchContext, config: dict | None, max_num_seqs: int, warm: BenchRequest,
                 warm_batch: int, kv_policy: dict | None = None):
        from nimblelm import LLM, SamplingParams

        self.config = config
        self.llm = LLM(model=ctx.model, dtype=ctx.dtype, max_model_len=ctx.max_model_len, max_num_seqs=max_num_seqs,
                       num_threads=ctx.threads, quantization=ctx.quantization, kv_cache_dtype=ctx.kv_cache_dtype,
                       speculative_config=config, kv_policy=kv_policy)
        self.runner = self.llm.llm_engine.runner
        self.clock = _DraftClock(self.runner.proposer) if self.runner.proposer is not None else None
        self.seed = ctx.seed
        self.llm.generate([list(warm.prompt_token_ids)], self.params(warm), use_tqdm=False)
        if warm_batch > 1:  # the first steps of the largest batch pay one-off costs (its KV blocks' first touch)
            self.llm.generate([ctx.prompt(warm.prompt_len, 20_000 + i) for i in range(warm_batch)],
                              SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)

    @staticmethod
    def params(r: BenchRequest):
        from nimblelm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=r.output_len)

    def one(self, r: BenchRequest) -> dict:
        drafting = self.clock.seconds if self.clock else 0.0
        t0 = time.perf_counter()
        out = self.llm.generate([list(r.prompt_token_ids)], self.params(r), use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        if self.config is None:
            return _record(out.outputs[0].token_ids, seconds)
        spec = out.metrics.spec  # a request that never took drafts has no spec stats
        return _record(out.outputs[0].token_ids, seconds, spec.num_accepted_tokens if spec else 0,
                       spec.num_draft_tokens if spec else 0, self.clock.seconds - drafting)

    def at_once(self, requests: Sequence[BenchRequest]) -> dict:
        t0 = time.perf_counter()
        outs = self.llm.generate([list(r.prompt_token_ids) for r in requests], [self.params(r) for r in requests],
                                 use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        return {"seconds": time.perf_counter() - t0, "output_tokens": sum(map(len, tokens)), "tokens": tokens}

    def arriving(self, requests: Sequence[BenchRequest], rate: float) -> dict:
        """The requests sent at Poisson arrival times of the rate: the run's seconds, output tokens, each
        request's tokens and its latency from arrival to its last token."""
        from nimblelm.bench.arrivals import arrival_times

        engine = self.llm.llm_engine
        times = arrival_times(len(requests), rate, seed=self.seed)
        done: dict[int, tuple[list[int], float]] = {}
        sent, t0 = 0, time.perf_counter()
        while len(done) < len(requests):
            now = time.perf_counter() - t0
            while sent < len(requests) and times[sent] <= now:
                engine.add_request(f"arrival-{sent}", list(requests[sent].prompt_token_ids), self.params(requests[sent]))
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

    def costs(self) -> dict:
        """The seconds of a decode step by rows, as the draft budget sees them, and what trained heads cost."""
        cost = self.runner.step_cost
        costs = {"decode_step_s_by_rows": dict(zip(cost.rows, cost.seconds))} if cost is not None else {}
        if self.config is not None and self.config["method"] in TRAINED:
            costs["heads"] = self.runner.proposer.meta
        return costs

    def close(self) -> None:
        del self.llm, self.runner, self.clock
        gc.collect()


def _in_turn(runs: dict[str, Callable], items: Sequence) -> dict[str, list]:
    """Every item run by each of runs in turn, the first run of the turn rotating from item to item: the
    machine's speed drifts over minutes, which a method measured after another would read as its own."""
    names = list(runs)
    out: dict[str, list] = {name: [] for name in names}
    for i, item in enumerate(items):
        for name in names[i % len(names):] + names[:i % len(names)]:
            out[name].append(runs[name](item))
    return out


def _beside(plain: _Engine, engine: _Engine, workloads: dict[str, list[BenchRequest]],
            load_sets: dict[int, list[BenchRequest]], rate_sets: dict[float, list[BenchRequest]]) -> dict[str, dict]:
    """The method's engine and the plain one in turn on every batch-1 request, batch and arrival run:
    {"method" | "plain": {"batch1": records per workload, "load": run per batch size, "rates": run per rate}}."""
    runs = {"method": engine, "plain": plain}
    out = {name: {"batch1": {}, "load": {}, "rates": {}} for name in runs}
    for workload, requests in workloads.items():
        for name, records in _in_turn({n: e.one for n, e in runs.items()}, requests).items():
            out[name]["batch1"][workload] = records
    for name, by_b in _in_turn({n: e.at_once for n, e in runs.items()}, list(load_sets.values())).items():
        out[name]["load"] = dict(zip(load_sets, by_b))
    arrivals = {n: (lambda item, e=e: e.arriving(*item)) for n, e in runs.items()}
    for name, by_rate in _in_turn(arrivals, [(rs, rate) for rate, rs in rate_sets.items()]).items():
        out[name]["rates"] = dict(zip(rate_sets, by_rate))
    return out


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

    runs = {mode: (lambda r, extra=extra: generate(r, extra)) for mode, extra in modes.items()}
    for run in runs.values():
        run(warm)
    out: dict[str, dict] = {mode: {} for mode in modes}
    for name, requests in workloads.items():
        for mode, records in _in_turn(runs, requests).items():
            out[mode][name] = records
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
    """Batch-1 records per mode and workload from llama-server (one slot, one server per mode, asked in
    turn): plain, each n-gram mode, and the draft model (--spec-draft-n-max k); and the peer's info."""
    from nimblelm.bench.llamacpp import LlamaCppBackend

    LlamaCppBackend(ctx).check()
    t = str(ctx.threads)
    modes = {"plain": [], **{m: ["--spec-type", m] for m in LLAMACPP_NGRAM_MODES}}
    if draft is not None:
        drafter = LlamaCppBackend(draft)
        drafter.load()
        # -md alone loads the drafter but drafts nothing: the type turns it on
        modes["draft model"] = ["--spec-type", "draft-simple", "-md", str(drafter.gguf), "--spec-draft-n-max", str(k),
                                "-td", t, "-tbd", t]
    servers = {mode: LlamaCppBackend(ctx) for mode in modes}  # one server per mode, all up: asked in turn
    try:
        for mode, server in servers.items():
            server.load()
            server.server_args = modes[mode]
            server.start_server(1)
            server.complete(warm)

        def run(mode: str):
            def one(r: BenchRequest) -> dict:
                t0 = time.perf_counter()
                resp = servers[mode].complete(r, ignore_eos=False)
                seconds = time.perf_counter() - t0
                if mode == "plain":
                    return _record(resp.get("tokens") or [], seconds)
                timings = resp.get("timings") or {}  # without draft_n where no drafts were made
                return _record(resp.get("tokens") or [], seconds, timings.get("draft_n_accepted", 0),
                               timings.get("draft_n", 0))
            return one

        out: dict[str, dict] = {mode: {} for mode in modes}
        for name, requests in workloads.items():
            for mode, records in _in_turn({mode: run(mode) for mode in modes}, requests).items():
                out[mode][name] = records
        return out, servers["plain"].info()
    finally:
        for server in servers.values():
            server.close()


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


def _rows(backend: str, by_mode: dict[str, dict], beside: dict[str, dict]) -> list[dict]:
    """Each mode's row per workload, its speedup over the plain records measured beside it (beside[mode]);
    plain's own row from by_mode["plain"], its identical count against its first run of each request."""
    rows = []
    for mode, by_workload in by_mode.items():
        for workload, records in by_workload.items():
            if mode == "plain":
                first = next(iter(beside.values()))[workload]
                summary = {**_summary(records, records), "tokens_per_step": 1.0,
                           "identical": sum(r["tokens"] == first[i % len(first)]["tokens"] for i, r in enumerate(records))}
            else:
                summary = _summary(records, beside[mode][workload])
            rows.append({"backend": backend, "method": mode, "workload": workload, **summary})
    return rows


def _pooled(runs: Sequence[dict]) -> dict:
    """Runs of the same requests as one: seconds and tokens summed, each request's tokens and latencies listed."""
    out = {"seconds": sum(r["seconds"] for r in runs), "output_tokens": sum(r["output_tokens"] for r in runs),
           "tokens": [t for r in runs for t in r["tokens"]]}
    if all("latencies" in r for r in runs):
        out["latencies"] = [x for r in runs for x in r["latencies"]]
    return out


def _run_row(run: dict, base: dict, reference: dict) -> dict:
    """A batch or arrival run: output tokens/s, its speedup over base's (and base's mean latency over its
    own), and how many of its outputs are reference's."""
    rate = run["output_tokens"] / run["seconds"]
    row = {"requests": len(run["tokens"]), "output_tokens": run["output_tokens"], "seconds": round(run["seconds"], 3),
           "tok_s": rate, "speedup": rate / (base["output_tokens"] / base["seconds"]),
           "identical": sum(a == reference["tokens"][i % len(reference["tokens"])] for i, a in enumerate(run["tokens"]))}
    if "latencies" in run:
        row["mean_latency_s"] = statistics.mean(run["latencies"])
        row["latency_speedup"] = statistics.mean(base["latencies"]) / row["mean_latency_s"]
    return row


def run_survey_speculative(ctx: BenchContext, methods: dict[str, dict], *, draft: BenchContext | None,
                           workloads: dict[str, list[BenchRequest]], load_sets: dict[int, list[BenchRequest]],
                           rate_sets: dict[float, list[BenchRequest]], backends: Sequence[str],
                           logger: Callable[[str], None], kv_policy: dict | None = None) -> dict:
    """Every method of every backend; methods: nimblelm's speculative_config per method name. nimblelm's
    plain engine stays up and runs beside each method's, in turn, request by request. kv_policy: every nimblelm
    engine's, plain decoding's too (the peers, which have none, are skipped)."""
    k = max((c["num_speculative_tokens"] for c in methods.values()), default=4)
    lookup_max = next((c.get("prompt_lookup_max", 3) for c in methods.values() if c["method"] == "ngram"), 3)
    max_num_seqs = max([1, *load_sets])
    # One untimed request first on every engine and mode, as long as the longest prompt (up to 256 tokens):
    # the first prefill of a length pays one-off costs (allocations, kernel set-up) no run should carry.
    longest = max(r.prompt_len for rs in workloads.values() for r in rs)
    warm = BenchRequest(tuple(ctx.prompt(min(256, longest), 10_000)), 8)
    warm_batch = max(load_sets, default=0)
    statuses: dict[str, dict] = {}
    measured: dict[str, dict] = {}  # method -> _beside's runs of it and of plain decoding
    monitor = CpuMonitor()
    plain = _Engine(ctx, None, max_num_seqs, warm, warm_batch, kv_policy)
    statuses["nimblelm plain"] = {"status": "ok", "speculative_config": None, "max_num_seqs": max_num_seqs,
                                  **plain.costs()}
    try:
        for method, config in methods.items():
            logger(f"nimblelm {method} and plain decoding in turn: {sum(map(len, workloads.values()))} requests "
                   f"at batch 1, then batch sizes {', '.join(map(str, load_sets)) or 'none'}, then request rates "
                   f"{', '.join(map(str, rate_sets)) or 'none'}")
            try:
                engine = _Engine(ctx, config, max_num_seqs, warm, warm_batch, kv_policy)
                # The plain engine ran these prompts beside the methods before: from its prefix cache they
                # would skip their prefill, which the method's engine pays.
                plain.llm.reset_prefix_cache()
                try:
                    measured[method] = _beside(plain, engine, workloads, load_sets, rate_sets)
                    costs = engine.costs()
                finally:
                    engine.close()
            except Exception as e:  # noqa: BLE001 - a method that cannot run is reported; the others still run
                logger(f"nimblelm {method} failed: {one_line(e)}")
                statuses[f"nimblelm {method}"] = {"status": "failed", "reason": one_line(e)}
                continue
            statuses[f"nimblelm {method}"] = {"status": "ok", "speculative_config": config,
                                              "max_num_seqs": max_num_seqs, **costs}
    finally:
        plain.close()
    statuses["nimblelm"] = {"status": "ok", "other_activity": monitor.stop()}
    rows: list[dict] = []
    load_rows: list[dict] = []
    rate_rows: list[dict] = []
    if measured:
        beside = {m: runs["plain"]["batch1"] for m, runs in measured.items()}
        by_mode = {"plain": {w: [r for b in beside.values() for r in b[w]] for w in workloads},
                   **{m: runs["method"]["batch1"] for m, runs in measured.items()}}
        rows += _rows("nimblelm", by_mode, beside)
        for kind, out, key in (("load", load_rows, "batch"), ("rates", rate_rows, "rate")):
            items = load_sets if kind == "load" else rate_sets
            for item in items:  # plain's row: its runs beside every method as one
                plains = [runs["plain"][kind][item] for runs in measured.values()]
                pooled = _pooled(plains)
                out.append({"backend": "nimblelm", "method": "plain", key: item, **_run_row(pooled, pooled, plains[0])})
            out += [{"backend": "nimblelm", "method": m, key: item,
                     **_run_row(runs["method"][kind][item], runs["plain"][kind][item], runs["plain"][kind][item])}
                    for m, runs in measured.items() for item in items]
    peers = {"transformers": lambda: _transformers(ctx, draft, k, lookup_max, workloads, warm),
             "llama.cpp": lambda: _llamacpp(ctx, draft, k, workloads, warm)}
    for name in backends:
        if name == "nimblelm":
            continue
        if kv_policy is not None:
            statuses[name] = {"status": "skipped", "reason": f"it runs no KV policy like {kv_policy['method']}"}
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
        rows += _rows(name, by_mode, {mode: by_mode["plain"] for mode in by_mode})
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
           f"tokens or its end of sequence; {cfg['num_prompts']} requests per workload; {cfg['threads']} threads"
           + (f"; every nimblelm engine with kv_policy {json.dumps(cfg['kv_policy'])}" if cfg.get("kv_policy") else "")),
           ""]
    for name, s in report["backends"].items():
        if s.get("status") != "ok":
            out.append(f"- {name}: {s.get('status')} ({s.get('reason')})")
        elif activity_text(s.get("other_activity") or {}):
            out.append(f"- {name}: {activity_text(s['other_activity'])}")
        if s.get("decode_step_s_by_rows"):  # what verifying drafts costs: the rows they add to a step
            steps = ", ".join(f"{rows}: {1e3 * sec:.1f}" for rows, sec in s["decode_step_s_by_rows"].items())
            out.append(f"- {name}: decode step milliseconds by rows (measured at start, the draft budget's costs): {steps}")
    out += ["", "## Batch 1", "",
            ("Speedup: output tokens/s over the same backend's plain decoding of the same requests, the two run "
             "in turn request by request (the machine's speed drifts over minutes); nimblelm's plain row pools its "
             "runs beside every method. Tokens per "
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
                "Output tokens/s, and the speedup over plain decoding at the same batch size, run in turn with it.", "",
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
