"""`nimblelm bench survey data`: the survey's data level (input compression) on this machine, beside `llmlingua`.

Each task (long-document QA, a planted fact, ShareGPT's longest prompts; `data_tasks`) has its context
compressed by every method at every target ratio: nimblelm's methods scoring with their small LM in
nimblelm's engine, and the `llmlingua` package's LLMLingua and LongLLMLingua scoring with transformers on the
same weights. The answering model then answers the uncompressed prompt and every compressed one, greedy, each
request alone with its prefix cache emptied first (no prompt finds another's tokens cached). The scorer's prefix cache is
emptied before each compression: a compression never reuses the scoring of another.

Compressions, then answers, run in turn task by task, the order rotating: the machine's speed drifts over
minutes, and a method measured minutes apart from the uncompressed prompts would read the drift as its own.

Per workload, method and ratio: the accuracy (and its share of the uncompressed prompts' accuracy), the ratio
reached (the scorer's tokens of the context before and after), the compressor's seconds, and the answer's time
to first token and end-to-end seconds with and without compression. The break-even prompt length: where the
answer time a method saves (fit linear in the prompt's tokens) reaches its own time (fit the same way).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence

from nimblelm.bench.data_tasks import DataTask, grade
from nimblelm.bench.runner import one_line

UNCOMPRESSED = "uncompressed"
#: What the survey says of the data level (its Sections 4.1.1, 4.2 and 4.3); it runs no experiment on it.
SURVEY_CLAIMS = (
    "the survey runs no experiment on the data level: it has no table to set beside ours",
    ("Selective Context, LLMLingua (coarse-to-fine, budget controller, iterative token-level compression) and "
     "LongLLMLingua (question-conditioned perplexity, reordering) are its prompt pruning methods (Section 4.1.1)"),
    "its finding: input compression mainly improves prefilling, output organization decoding (Section 4.3)",
    ("Skeleton-of-Thought: \"up to 2.39x speed-up on 12 recently released LLMs\" (Section 4.2, quoting the SoT "
     "paper: GPU, 7B-70B models and API models)"),
)


def _chat_ids(tokenizer, text: str) -> list[int]:
    from nimblelm.bench.datasets import chat_text

    return tokenizer.encode(chat_text(tokenizer, [{"role": "user", "content": text}]), add_special_tokens=False)


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of ys on xs; None with fewer than two distinct xs."""
    if len(set(xs)) < 2:
        return None
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def break_even(records: Sequence[dict], baseline: dict[tuple, dict]) -> dict:
    """Where a method's saved answer seconds reach its compressor's seconds, both fit linear in the
    uncompressed prompt's tokens n: `tokens` (None: pays at no length measured by the fits), and `pays`:
    "above" (the saving grows faster than the compressor's cost), "below", "always" or "never"."""
    n = [baseline[(r["workload"], r["item"])]["prompt_tokens"] for r in records]
    saved = [baseline[(r["workload"], r["item"])]["e2e_s"] - r["e2e_s"] for r in records]
    cost = [r["compress_s"] for r in records]
    fs, fc = _fit(n, saved), _fit(n, cost)
    if fs is None or fc is None:
        return {"tokens": None, "pays": None}
    (s0, s1), (c0, c1) = fs, fc
    if math.isclose(s1, c1):
        return {"tokens": None, "pays": "always" if s0 > c0 else "never"}
    at = (c0 - s0) / (s1 - c1)
    if s1 > c1:
        return {"tokens": max(0, round(at)), "pays": "above" if at > 0 else "always"}
    return {"tokens": round(at), "pays": "below" if at > 0 else "never"}


