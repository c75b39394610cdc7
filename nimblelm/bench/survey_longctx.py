"""`nimblelm bench survey longctx`: the engine's KV cache policies (engine/kv_cache/policy.py) on long contexts,
beside NVIDIA's kvpress on the same float32 weights (issue 24).

- needle: a fact planted at each depth of contexts of each length (data_tasks.needle_prompt), the question
  after the context so that SnapKV's window votes with it; answered greedily by nimblelm with its full cache and
  with each method at each kept fraction of the prompt, and by kvpress (transformers) the same way. The prompt
  is plain text, no chat template, given to both engines as the same token ids.
- ppl: the perplexity of a text much longer than the budget, prompt_logprobs of one request whose prompt goes
  in chunks, each compacted to the budget before the next (per_chunk): every chunk attends only to what the
  policy kept, the streaming setting. nimblelm only: kvpress compresses a prompt once, after its prefill.
- speed: prefill seconds, decode tokens/s and the KV memory in use, full cache against each method at a fixed
  budget of entries, per context length, speed_batch requests (distinct texts) at once. The engines are loaded
  together and take each context in turn, the order rotating, so that the machine's drift over minutes lands on
  every engine alike.
- serve: requests of one length submitted at once to an engine whose KV memory holds two full contexts: output
  tokens/s, and how many ran at once; the full cache against each method at a budget.

A method may also be the full cache stored at another precision, `full-float16`, `full-int8`, `full-int4` or
`full-int2` (kv_cache_dtype): measured once per workload, as the full cache is, beside the policies.

Every engine runs without prefix caching: no request finds another's tokens cached, so each prefill is whole.
Compaction happens once a prompt is in, so a prompt's prefill still holds its whole context (speed's peak KV);
the KV in use while decoding is what a policy saves.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nimblelm.bench.data_tasks import NeedlePrompt
from nimblelm.bench.runner import one_line

FULL = "full"  # the method name of the uncompressed cache
FULL_AT = {f"{FULL}-{dtype}": dtype for dtype in ("float16", "int8", "int4", "int2")}  # the full cache, stored so
NEEDLE_TOKENS = 8  # a four-digit number and its full stop, with room to spare
WORKLOADS = ("needle", "ppl", "speed", "serve")
SERVE_CONTEXTS = 2  # serve's KV memory: this many full contexts


@dataclass(frozen=True)
class Grid:
    """What each workload measures; see the module docstring."""

    methods: tuple[str, ...]
    kvpress_methods: tuple[str, ...]
    ratios: tuple[float, ...]  # needle: kept fractions of the prompt
    contexts: tuple[int, ...]  # needle: context tokens
    depths: tuple[int, ...]  # needle: percent of the haystack before the needle
    ppl_tokens: int
    ppl_budgets: tuple[int, ...]
    chunk: int  # ppl: prompt tokens per step
    speed_contexts: tuple[int, ...]
    budget: int  # speed: entries kept
    speed_batch: int  # speed: requests of each context at once
    serve_requests: int
    serve_context: int
    serve_budget: int
    gen_len: int  # speed and serve: tokens generated per request


class Engines:
    """nimblelm engines of one model and precision, a KV policy apiece."""

    def __init__(self, model: str, dtype: str, threads: int, quantization: str | None, kv_cache_dtype: str):
        self.options = {"model": model, "dtype": dtype, "num_threads": threads, "quantization": quantization,
                        "kv_cache_dtype": kv_cache_dtype, "enable_prefix_caching": False}
        self.precision = None  # the engine's own words for it, once one is loaded

    def llm(self, policy: dict | None, max_model_len: int, max_num_seqs: int = 1, **options):
        """An engine for prompts of up to max_model_len, its cache sized for max_num_seqs whole contexts."""
        from nimblelm import LLM

        llm = LLM(**{**self.options, **options}, kv_policy=policy, max_model_len=max_model_len,
                  max_num_seqs=max_num_seqs)
        if not options.get("kv_cache_dtype"):  # the run's own precision, not a full-<dtype> method's
            self.precision = llm.llm_engine.precision
        return llm


@dataclass
class Run:
    """Requests run to the end on one engine, its KV blocks and running sequences sampled after every step."""

    outputs: list  # RequestOutput, in the order of the prompts
    seconds: float
    peak_bytes: int  # KV memory in use at most, within a step too (a compaction's copy beside the old blocks)
    decode_bytes: int  # KV memory in use after a step once every request had its first token (0: none did)
    peak_running: int
    preemptions: int
    compactions: int  # a policy whose compactions were all skipped keeps every entry
    decode_tokens: int  # generated in the steps every request ran in, each past its first token
    decode_seconds: float  # those steps' time

    @property
    def decode_tok_s(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else None


_request_ids = itertools.count()


def run_requests(llm, prompts: Sequence[Sequence[int]], params) -> Run:
    """The prompts submitted at once and stepped to the end (LLM.generate's loop, with the samples).

    Blocks are taken while a step is planned and a compaction's old ones released after it runs, so the peak is
    read at every take from the engine's block pool; its compactions are counted as the manager finishes them.
    Both hooks are this engine's instance attributes, removed at the end."""
    engine = llm.llm_engine
    kv, per_block = engine.kv_cache_manager, engine.runner.kv_bytes_per_block()
    pool, ids = kv.pool, [f"longctx-{next(_request_ids)}" for _ in prompts]
    preempted, finished, peak, decode, running, compactions = engine.scheduler.num_preemptions, {}, [0], 0, 0, [0]
    generated, decode_tokens, decode_seconds = dict.fromkeys(ids, 0), 0, 0.0
    take, finish_compaction = pool.take, kv.finish_compaction

    def counted_take(n: int):
        blocks = take(n)
        peak[0] = max(peak[0], pool.num_blocks - pool.num_free)
        return blocks

    def counted_compaction(seq) -> None:
        compactions[0] += 1
        finish_compaction(seq)

    pool.take, kv.finish_compaction = counted_take, counted_compaction
    start = time.perf_counter()
    try:
        for request_id, prompt in zip(ids, prompts):
            engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, params)
        while engine.has_unfinished_requests():
            decoding = all(r.metrics.first_token_time is not None for r in engine.requests.values())
            steady = decoding and len(engine.requests) == len(ids)  # the whole batch decodes this step
            step_start = time.perf_counter()
            outs = engine.step()
            if steady:
                decode_seconds += time.perf_counter() - step_start
            for out in outs:
                if steady:
                    decode_tokens += len(out.outputs[0].token_ids) - generated[out.request_id]
                generated[out.request_id] = len(out.outputs[0].token_ids)
                if out.finished:
                    finished[out.request_id] = out
            running = max(running, engine.stats().num_running)
            if decoding:
                decode = max(decode, kv.num_blocks - kv.num_free_blocks)
        seconds = time.perf_counter() - start
    finally:
        del pool.take, kv.finish_compaction
        for request_id in ids:  # whatever an error left behind must not stay in the engine
            engine.abort_request(request_id)
    return Run([finished[i] for i in ids], seconds, peak[0] * per_block, decode * per_block, running,
               engine.scheduler.num_preemptions - preempted, compactions[0], decode_tokens, decode_seconds)


