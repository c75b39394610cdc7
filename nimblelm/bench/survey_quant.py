"""`nimblelm bench survey quantization`: the shape of the survey's Table 4 on this machine.

For every batch size × input length, `batch` random prompts of `input_len` tokens each generate exactly
`output_len` tokens in one `LLM.generate` call, once unquantized and once per quantization method.
Prefill = arrival to the last first token, decode = from there to the last finish, end to end = both;
speedup = unquantized time / quantized time, per phase and cell. The report compares what was measured
with the four observations the survey draws from its Table 4 (W4A16 on an A100), in sentences built
from the numbers, never asserted.

A full grid on a 1.5B model takes hours on a small CPU, so a run can be continued: `earlier` (a previous
report of the same settings, see `earlier_report`) keeps the cells it holds, and `checkpoint` receives the
report so far after every cell. Each row names the run that measured it (`run`, an index into `runs`).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nimblelm.bench.backends import BenchContext, NimbleLMBackend, mean_std
from nimblelm.bench.machine import CpuMonitor, activity_text, disturbed
from nimblelm.bench.runner import log
from nimblelm.errors import InvalidRequestError

PHASES = ("prefill", "decode", "e2e")
PHASE_NAMES = {"prefill": "prefill", "decode": "decode", "e2e": "end-to-end"}
#: what each method is called in the survey's terms
METHOD_LABELS = {"int4": "W4A16", "int8": "W8A16", "w8a8": "W8A8"}


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _measure(ctx: BenchContext, method: str, cells: Sequence[tuple[int, int]], output_len: int, repeat: int,
             warmup: int, progress: bool, logger: Callable[[str], None], on_row: Callable[[dict], None]) -> dict:
    """Every cell on one method, each row handed to on_row as it is measured; returns the method's status.
    A quantized method the engine cannot load is skipped with its one-line reason; the unquantized
    baseline failing is an error."""
    ctx.quantization = None if method == "none" else method
    backend = NimbleLMBackend(ctx)
    try:
        backend.load()
    except Exception as e:  # e.g. a method the engine does not have yet: skip that method, not the run
        if method == "none":
            raise
        reason = f"LLM(quantization={method!r}) failed: {_one_line(e)}"
        logger(f"skipping {method}: {reason}")
        return {"status": "skipped", "reason": reason}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells) * repeat, desc=f"{ctx.model} {method}", unit="run", leave=False)
    try:
        for i in range(warmup):  # lazy initialisation out of the timed runs, on the shortest prompt
            backend.phase_times(1, min(n for _, n in cells), 2, seed=10_000 + i)
        monitor = CpuMonitor()
        for batch, input_len in cells:
            runs = []
            for i in range(repeat):
                runs.append(backend.phase_times(batch, input_len, output_len, seed=ctx.seed * 1_000_003 + i))
                if bar is not None:
                    bar.update()
            row = {"model": ctx.model, "method": method, "batch": batch, "input_len": input_len,
                   "output_len": output_len}
            for k, phase in enumerate(PHASES):
                times = [r[k] for r in runs]
                row[f"{phase}_s"] = [round(t, 5) for t in times]
                row[f"mean_{phase}_s"], row[f"std_{phase}_s"] = mean_std(times)
            on_row(row)
            line = (f"{ctx.model} {method}: batch {batch}, input {input_len}: prefill {row['mean_prefill_s']:.3f} s, "
                    f"decode {row['mean_decode_s']:.3f} s")
            if bar is not None and logger is log:
                bar.write(line, file=sys.stderr)  # keeps the progress bar intact
            else:
                logger(line)
        activity = monitor.stop()
        if disturbed(activity, ctx.threads):
            logger(f"warning: {activity_text(activity)} while {ctx.model} {method} ran: its figures may be disturbed")
        status = {"status": "ok", "weights_nbytes": backend.weights_nbytes(), "other_activity": activity}
    finally:
        if bar is not None:
            bar.close()
        backend.close()
    return status


def run_survey_quantization(models: Sequence[str], methods: Sequence[str], *, batch_sizes: Sequence[int],
                            input_lens: Sequence[int], output_len: int, threads: int, dtype: str, seed: int,
                            kv_cache_dtype: str = "auto", repeat: int = 1, warmup: int = 1, progress: bool = True,
                            logger: Callable[[str], None] = log, earlier: dict | None = None,
                            run_info: dict | None = None, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Measure every cell of models × ("none", *methods) × batch_sizes × input_lens that `earlier` lacks.

    Returns {"results", "speedups", "methods", "runs"}: earlier's rows, statuses and runs with this run's
    added; run_info (command, date, commit) describes this run."""
    cells = [(b, n) for b in batch_sizes for n in input_lens]
    rows = list((earlier or {}).get("results", []))
    statuses = {m: dict(per) for m, per in ((earlier or {}).get("methods") or {}).items()}
    runs = list((earlier or {}).get("runs", []))
    run_index = len(runs)
    have = {(r["model"], r["method"], r["batch"], r["input_len"]) for r in rows}

    def output() -> dict:
        measured = any(r.get("run") == run_index for r in rows)  # a run that measured nothing is not listed
        return {"results": rows, "speedups": speedups(rows), "methods": statuses,
                "runs": runs + [dict(run_info or {})] if measured else runs, "backends": {}}

    def on_row(row: dict) -> None:
        rows.append({**row, "run": run_index})
        if checkpoint is not None:
            checkpoint(output())

    for model in models:
        todo = {method: [c for c in cells if (model, method, *c) not in have] for method in ("none", *methods)}
        if not any(todo.values()):
            logger(f"{model}: every cell is already measured")
            continue
        ctx = BenchContext(model=model, dtype=dtype, threads=threads, max_model_len=max(input_lens) + output_len + 1,
                           max_num_seqs=max(batch_sizes), seed=seed, kv_cache_dtype=kv_cache_dtype)
        limit = ctx.config.max_position_embeddings  # loads the model once; every method reuses it
        if limit and ctx.max_model_len > limit:
            raise InvalidRequestError(f"{model}: input {max(input_lens)} + output {output_len} tokens exceed the "
                                      f"model's context length {limit}")
        for method, method_cells in todo.items():
            if method_cells:
                statuses.setdefault(model, {})[method] = _measure(ctx, method, method_cells, output_len, repeat,
                                                                  warmup, progress, logger, on_row)
    return output()