class _Runs:
    """Compressors and the answering model, measured one call at a time."""

    def __init__(self, answerer, scorer, lingua, methods: Sequence[str], lingua_methods: Sequence[str],
                 reorder: str | None):
        self.answerer, self.scorer, self.lingua, self.reorder = answerer, scorer, lingua, reorder
        self.compressors = [("nimblelm", m) for m in methods] + [("llmlingua", m) for m in lingua_methods]

    def context_tokens(self, text: str) -> int:
        return len(self.scorer.tokenize(text)[0])

    def compress(self, backend: str, method: str, task: DataTask, budget: int) -> tuple[str, float]:
        if backend == "llmlingua":
            paragraphs = [p for p in re.split(r"\n\s*\n", task.context) if p.strip()]
            return self.lingua.compress(method, paragraphs, task.rank_question, budget)
        from nimblelm.prompting.compression import PromptCompression, compress

        self.scorer.llm.reset_prefix_cache()
        config = PromptCompression(method=method, rate=None, target_tokens=budget,
                                   question=task.rank_question if method == "longllmlingua" else None,
                                   reorder=None if method == "selective_context" else self.reorder)
        out = compress(task.context, config, self.scorer)
        return out.text, out.seconds

    def answer(self, task: DataTask, context: str | None) -> dict:
        import time

        from nimblelm import SamplingParams

        ids = _chat_ids(self.answerer.tokenizer, task.prompt(context))
        self.answerer.reset_prefix_cache()  # no prompt finds another's tokens (the instruction) cached
        start = time.perf_counter()
        out = self.answerer.generate([ids], SamplingParams(temperature=0.0, max_tokens=task.max_tokens),
                                     use_tqdm=False)[0]
        e2e = time.perf_counter() - start
        m = out.metrics
        return {"prompt_tokens": len(ids), "e2e_s": e2e, "ttft_s": m.first_token_time - m.arrival_time,
                "answer": out.outputs[0].text, "output_tokens": len(out.outputs[0].token_ids)}


def _rotated(items: list, i: int) -> list:
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def run_survey_data(answerer, scorer, lingua, tasks: Sequence[DataTask], *, methods: Sequence[str],
                    lingua_methods: Sequence[str], ratios: Sequence[float], reorder: str | None = None,
                    logger: Callable[[str], None] = lambda m: None, progress: bool = False) -> dict:
    """Every task compressed by every method at every ratio, then answered; see the module docstring."""
    from tqdm import tqdm

    runs = _Runs(answerer, scorer, lingua, methods, lingua_methods, reorder)
    baseline: dict[tuple, dict] = {}
    records: list[dict] = []
    errors: dict[str, str] = {}
    index = {w: 0 for w in dict.fromkeys(t.workload for t in tasks)}
    for i, task in enumerate(tqdm(tasks, desc="tasks", disable=not progress)):
        item = index[task.workload]
        index[task.workload] += 1
        original = runs.context_tokens(task.context)
        compressed = {}
        for backend, method in _rotated(runs.compressors, i):
            for ratio in _rotated(list(ratios), i):
                budget = max(1, math.ceil(original / ratio))
                try:
                    compressed[(backend, method, ratio)] = runs.compress(backend, method, task, budget)
                except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' rows
                    errors.setdefault(f"{backend} {method}", one_line(e))
                    logger(f"{backend} {method} at {ratio:g}x failed on {task.workload} {item}: {one_line(e)}")
        answers = {}
        for key in _rotated([None, *compressed], i):
            answers[key] = runs.answer(task, None if key is None else compressed[key][0])
        base = answers[None]
        base_text = base["answer"]
        baseline[(task.workload, item)] = {"workload": task.workload, "item": item, "backend": "-",
                                           "method": UNCOMPRESSED, "ratio": 1.0, "context_tokens": original,
                                           "compressed_tokens": original, "compress_s": 0.0,
                                           "score": grade(task, base_text, base_text), **base}
        for (backend, method, ratio), (text, seconds) in compressed.items():
            a = answers[(backend, method, ratio)]
            records.append({"workload": task.workload, "item": item, "backend": backend, "method": method,
                            "ratio": ratio, "context_tokens": original,
                            "compressed_tokens": runs.context_tokens(text), "compress_s": seconds,
                            "score": grade(task, a["answer"], base_text), **a})
        logger(f"{task.workload} {item}: {original} context tokens, uncompressed score {baseline[(task.workload, item)]['score']:.2f}")
    return {"results": summarize(records, baseline), "records": list(baseline.values()) + records,
            "break_even": _break_evens(records, baseline), "errors": errors}