def _engine_args(method: str, **size) -> tuple[dict | None, dict]:
    """A method's KV policy (at `size`) and engine options."""
    if method == FULL:
        return None, {}
    if method in FULL_AT:
        return None, {"kv_cache_dtype": FULL_AT[method]}
    return {"method": method, **size}, {}


def _sized(method: str, sizes: Sequence, whole) -> Sequence:
    """The sizes a method runs at: every one for a policy, `whole` for a full cache."""
    return sizes if _engine_args(method)[0] is not None else [whole]


def _rotated(items: list, i: int) -> list:
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


# -------------------------------------------------------------------------------------------------- needle


def run_needle(engines: Engines, tokenizer, prompts: Sequence[NeedlePrompt], grid: Grid, kvpress=None,
               logger: Callable[[str], None] = lambda m: None) -> dict:
    """Every prompt answered by every engine, method and ratio. kvpress: kvpress_peer.generate with the model's
    folder bound (None: no peer). Returns records (one per answer) and errors (by engine and method)."""
    from nimblelm import SamplingParams

    records, errors = [], {}
    max_len = max(len(p.token_ids) for p in prompts) + NEEDLE_TOKENS
    params = SamplingParams(temperature=0.0, max_tokens=NEEDLE_TOKENS)
    configs = [(FULL, 1.0)] + [(m, r) for m in grid.methods for r in _sized(m, grid.ratios, 1.0)]

    def record(engine: str, method: str, ratio: float, p: NeedlePrompt, answer: str, compacted: bool | None) -> None:
        records.append({"engine": engine, "method": method, "ratio": ratio, "context": p.context_tokens,
                        "depth": round(100 * p.depth_asked), "landed": p.depth, "position": p.position,
                        "prompt_tokens": len(p.token_ids), "answer": answer, "expected": p.answer,
                        "correct": p.found(answer), "compacted": compacted})

    for method, ratio in configs:
        llm = None
        try:
            policy, options = _engine_args(method, ratio=ratio)
            llm = engines.llm(policy, max_len, **options)
            for p in prompts:
                run = run_requests(llm, [p.token_ids], params)
                record("nimblelm", method, ratio, p, run.outputs[0].outputs[0].text, run.compactions > 0)
        except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' rows
            errors.setdefault(f"nimblelm {method}", one_line(e))
        finally:
            llm = None  # the engine's weights and KV cache go before the next one loads
            gc.collect()
        logger(f"needle: nimblelm {method} at {ratio:g} done")
    peer = [(FULL, 1.0)] + [(m, r) for m in grid.kvpress_methods for r in grid.ratios]
    for method, ratio in peer if kvpress is not None else []:
        try:
            outs = kvpress([p.token_ids for p in prompts], None if method == FULL else method, ratio, NEEDLE_TOKENS)
            for p, out in zip(prompts, outs):
                record("kvpress", method, ratio, p, tokenizer.decode(out["token_ids"], skip_special_tokens=True), None)
        except Exception as e:  # noqa: BLE001
            errors.setdefault(f"kvpress {method}", one_line(e))
        logger(f"needle: kvpress {method} at {ratio:g} done")
    return {"records": records, "errors": errors}