#: settings every cell of one report shares: a run may continue an earlier one only where they agree
SHARED_CONFIG = ("dtype", "kv_cache_dtype", "output_len", "repeat", "warmup", "seed", "threads")
SHARED_MACHINE = ("cpu_model", "physical_cores")


def earlier_report(path: Path, config: dict, machine: dict) -> dict | None:
    """The survey quantization report in path/results.json for a run to continue, or None where there is
    none yet. Raises InvalidRequestError where it is another kind of report, or its settings or machine
    differ from config / machine: its cells would not be comparable with new ones."""
    f = Path(path) / "results.json"
    if not f.exists():
        return None
    try:
        report = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"--resume: cannot read {f}: {e}") from e
    if not isinstance(report, dict) or report.get("kind") != "survey-quantization":
        raise InvalidRequestError(f"--resume: {f} is not a survey quantization report")
    for keys, old, new in ((SHARED_CONFIG, report.get("config") or {}, config),
                           (SHARED_MACHINE, report.get("machine") or {}, machine)):
        for k in keys:
            if old.get(k) != new.get(k):
                raise InvalidRequestError(f"--resume: {f} was measured with {k} {old.get(k)!r}, this run has "
                                          f"{new.get(k)!r}; use the same settings, or another --output")
    if not report.get("runs"):  # written before runs were recorded: one run, the report's own
        m = report.get("machine") or {}
        report["runs"] = [{"command": report.get("command"), "date": m.get("date"),
                           "commit": m.get("nimblelm_commit")}]
        for r in report.get("results", []):
            r.setdefault("run", 0)
    return report


def speedups(rows: Sequence[dict]) -> list[dict]:
    """Per quantized row: unquantized mean time / its mean time, for each phase, in the same model and cell."""
    base = {(r["model"], r["batch"], r["input_len"]): r for r in rows if r["method"] == "none"}
    out = []
    for r in rows:
        b = base.get((r["model"], r["batch"], r["input_len"]))
        if r["method"] == "none" or b is None:
            continue
        out.append({"model": r["model"], "method": r["method"], "batch": r["batch"], "input_len": r["input_len"],
                    **{p: b[f"mean_{p}_s"] / r[f"mean_{p}_s"] for p in PHASES}})
    return out


def _grid(sp: Sequence[dict], model: str, method: str) -> dict[tuple[int, int], dict]:
    return {(s["batch"], s["input_len"]): s for s in sp if s["model"] == model and s["method"] == method}


def _x(v: float) -> str:
    return f"{v:.2f}×"


