"""Markdown and JSON reports of benchmark results, with the machine that produced them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nimblelm.bench import prefix_cache


def fmt_mean_std(mean: float, std: float | None = None, digits: int = 2) -> str:
    """'31.42 ± 0.35' (llama-bench style); 'n/a' for a missing value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "unknown"


def _mib(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def machine_lines(meta: dict) -> list[str]:
    m = meta["machine"]
    cfg = meta["config"]
    lines = [
        f"- command: `{meta.get('command', '')}`",
        (f"- model: `{cfg.get('model')}`, dtype {cfg.get('dtype')}"
         + (f", quantization {cfg['quantization']}" if cfg.get("quantization") else "")
         + (f", KV cache {cfg['kv_cache_dtype']}" if cfg.get("kv_cache_dtype") else "")),
        (f"- machine: {m.get('cpu_model')}"
         + (f" ({' '.join(m['cpu_features'])})" if m.get("cpu_features") else "")
         + f", {m.get('physical_cores')} physical cores "
         f"({m.get('logical_cpus')} logical), {m.get('threads')} thread{'' if m.get('threads') == 1 else 's'} used, "
         f"{_gib(m.get('memory_total_bytes'))} RAM; {m.get('os')}"),
        *([f"- kernels: {m['kernels']}"] if m.get("kernels") else []),
        (f"- software: python {m.get('python')}, torch {m.get('torch')}, "
         f"transformers {m.get('transformers') or '-'}; nimblelm commit {m.get('nimblelm_commit')}"),
        *([(f"- measured: memory bandwidth {m['memory_bandwidth_gbs']:.1f} GB/s (read, "
            f"{_mib(m.get('bandwidth_working_set_bytes'))} working set), matmul peak "
            + ", ".join(f"{dt} {g:.0f}" for dt, g in (m.get("matmul_peak_gflops") or {}).items())
            + " GFLOP/s (`nimblelm bench roofline` for the full measurement)")] if m.get("memory_bandwidth_gbs") else []),
        *([(f"- threads: chosen at the start: other processes kept {m['threads_choice']['busy_cpus_at_start']:.1f} "
            f"CPUs busy, so {m.get('threads')} of {m['threads_choice']['physical_cores']} cores were used")]
          if m.get("threads_choice") else []),
        (f"- date: {m.get('date')}; load average (1/5/15 min) at start: {m.get('load_average_at_start')}"
         + (f", at end: {m['load_average_at_end']}" if m.get("load_average_at_end") else "")),
    ]
    return lines


def backend_lines(statuses: dict) -> list[str]:
    lines = []
    for name, st in statuses.items():
        if st.get("status") == "ok":
            info = st.get("info") or {}
            bits = [info.get("weights") or ""]
            if info.get("gguf_tensor_types"):
                bits.append("tensor types " + ", ".join(info["gguf_tensor_types"]))
            if info.get("kv_cache_type"):
                bits.append(f"KV cache {info['kv_cache_type']}")
            if info.get("weights_nbytes"):
                bits.append(f"{_mib(info['weights_nbytes'])} of weights")
                if info.get("token_nbytes") and info["token_nbytes"] != info["weights_nbytes"]:
                    bits.append(f"{_mib(info['token_nbytes'])} read per decoded token (the token table aside)")
            if info.get("version"):
                bits.append(f"version {info['version']}")
            if info.get("build_commit") and info["build_commit"] != "unknown":
                bits.append(f"build {info['build_commit']}")
            mode = info.get("prefix_caching")  # True, False, or how the peer caches, in words
            if mode is not None:
                bits.append(mode if isinstance(mode, str) else f"prefix caching {'on' if mode else 'off'}")
            pc = st.get("prefix_cache") or {}
            if pc.get("queries") is not None:
                bits.append(f"prefix cache over the whole run, warm-up included: {pc['hits']} of {pc['queries']} "
                            f"prompt tokens found cached ({prefix_cache.cell(pc)})")
            act = st.get("other_activity") or {}
            if act.get("other_share") is not None:
                span = " (load included)" if act.get("includes_load") else ""
                bits.append(f"other processes during its run{span}: {act['other_cpu_s']:.1f} CPU-s "
                            f"({100 * act['other_share']:.1f}% of the machine), steal {act.get('steal_s', 0):.1f} s")
            lines.append(f"- {name}: " + "; ".join(b for b in bits if b))
        else:
            lines.append(f"- {name}: {st.get('status')}: {st.get('reason')}")
    return lines


def latency_markdown(report: dict) -> str:
    out = ["## nimblelm bench latency", ""]
    out += machine_lines(report) + backend_lines(report["backends"]) + [""]
    out.append("| backend | test | batch | threads | t/s | GB/s | % of bandwidth limit | GFLOP/s (% of matmul peak) |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in report["results"]:
        gbps = fmt_mean_std(r["mean_gbps"], r["std_gbps"]) if "mean_gbps" in r else ""
        one = len(r.get("samples_ts", [])) == 1
        if one and "mean_gbps" in r:
            gbps = fmt_mean_std(r["mean_gbps"])
        out.append(f"| {r['backend']} | {r['test']} | {r['batch']} | {r['threads']} | "
                   f"{fmt_mean_std(r['mean_ts'], None if one else r['std_ts'])} | {gbps} | "
                   + (f"{r['pct_of_bw_limit']:.0f}% of {r['bw_limit_ts']:.1f} |" if "pct_of_bw_limit" in r else " |")
                   + (f" {r['gflops']:.1f} ({r['pct_of_peak']:.0f}% of {r['peak_gflops']:.0f}) |" if "gflops" in r else " |"))
    reps = report["config"].get("repeat")
    note = (f"t/s: mean ± std over {reps} repetitions (after {report['config'].get('warmup')} warm-up). "
            "pp: batch × prompt tokens / time to the first token. tg: batch × decoded tokens / decode time "
            "(nimblelm and transformers: the n−1 tokens after the first, timed from the first token to the last; "
            "llama.cpp: as llama-bench and llama-batched-bench count them). "
            "pg: generated tokens / end-to-end time of a prompt then its generation (the survey's batch-1 "
            "inference figure). GB/s (tg, batch 1): bytes of weights read per token × t/s; its limit is the "
            "machine's measured read bandwidth / those bytes. GFLOP/s (pp): 2 × weights per token × t/s "
            "(attention left out), against the measured torch.matmul peak of the run's dtype (float32 for "
            "float32 and quantized weights).")
    out += ["", note]
    return "\n".join(out) + "\n"


def _gflops_cell(r: dict) -> str:
    if "mean_gflops" not in r:
        return " |"
    pct = f" ({r['pct_of_peak']:.0f}%)" if "pct_of_peak" in r else ""
    return f"{r['mean_gflops']:.1f}{pct} |"


def throughput_markdown(report: dict) -> str:
    out = ["## nimblelm bench throughput", ""]
    out += machine_lines(report) + backend_lines(report["backends"])
    w = report.get("workload") or {}
    cfg = report["config"]
    if w:
        from nimblelm.bench.throughput import workload_line

        out.append(f"- workload: {workload_line(cfg, w)}")
    out += ["", ("| backend | requests | concurrency | threads | prefix cache hit | total tok/s | output tok/s | "
                 "req/s | time s | GFLOP/s (% of peak) |"),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        t = sum(r["elapsed_s"]) / len(r["elapsed_s"])
        if len(r["elapsed_s"]) == 1:  # one pass: no spread to show
            r = {**r, "std_total_tok_s": None, "std_output_tok_s": None, "std_req_s": None}
        out.append(f"| {r['backend']} | {r['num_requests']} | {r['concurrency']} | {r['threads']} | "
                   f"{prefix_cache.cell(r.get('prefix_cache'))} | "
                   f"{fmt_mean_std(r['mean_total_tok_s'], r['std_total_tok_s'], 1)} | "
                   f"{fmt_mean_std(r['mean_output_tok_s'], r['std_output_tok_s'], 1)} | "
                   f"{fmt_mean_std(r['mean_req_s'], r['std_req_s'], 3)} | {t:.2f} | "
                   + _gflops_cell(r))
    note = ("All requests submitted at once; each generates exactly its output length (EOS ignored). "
            "total tok/s = (prompt + output tokens) / wall time, counting only each request's own tokens "
            "(not padding, nor the extra tokens a static batch makes its shorter requests compute); "
            f"mean ± std over {cfg.get('repeat')} pass(es) after {cfg.get('warmup')} warm-up. "
            "GFLOP/s: 2 × weights per token × (prompt + output tokens) / wall time (attention left out), "
            "against the machine's measured matmul peak of the run's dtype (float32 for float32 and quantized "
            "weights). Conversations run in rounds: the t-th turn of "
            "every conversation once all (t-1)-th turns finished. "
            + prefix_cache.PASSES_NOTE + " " + prefix_cache.NOTE)
    out += ["", note]
    return "\n".join(out) + "\n"


def to_markdown(report: dict) -> str:
    kind = report.get("kind")
    if kind == "latency":
        return latency_markdown(report)
    if kind == "serve":
        from nimblelm.bench.serve import serve_markdown

        return serve_markdown(report)
    if kind == "scale":
        from nimblelm.bench.scale import scale_markdown

        return scale_markdown(report)
    if kind == "roofline":
        from nimblelm.bench.roofline import roofline_markdown

        return roofline_markdown(report)
    if kind == "survey-quantization":
        from nimblelm.bench.survey_quant import survey_quant_markdown

        return survey_quant_markdown(report)
    if kind == "quantization-quality":
        from nimblelm.eval.quant_table import quant_quality_markdown

        return quant_quality_markdown(report)
    if kind == "survey-speculative":
        from nimblelm.bench.survey_spec import survey_spec_markdown

        return survey_spec_markdown(report)
    if kind == "survey-data":
        from nimblelm.bench.survey_data import survey_data_markdown

        return survey_data_markdown(report)
    if kind == "survey-longctx":
        from nimblelm.bench.survey_longctx import survey_longctx_markdown

        return survey_longctx_markdown(report)
    if kind == "survey-engines":
        from nimblelm.bench.survey import survey_markdown

        return survey_markdown(report)
    return throughput_markdown(report)


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def to_json(report: dict) -> str:
    return json.dumps(_jsonable(report), indent=2)


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> tuple[Path, Path]:
    """Write results.json (raw figures, config, machine), report.md and PNG plots into out_dir."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    j, m = d / "results.json", d / "report.md"
    j.write_text(to_json(report) + "\n")  # first: a plot that fails must not lose the run's figures
    text = to_markdown(report)
    m.write_text(text)
    if plots:
        from nimblelm.bench.plots import write_plots

        pngs = write_plots(report, d)
        if pngs:
            report.setdefault("plots", [p.name for p in pngs])
            j.write_text(to_json(report) + "\n")
            m.write_text(text + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    return j, m