def needle_summary(records: Sequence[dict], contexts: Sequence[int], depths: Sequence[int]) -> list[dict]:
    """One row per engine, method and ratio: accuracy over every cell, per context and per depth; for nimblelm,
    the share of cells its policy compacted, and the share where its answer is kvpress's (same method and
    ratio), where kvpress ran them."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["engine"], r["method"], r["ratio"]), []).append(r)
    answers = {(r["engine"], r["method"], r["ratio"], r["context"], r["depth"]): r["answer"].strip()
               for r in records}
    rows = []
    for (engine, method, ratio), rs in groups.items():
        def accuracy(cells: list[dict]) -> float:
            return statistics.fmean(r["correct"] for r in cells) if cells else math.nan

        theirs = [answers.get(("kvpress", method, ratio, r["context"], r["depth"])) for r in rs]
        same = [t == r["answer"].strip() for t, r in zip(theirs, rs) if engine == "nimblelm" and t is not None]
        rows.append({"workload": "needle", "engine": engine, "method": method, "ratio": ratio,
                     "accuracy": accuracy(rs), "cells": len(rs),
                     "by_context": [accuracy([r for r in rs if r["context"] == c]) for c in contexts],
                     "by_depth": [accuracy([r for r in rs if r["depth"] == d]) for d in depths],
                     "compacted": statistics.fmean(r["compacted"] for r in rs) if engine == "nimblelm" else None,
                     "same_as_kvpress": statistics.fmean(same) if same else None})
    return rows


# ----------------------------------------------------------------------------------------------------- ppl


def run_ppl(engines: Engines, token_ids: Sequence[int], grid: Grid,
            logger: Callable[[str], None] = lambda m: None) -> dict:
    """The text's perplexity with the full cache and each method at each budget, per_chunk, --chunk tokens a
    step; the tail perplexity counts the tokens from position max(budgets) on, where every budget has dropped
    entries. The score of a token is its prompt logprob, as eval/ppl.py's NimbleLMScorer takes it."""
    from nimblelm import SamplingParams

    rows, errors = [], {}
    ids, tail = list(token_ids), max(grid.ppl_budgets)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for method, budget in [(FULL, None)] + [(m, b) for m in grid.methods for b in _sized(m, grid.ppl_budgets, None)]:
        llm = None
        try:
            policy, options = _engine_args(method, budget=budget, per_chunk=True)
            llm = engines.llm(policy, len(ids) + 1, max_num_batched_tokens=grid.chunk, **options)
            run = run_requests(llm, [ids], params)
            logprobs = [entry[t].logprob for t, entry in zip(ids[1:], run.outputs[0].prompt_logprobs[1:])]
            rows.append({"workload": "ppl", "method": method, "budget": budget, "tokens": len(ids),
                         "ppl": math.exp(-math.fsum(logprobs) / len(logprobs)),
                         "ppl_tail": math.exp(-math.fsum(logprobs[tail - 1:]) / len(logprobs[tail - 1:])),
                         "tail_from": tail, "kv_peak_bytes": run.peak_bytes, "compactions": run.compactions,
                         "seconds": run.seconds})
        except Exception as e:  # noqa: BLE001
            errors.setdefault(f"ppl {method}", one_line(e))
        finally:
            llm = None  # the engine's weights and KV cache go before the next one loads
            gc.collect()
        logger(f"ppl: {method} at {budget or 'full'} done")
    return {"rows": rows, "errors": errors}