def observations(sp: Sequence[dict], weights: dict[str, int | None]) -> list[str]:
    """The survey's four observations on its Table 4, each beside what this run measured (one line each).

    weights: the unquantized model's weight bytes per model (observation 4 orders the models by them).
    """
    lines = []
    models = list(dict.fromkeys(s["model"] for s in sp))
    methods = list(dict.fromkeys(s["method"] for s in sp))
    if not sp:
        return ["- no quantized method was measured: nothing to compare"]

    def label(model, method):
        return f"{METHOD_LABELS.get(method, method)} on {model}" if len(models) > 1 else METHOD_LABELS.get(method, method)

    pairs = [(mo, me) for mo in models for me in methods if _grid(sp, mo, me)]
    # 1. decoding substantially faster, improving end-to-end latency
    parts = []
    for mo, me in pairs:
        g = list(_grid(sp, mo, me).values())
        dec, e2e = [s["decode"] for s in g], [s["e2e"] for s in g]
        parts.append(f"{label(mo, me)}: decode {_x(min(dec))}–{_x(max(dec))} (median {_x(statistics.median(dec))}), "
                     f"end to end {_x(min(e2e))}–{_x(max(e2e))}")
    lines.append("1. *Weight-only quantization substantially accelerates decoding, improving end-to-end latency.* "
                 "Measured speedups: " + "; ".join(parts) + ".")
    # 2. prefill may get slower
    parts = []
    for mo, me in pairs:
        pre = [s["prefill"] for s in _grid(sp, mo, me).values()]
        slower = sum(1 for v in pre if v < 1)
        parts.append(f"{label(mo, me)}: prefill {_x(min(pre))}–{_x(max(pre))}, slower than unquantized in "
                     f"{slower} of {len(pre)} cells")
    lines.append("2. *In prefilling, weight-only quantization may increase latency.* Measured: "
                 + "; ".join(parts) + ".")
    # 3. the speedup shrinks as batch size and input length grow
    parts = []
    for mo, me in pairs:
        g = _grid(sp, mo, me)
        bs, ns = sorted({b for b, _ in g}), sorted({n for _, n in g})
        bits = []
        if len(bs) > 1:
            bits.append(f"decode speedup at batch {bs[0]} / batch {bs[-1]} (input {ns[0]}): "
                        f"{_x(g[(bs[0], ns[0])]['decode'])} / {_x(g[(bs[-1], ns[0])]['decode'])}")
        if len(ns) > 1:
            bits.append(f"at input {ns[0]} / input {ns[-1]} (batch {bs[0]}): "
                        f"{_x(g[(bs[0], ns[0])]['decode'])} / {_x(g[(bs[0], ns[-1])]['decode'])}")
        parts.append(f"{label(mo, me)}: " + (", ".join(bits) or "one batch size and one input length measured"))
    lines.append("3. *As batch size and input length grow, the speedup shrinks.* Measured: " + "; ".join(parts) + ".")
    # 4. larger models benefit more
    sized = sorted((m for m in models if weights.get(m)), key=lambda m: weights[m])
    if len(sized) < 2:
        lines.append("4. *Larger models benefit more.* One model measured: run with two (`--models a,b`) to compare.")
    else:
        parts = []
        for me in methods:
            meds = [(m, statistics.median(s["decode"] for s in _grid(sp, m, me).values()))
                    for m in sized if _grid(sp, m, me)]
            parts.append(f"{METHOD_LABELS.get(me, me)} median decode speedup, smallest model first: "
                         + ", ".join(f"{m} ({weights[m] / 2**20:.0f} MiB) {_x(v)}" for m, v in meds))
        lines.append("4. *Larger models benefit more.* Measured: " + "; ".join(parts) + ".")
    return lines


def survey_quant_markdown(report: dict) -> str:
    from nimblelm.bench.report import _mib, machine_lines

    cfg = report["config"]
    out = ["## nimblelm bench survey quantization", ""] + machine_lines(report)
    runs = report.get("runs") or []
    if len(runs) > 1:
        counts = [sum(1 for r in report.get("results", []) if r.get("run") == i) for i in range(len(runs))]
        out += [f"- cells from {len(runs)} runs (`results.json`: each row's `run`):"]
        out += [f"  - run {i}: {run.get('date')}, commit {run.get('commit')}, {n} rows: `{run.get('command')}`"
                for i, (run, n) in enumerate(zip(runs, counts))]
    weights = {}
    for model, per in (report.get("methods") or {}).items():
        for method, st in per.items():
            if st.get("status") == "ok":
                activity = activity_text(st.get("other_activity") or {})
                out.append(f"- {model}, {method}: {_mib(st.get('weights_nbytes'))} of weights"
                           + (f"; {activity}" if activity else ""))
            else:
                out.append(f"- {model}, {method}: {st.get('status')}: {st.get('reason')}")
        weights[model] = (per.get("none") or {}).get("weights_nbytes")
    out += ["", (f"Output length {cfg.get('output_len')} tokens (the survey does not state its own), "
                 f"{cfg.get('repeat')} timed run(s) per cell after {cfg.get('warmup')} warm-up per method. "
                 "Each cell: prefill / decode / end-to-end speedup = unquantized time ÷ quantized time "
                 "(> 1: faster). Prefill = arrival to the last first token; decode = from there to the last "
                 "token; end to end = both.")]
    sp = report.get("speedups") or []
    for model in dict.fromkeys(s["model"] for s in sp):
        for method in dict.fromkeys(s["method"] for s in sp if s["model"] == model):
            g = _grid(sp, model, method)
            ns = sorted({n for _, n in g})
            out += ["", f"### {model}: {METHOD_LABELS.get(method, method)} ({method}) over unquantized", "",
                    "| B \\ input | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---|" * len(ns)]
            for b in sorted({b for b, _ in g}):
                cells = [g.get((b, n)) for n in ns]
                out.append(f"| {b} | " + " | ".join(
                    "/".join(f"{c[p]:.2f}" for p in PHASES) if c else "–" for c in cells) + " |")
    out += ["", "### The survey's observations on its Table 4, beside this machine", "",
            ("The survey measured AWQ W4A16 against FP16 on one A100 (TensorRT-LLM, LMDeploy, LLaMA-2-7B/13B); "
             f"these figures are nimblelm's methods against its {cfg.get('dtype')} model on this CPU. Its "
             "observations in italics, then what this run measured:"), ""]
    out += observations(sp, weights)
    return "\n".join(out) + "\n"