def _mean(rows: Sequence[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows) if rows else math.nan


def summarize(records: Sequence[dict], baseline: dict[tuple, dict]) -> list[dict]:
    """One row per workload, backend, method and ratio (the uncompressed prompts first per workload)."""
    rows = []
    for workload in dict.fromkeys(b["workload"] for b in baseline.values()):
        base = [b for b in baseline.values() if b["workload"] == workload]
        accuracy = _mean(base, "score")
        rows.append({"workload": workload, "backend": "-", "method": UNCOMPRESSED, "ratio": 1.0,
                     "achieved_ratio": 1.0, "accuracy": accuracy, "relative_accuracy": 1.0, "compress_s": 0.0,
                     "ttft_s": _mean(base, "ttft_s"), "e2e_s": _mean(base, "e2e_s"), "total_s": _mean(base, "e2e_s"),
                     "prompt_tokens": _mean(base, "prompt_tokens"), "speedup": 1.0, "ttft_speedup": 1.0,
                     "tasks": len(base)})
        groups: dict[tuple, list[dict]] = {}
        for r in records:
            if r["workload"] == workload:
                groups.setdefault((r["backend"], r["method"], r["ratio"]), []).append(r)
        for (backend, method, ratio), rs in groups.items():
            mine = [baseline[(workload, r["item"])] for r in rs]
            total = _mean(rs, "compress_s") + _mean(rs, "e2e_s")
            rows.append({
                "workload": workload, "backend": backend, "method": method, "ratio": ratio,
                "achieved_ratio": sum(r["context_tokens"] for r in rs) / max(1, sum(r["compressed_tokens"] for r in rs)),
                "accuracy": _mean(rs, "score"),
                "relative_accuracy": _mean(rs, "score") / _mean(mine, "score") if _mean(mine, "score") else math.nan,
                "compress_s": _mean(rs, "compress_s"), "ttft_s": _mean(rs, "ttft_s"), "e2e_s": _mean(rs, "e2e_s"),
                "total_s": total, "prompt_tokens": _mean(rs, "prompt_tokens"),
                "speedup": _mean(mine, "e2e_s") / total,
                "ttft_speedup": _mean(mine, "ttft_s") / (_mean(rs, "compress_s") + _mean(rs, "ttft_s")),
                "tasks": len(rs)})
    return rows


def _break_evens(records: Sequence[dict], baseline: dict[tuple, dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["backend"], r["method"], r["ratio"]), []).append(r)
    return [{"backend": b, "method": m, "ratio": ratio, **break_even(rs, baseline)}
            for (b, m, ratio), rs in groups.items()]


def _targets(report: dict) -> list[str]:
    rows = report["results"]
    out = []
    if report.get("sot"):
        from nimblelm.bench.survey_sot import sot_targets

        out += sot_targets(report)
    qa2 = [r for r in rows if r["workload"] == "qa" and r["ratio"] == 2 and r["backend"] == "nimblelm"]
    if qa2:
        best = max(qa2, key=lambda r: r["relative_accuracy"] if _finite(r["relative_accuracy"]) else -1)
        out.append(f"QA at 2×, at least 90% of the uncompressed accuracy: best nimblelm method {best['method']} "
                   f"keeps {_pct(best['relative_accuracy'])} ({'met' if best['relative_accuracy'] >= 0.9 else 'missed'})"
                   f" with {report['config']['model']} answering")
    pays = [b for b in report["break_even"] if b["backend"] == "nimblelm"]
    for b in pays:
        if b["ratio"] == 2:
            out.append(f"end-to-end faster than uncompressed, {b['method']} at 2×: {_pays(b)}")
    for method in ("llmlingua", "longllmlingua"):
        ours = [r for r in rows if r["backend"] == "nimblelm" and r["method"] == method]
        for r in ours:
            theirs = [t for t in rows if t["backend"] == "llmlingua" and t["method"] == method
                      and t["workload"] == r["workload"] and t["ratio"] == r["ratio"]]
            if not theirs:
                continue
            t = theirs[0]
            faster = t["compress_s"] / r["compress_s"] if r["compress_s"] else math.nan
            out.append(f"{method}, {r['workload']} at {r['ratio']:g}×: compressor {faster:.2f}× llmlingua's speed "
                       f"(target 2×: {'met' if faster >= 2 else 'missed'}), accuracy {_pct(r['accuracy'])} against "
                       f"{_pct(t['accuracy'])} ({'no worse' if r['accuracy'] >= t['accuracy'] else 'worse'})")
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if _finite(x) else "-"


def _pays(b: dict) -> str:
    if b["pays"] is None:
        return "not fit (one prompt length)"
    if b["pays"] in ("always", "never"):
        return f"{b['pays']} (over the lengths fit)"
    return f"{b['pays']} {b['tokens']} prompt tokens"


def survey_data_markdown(report: dict) -> str:
    from nimblelm.bench.report import machine_lines

    cfg = report["config"]
    out = ["# bench survey data: the data level (prompt compression, Skeleton-of-Thought) on this machine", "",
           *machine_lines(report),
           (f"- answering model {cfg['model']} ({cfg.get('quantization') or cfg['dtype']}), greedy; "
            f"{cfg['num_prompts']} tasks per workload; {cfg['threads']} threads")]
    if report["results"]:
        out += _compression_markdown(report)
    if report.get("sot"):
        from nimblelm.bench.survey_sot import sot_markdown

        out += sot_markdown(report)
    out += ["", "## Targets", "", *(f"- {t}" for t in _targets(report)), "",
            "## The survey on the data level", "", *(f"- {c}" for c in SURVEY_CLAIMS)]
    return "\n".join(out) + "\n"


def _compression_markdown(report: dict) -> list[str]:
    cfg = report["config"]
    precision = f": {cfg['scorer_precision']}" if cfg.get("scorer_precision") else ""
    out = [(f"- prompt compression: scorer {cfg['scorer']} (nimblelm's engine{precision}; llmlingua "
            f"{cfg.get('llmlingua_version') or '-'} on transformers, the same weights in float32); qa and needle "
            f"contexts of {', '.join(map(str, cfg['context_tokens']))} answerer tokens in turn; the answerer's "
            "prefix cache emptied before each prompt; nimblelm's paragraphs in "
            + {None: "each method's own order (longllmlingua sorted by rank, llmlingua the prompt's)",
               "sort": "rank order", "original": "the prompt's order"}[cfg.get("reorder")]
            + " (llmlingua's LongLLMLingua: sort)")]
    for name, reason in (report.get("errors") or {}).items():
        out.append(f"- {name}: failed ({reason})")
    for name, reason in (report.get("skipped") or {}).items():
        out.append(f"- {name}: skipped ({reason})")
    out += ["", "## Prompt compression", "", ("Accuracy: share of right answers (qa, needle), or word F1 against the uncompressed prompt's "
                 "answer (sharegpt). Kept: accuracy over the uncompressed prompts' on the same tasks. Ratio: the "
                 "context's scorer tokens before / after. Compress: the compressor's seconds. TTFT and answer: "
                 "the answering model's time to first token and end-to-end seconds on the compressed prompt. "
                 "Speedup: uncompressed answer seconds / (compress + answer)."), "",
            "| workload | backend | method | target | ratio | accuracy | kept | compress s | TTFT s | answer s | speedup |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        target = "-" if r["method"] == UNCOMPRESSED else f"{r['ratio']:g}×"
        out.append(f"| {r['workload']} | {r['backend']} | {r['method']} | {target} | {r['achieved_ratio']:.2f}× | "
                   f"{_pct(r['accuracy'])} | {_pct(r['relative_accuracy'])} | {r['compress_s']:.2f} | "
                   f"{r['ttft_s']:.2f} | {r['e2e_s']:.2f} | {r['speedup']:.2f}× |")
    if report["break_even"]:
        out += ["", "## Break-even prompt length", "",
                ("Where the answer seconds a method saves reach its compressor's seconds, both fit linear in the "
                 "uncompressed prompt's tokens over every task."), "",
                "| backend | method | target | compression pays |", "| --- | --- | ---: | --- |"]
        out += [f"| {b['backend']} | {b['method']} | {b['ratio']:g}× | {_pays(b)} |" for b in report["break_even"]]
    return out