# --------------------------------------------------------------------------------------------------- speed


def _warm_up(llm, prompts: Sequence[Sequence[int]], warmup: int) -> None:
    """Short heads of the prompts run together: the batch's first decode steps are not the measured ones."""
    from nimblelm import SamplingParams

    for _ in range(warmup):
        run_requests(llm, [p[:256] for p in prompts], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))


def run_speed(engines: Engines, prompts: dict[int, list[list[int]]], grid: Grid, warmup: int = 1,
              logger: Callable[[str], None] = lambda m: None) -> dict:
    """Per context length (prompts: the speed_batch prompts of each), the prompts submitted at once, gen_len
    tokens generated each, on each engine. Decode: tokens/s over the steps the whole batch decodes in (none if
    the first request finished before the last one's first token). A method at a context within its budget
    would keep everything (the full cache's run again): not run."""
    from nimblelm import SamplingParams

    max_len = max(len(p) for batch in prompts.values() for p in batch) + grid.gen_len
    params = SamplingParams(temperature=0.0, max_tokens=grid.gen_len, ignore_eos=True)
    rows, errors, llms = [], {}, {}
    try:
        for name in [FULL, *grid.methods]:
            try:
                policy, options = _engine_args(name, budget=grid.budget)
                llms[name] = engines.llm(policy, max_len, max_num_seqs=grid.speed_batch, **options)
                _warm_up(llms[name], prompts[min(prompts)], warmup)
            except Exception as e:  # noqa: BLE001
                errors.setdefault(f"speed {name}", one_line(e))
        for i, context in enumerate(sorted(prompts)):
            for name in _rotated(list(llms), i):
                if _engine_args(name)[0] is not None and context <= grid.budget:
                    continue
                try:
                    run = run_requests(llms[name], prompts[context], params)
                except Exception as e:  # noqa: BLE001
                    errors.setdefault(f"speed {name}", one_line(e))
                    continue
                metrics = [o.metrics for o in run.outputs]
                rows.append({"workload": "speed", "method": name, "context": context, "batch": len(metrics),
                             "budget": None if _engine_args(name)[0] is None else grid.budget,
                             "prefill_s": max(m.first_token_time for m in metrics) - min(m.arrival_time for m in metrics),
                             "decode_tok_s": run.decode_tok_s,
                             "kv_peak_bytes": run.peak_bytes, "kv_decode_bytes": run.decode_bytes,
                             "compactions": run.compactions})
            logger(f"speed: {context} tokens done")
    finally:
        llms.clear()
        gc.collect()
    full = {r["context"]: r for r in rows if r["method"] == FULL}
    for r in rows:
        base = full.get(r["context"])
        r["prefill_vs_full"] = r["prefill_s"] / base["prefill_s"] if base else None
        decoded = base and base["decode_tok_s"] and r["decode_tok_s"]
        r["decode_vs_full"] = r["decode_tok_s"] / base["decode_tok_s"] if decoded else None
    return {"rows": rows, "errors": errors}


# --------------------------------------------------------------------------------------------------- serve


def serve_memory(ctx, grid: Grid) -> int:
    """KV cache bytes for SERVE_CONTEXTS whole requests at every layer, in whole blocks; an int8 cache's scales
    are left out, so it holds a little less."""
    import torch

    from nimblelm.config import EngineConfig

    cfg, block = ctx.config, EngineConfig.block_size
    kv_dtype = ctx.dtype if ctx.kv_cache_dtype == "auto" else ctx.kv_cache_dtype
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * getattr(torch, kv_dtype).itemsize
    return SERVE_CONTEXTS * -(-(grid.serve_context + grid.gen_len) // block) * block * per_token


def run_serve(engines: Engines, prompts: Sequence[list[int]], grid: Grid, memory_bytes: int, warmup: int = 1,
              logger: Callable[[str], None] = lambda m: None) -> dict:
    """All prompts at once, gen_len tokens each, on one engine per method with memory_bytes of KV cache."""
    from nimblelm import SamplingParams

    rows, errors = [], {}
    max_len = max(len(p) for p in prompts) + grid.gen_len
    params = SamplingParams(temperature=0.0, max_tokens=grid.gen_len, ignore_eos=True)
    for method in [FULL, *grid.methods]:
        llm = None
        try:
            policy, options = _engine_args(method, budget=grid.serve_budget)
            llm = engines.llm(policy, max_len, max_num_seqs=len(prompts), kv_cache_memory_bytes=memory_bytes, **options)
            _warm_up(llm, prompts[:1], warmup)
            run = run_requests(llm, prompts, params)
            kv = llm.llm_engine.kv_cache_manager
            rows.append({"workload": "serve", "method": method, "budget": None if policy is None else grid.serve_budget,
                         "requests": len(prompts), "context": len(prompts[0]), "seconds": run.seconds,
                         "output_tok_s": sum(len(o.outputs[0].token_ids) for o in run.outputs) / run.seconds,
                         "mean_ttft_s": statistics.fmean(o.metrics.first_token_time - o.metrics.arrival_time
                                                         for o in run.outputs),
                         "peak_running": run.peak_running, "preemptions": run.preemptions,
                         "compactions": run.compactions,
                         "kv_bytes": kv.num_blocks * llm.llm_engine.runner.kv_bytes_per_block()})
        except Exception as e:  # noqa: BLE001
            errors.setdefault(f"serve {method}", one_line(e))
        finally:
            llm = None  # the engine's weights and KV cache go before the next one loads
            gc.collect()
        logger(f"serve: {method} done")
    full = next((r for r in rows if r["method"] == FULL), None)
    for r in rows:
        r["vs_full"] = r["output_tok_s"] / full["output_tok_s"] if full else None
    return {"rows": rows, "errors": errors}


# ------------------------------------------------------------------------------------------------- the run


def _ids(tokenizer, body: Sequence[int]) -> list[int]:
    """body behind the BOS the model's tokenizer adds, if it adds one (Gemma's attention sink)."""
    return tokenizer.encode("", add_special_tokens=True) + list(body)


def haystack_prompt(tokenizer, tokens: int, seed: int) -> list[int]:
    """A prompt of exactly `tokens` ids of documentation text (speed, serve): what it says does not matter."""
    from nimblelm.bench.data_tasks import haystack_ids

    head = len(_ids(tokenizer, []))
    return _ids(tokenizer, haystack_ids(tokenizer, tokens - head, seed=seed))


def ppl_prompt(tokenizer, tokens: int) -> list[int]:
    """The first `tokens` ids of eval/ppl.py's pydoc text set (CPython's pydoc topics), behind any BOS."""
    from nimblelm.eval.ppl import load_text_set

    head = len(_ids(tokenizer, []))
    ids = _ids(tokenizer, tokenizer.encode(load_text_set("pydoc"), add_special_tokens=False)[: tokens - head])
    if len(ids) < tokens:
        raise ValueError(f"the pydoc text holds only {len(ids)} tokens of this model, fewer than {tokens}")
    return ids


def run_survey_longctx(ctx, grid: Grid, workloads: Sequence[str], *, kvpress=None, warmup: int = 1,
                       seed: int = 0, logger: Callable[[str], None] = lambda m: None) -> dict:
    """Each workload in turn on ctx's model (bench.backends.BenchContext); kvpress: see run_needle. Returns the
    report's results (rows with their workload), needle records, errors, seconds per workload and the engine's
    precision in words."""
    from nimblelm.bench.data_tasks import needle_prompt

    tok = ctx.tokenizer
    engines = Engines(ctx.model, ctx.dtype, ctx.threads, ctx.quantization, ctx.kv_cache_dtype)
    out = {"results": [], "records": [], "errors": {}, "timings": {}}
    for workload in workloads:
        start = time.perf_counter()
        logger(f"== {workload}")
        if workload == "needle":
            prompts = [needle_prompt(tok, c, d / 100, seed=seed) for c in grid.contexts for d in grid.depths]
            part = run_needle(engines, tok, prompts, grid, kvpress, logger)
            out["records"] = part["records"]
            part["rows"] = needle_summary(part["records"], grid.contexts, grid.depths)
        elif workload == "ppl":
            part = run_ppl(engines, ppl_prompt(tok, grid.ppl_tokens), grid, logger)
        elif workload == "speed":
            prompts = {c: [haystack_prompt(tok, c, seed + c + 7919 * k) for k in range(grid.speed_batch)]
                       for c in grid.speed_contexts}
            part = run_speed(engines, prompts, grid, warmup, logger)
        else:
            prompts = [haystack_prompt(tok, grid.serve_context, seed + 7919 * (k + 1))
                       for k in range(grid.serve_requests)]
            part = run_serve(engines, prompts, grid, serve_memory(ctx, grid), warmup, logger)
        out["results"] += part["rows"]
        out["errors"].update(part["errors"])
        out["timings"][workload] = time.perf_counter() - start
    out["precision"] = engines.precision
    return out


# ------------------------------------------------------------------------------------------------ markdown


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _num(x, digits: int = 2, suffix: str = "") -> str:
    return f"{x:.{digits}f}{suffix}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _mib(n) -> str:
    return f"{n / 2**20:.1f}" if n else "-"


def _rows(report: dict, workload: str) -> list[dict]:
    return [r for r in report["results"] if r["workload"] == workload]


def survey_longctx_markdown(report: dict) -> str:
    from nimblelm.bench.report import machine_lines

    cfg = report["config"]
    took = ", ".join(f"{w} {s:.0f} s" for w, s in report["timings"].items())
    out = ["# bench survey longctx: KV cache policies on long contexts", "", *machine_lines(report),
           (f"- nimblelm: {report.get('precision') or cfg['dtype']}; no prefix caching; {cfg['threads']} "
            f"thread{'' if cfg['threads'] == 1 else 's'}"),
           (f"- kvpress {cfg['kvpress_version']} (its own env, transformers {cfg['kvpress_transformers']}): the same "
            "weights as a float32 Hugging Face folder, sdpa attention" if cfg.get("kvpress_methods") is not None
            and "kvpress" not in report["skipped"] else "- kvpress: not run"),
           (f"- methods: {', '.join(cfg['methods'])} with the policies' defaults (streaming: 4 sinks; snapkv: "
            "window 64, kernel 5), as kvpress's presses"),
           f"- took: {took} ({sum(report['timings'].values()):.0f} s in all)"]
    out += [f"- {name}: skipped ({reason})" for name, reason in report["skipped"].items()]
    out += [f"- {name}: failed ({reason})" for name, reason in report["errors"].items()]
    for workload, section in (("needle", _needle_md), ("ppl", _ppl_md), ("speed", _speed_md), ("serve", _serve_md)):
        if workload in report["timings"]:
            out += ["", *section(report, _rows(report, workload))]
    return "\n".join(out) + "\n"


def _needle_md(report: dict, rows: list[dict]) -> list[str]:
    cfg = report["config"]
    contexts, depths = cfg["context_tokens"], cfg["depths"]
    out = ["## Needle in a haystack", "",
           (f"A fact planted at depths {', '.join(f'{d}%' for d in depths)} of contexts of "
            f"{', '.join(map(str, contexts))} tokens (Python documentation), the question after it, answered "
            f"greedily ({NEEDLE_TOKENS} tokens). Kept: the fraction of the prompt's KV entries each layer keeps "
            "(nimblelm rounds up to its 16-entry block). Accuracy: share of right answers, over every cell, per "
            "context length and per depth. Compacted: share of cells where nimblelm's policy compacted the cache "
            "(a compaction the engine cannot make is skipped). Same as kvpress: share of cells where nimblelm's "
            "answer is kvpress's."),
           "", "| engine | method | kept | accuracy | " + " | ".join(f"{c} tok" for c in contexts) + " | "
           + " | ".join(f"depth {d}%" for d in depths) + " | compacted | same as kvpress |",
           "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in [*contexts, *depths]) + " | ---: | ---: |"]
    for r in rows:
        full = _engine_args(r["method"])[0] is None
        kept = "all" if full else f"{r['ratio']:g}"
        compacted = _pct(r["compacted"]) if r["compacted"] is not None and not full else "-"
        out.append(f"| {r['engine']} | {r['method']} | {kept} | {_pct(r['accuracy'])} | "
                   + " | ".join(_pct(a) for a in [*r["by_context"], *r["by_depth"]])
                   + f" | {compacted} | {_pct(r['same_as_kvpress']) if r['same_as_kvpress'] is not None else '-'} |")
    return out


def _ppl_md(report: dict, rows: list[dict]) -> list[str]:
    cfg = report["config"]
    tail = rows[0]["tail_from"] if rows else max(cfg["ppl_budgets"])
    out = ["## Perplexity in the streaming setting", "",
           (f"The first {cfg['ppl_tokens']} tokens of CPython's pydoc topics (eval/ppl.py's text set) as one "
            f"prompt, {cfg['chunk']} tokens a step, compacted to the budget after every step (per_chunk): each "
            f"chunk attends only to what the policy kept. Past {tail}: the perplexity of the tokens from position "
            f"{tail} on, where every budget has dropped entries. KV peak: the most KV memory in use. "
            "Compactions: how many times the policy compacted the cache."), "",
           f"| method | budget | perplexity | past {tail} | KV peak MiB | compactions | seconds |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['method']} | {r['budget'] or 'all'} | {_num(r['ppl'])} | {_num(r['ppl_tail'])} | "
                   f"{_mib(r['kv_peak_bytes'])} | {r['compactions']} | {r['seconds']:.1f} |")
    return out


def _speed_md(report: dict, rows: list[dict]) -> list[str]:
    cfg = report["config"]
    out = ["## Speed and KV memory", "",
           (f"{_batch_words(cfg.get('speed_batch', 1))}, {cfg['gen_len']} tokens generated each (EOS ignored), each "
            f"method keeping {cfg['budget']} entries a request; a method at a context within its budget would keep "
            "everything and is not run. Prefill: seconds until every request had its first token (the policy's "
            "scoring included). Decode: tokens/s over the steps the whole batch decoded in. KV decoding: the most "
            "KV memory in use while decoding; KV peak: the most at all, the whole prompt being in before it is "
            "compacted. The engines take each context in turn, the order rotating.")]
    if cfg.get("speed_contexts_dropped"):
        out.append(f"Contexts beyond the model's limit, dropped: {', '.join(map(str, cfg['speed_contexts_dropped']))}.")
    out += ["", ("| context | method | prefill s | prefill vs full | decode tok/s | decode vs full | KV decoding MiB | "
                 "KV peak MiB |"), "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: r["context"]):
        out.append(f"| {r['context']} | {r['method']} | {r['prefill_s']:.2f} | {_num(r['prefill_vs_full'], 2, '×')} | "
                   f"{_num(r['decode_tok_s'])} | {_num(r['decode_vs_full'], 2, '×')} | {_mib(r['kv_decode_bytes'])} | "
                   f"{_mib(r['kv_peak_bytes'])} |")
    return out


def _batch_words(batch: int) -> str:
    return "Batch 1" if batch == 1 else f"{batch} requests of each context at once (distinct texts)"


def _serve_md(report: dict, rows: list[dict]) -> list[str]:
    cfg = report["config"]
    out = ["## Serving long requests", "",
           (f"{cfg['serve_requests']} requests of {cfg['serve_context']} tokens submitted at once, {cfg['gen_len']} "
            f"tokens generated each, to an engine whose KV cache holds {SERVE_CONTEXTS} whole requests; each method "
            f"keeps {cfg['serve_budget']} entries per request once its prompt is in. Most at once: the most "
            "requests in the running batch after any step. Compactions: how many the policy made (one the engine "
            "cannot make is skipped)."), "",
           ("| method | budget | output tok/s | vs full | most at once | preemptions | compactions | mean TTFT s | "
            "seconds | KV MiB |"),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['method']} | {r['budget'] or 'all'} | {r['output_tok_s']:.2f} | {_num(r['vs_full'], 2, '×')} | "
                   f"{r['peak_running']} | {r['preemptions']} | {r['compactions']} | {r['mean_ttft_s']:.1f} | "
                   f"{r['seconds']:.1f} | {_mib(r['kv_bytes'])} |")
    return out
