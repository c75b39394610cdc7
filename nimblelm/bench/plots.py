"""PNG plots of benchmark reports (matplotlib, Agg backend): where a picture says more than the table.

- latency: tokens/s per test and backend, and a heatmap of nimblelm's speedup over each peer
- throughput: total and output tokens/s per backend
- serve: TTFT/TPOT (p50, p99) and achieved throughput against the offered request rate; E2E latency CDFs
- roofline: read bandwidth against working-set size
- survey engines: batch-1 tokens/s and serving req/s per backend
- survey quantization: a heatmap per phase (prefill, decode, end to end) of each method's speedup
- survey speculative: batch-1 speedup per backend, method and workload; speedup against batch size per method
- survey data: accuracy against the compression ratio reached, per workload; compressor plus answer seconds
  against the prompt's tokens at the smallest ratio, beside the uncompressed answer's
- survey longctx: per engine, a needle heatmap (depth × context) for each method and kept fraction; perplexity
  against the budget; prefill seconds, decode tokens/s and KV memory while decoding against the context
"""

from __future__ import annotations

import math
import sys
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not (math.isnan(x) or math.isinf(x))


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    """Write the plots that fit this report's kind; returns their paths ([] without matplotlib or data)."""
    try:
        plt = _plt()
    except ImportError:
        print("note: matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    out = Path(out_dir)
    kind = report.get("kind")
    fn = {"latency": _latency, "throughput": _throughput, "serve": _serve, "roofline": _roofline,
          "survey-engines": _survey, "survey-quantization": _survey_quant, "survey-speculative": _survey_spec,
          "survey-data": _survey_data, "survey-longctx": _survey_longctx}.get(kind)
    if fn is None or not (report.get("results") or report.get("roofline")):
        return []
    try:
        return fn(plt, report, out)
    finally:
        plt.close("all")


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if _finite(v) else 0 for v in vals], width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)


def _latency(plt, report: dict, out: Path) -> list[Path]:
    rows = report["results"]
    tests = list(dict.fromkeys(f"{r['test']} b{r['batch']}" for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    val = {(r["backend"], f"{r['test']} b{r['batch']}"): r["mean_ts"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tests)), 4))
    _bars(ax, tests, {b: [val.get((b, t), float("nan")) for t in tests] for b in backends}, "tokens/s")
    ax.set_title(f"bench latency: {report['config'].get('model')} ({report['config'].get('dtype')})")
    fig.tight_layout()
    paths = [out / "latency.png"]
    fig.savefig(paths[0], dpi=110)
    peers = [b for b in backends if b != "nimblelm"]
    if "nimblelm" in backends and peers:
        grid = [[val.get(("nimblelm", t), float("nan")) / val[(p, t)] if val.get((p, t)) else float("nan")
                 for t in tests] for p in peers]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tests)), 1.2 + 0.6 * len(peers)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=2, aspect="auto")
        ax.set_xticks(range(len(tests)))
        ax.set_xticklabels(tests, rotation=20)
        ax.set_yticks(range(len(peers)))
        ax.set_yticklabels([f"vs {p}" for p in peers])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}×" if _finite(v) else "–", ha="center", va="center", fontsize=9)
        fig.colorbar(im, ax=ax, label="nimblelm speedup")
        ax.set_title("nimblelm tokens/s ÷ peer tokens/s")
        fig.tight_layout()
        paths.append(out / "latency_speedup.png")
        fig.savefig(paths[-1], dpi=110)
    return paths


def _throughput(plt, report: dict, out: Path) -> list[Path]:
    rows = report["results"]
    names = [r["backend"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    _bars(ax, names, {"total tok/s": [r["mean_total_tok_s"] for r in rows],
                      "output tok/s": [r["mean_output_tok_s"] for r in rows]}, "tokens/s")
    w = report.get("workload") or {}
    ax.set_title(f"bench throughput: {w.get('num_requests', '?')} {report['config'].get('dataset')} requests")
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=110)
    return [p]


def _serve(plt, report: dict, out: Path) -> list[Path]:
    rows = report["results"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, b in enumerate(backends):
        color = f"C{k}"
        pts = [r for r in rows if r["backend"] == b]
        finite = [r for r in pts if _finite(r["rate"])]
        inf_pts = [r for r in pts if not _finite(r["rate"])]
        # 'inf' is drawn at the achieved request throughput of that run
        xs = [r["rate"] for r in finite] + [r["metrics"]["request_throughput"] for r in inf_pts]
        ordered = sorted(zip(xs, finite + inf_pts), key=lambda t: t[0])
        xs = [x for x, _ in ordered]
        ms = [r["metrics"] for _, r in ordered]
        for ax, key, label in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
            ax.plot(xs, [1e3 * m[key]["p50"] for m in ms], "o-", color=color, label=f"{b} p50")
            ax.plot(xs, [1e3 * m[key]["p99"] for m in ms], "x--", color=color, label=f"{b} p99")
            ax.set_ylabel(f"{label} (ms)")
        axes[2].plot(xs, [m["request_throughput"] for m in ms], "o-", color=color, label=b)
    slo = (report["config"].get("slo") or {})
    if slo.get("tpot_s"):
        axes[1].axhline(1e3 * slo["tpot_s"], color="gray", ls=":", label="TPOT bound")
    lim = [r["metrics"]["request_throughput"] for r in rows] + [r["rate"] for r in rows if _finite(r["rate"])]
    top = max(lim) * 1.1 if lim else 1
    axes[2].plot([0, top], [0, top], color="gray", ls=":", label="achieved = offered")
    for ax in axes:
        ax.set_xlabel("request rate (req/s; inf drawn at its achieved rate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_ylabel("achieved req/s")
    fig.suptitle("bench serve: latency and throughput against the request rate")
    fig.tight_layout()
    paths = [out / "serve_vs_rate.png"]
    fig.savefig(paths[0], dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        e2e = sorted(x["e2e_s"] for x in r.get("records", []) if x.get("e2e_s") is not None)
        if e2e:
            ax.step(e2e, [(i + 1) / len(e2e) for i in range(len(e2e))], where="post",
                    label=f"{r['backend']} @ {r['rate']:g} req/s")
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("bench serve: end-to-end latency CDF")
    fig.tight_layout()
    paths.append(out / "serve_e2e_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    return paths


def _roofline(plt, report: dict, out: Path) -> list[Path]:
    bw = report["roofline"]["bandwidth"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([b["working_set_mib"] for b in bw], [b["best_gbs"] for b in bw], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("working set (MiB)")
    ax.set_ylabel("read bandwidth (GB/s)")
    ax.grid(alpha=0.3)
    ax.set_title("bench roofline: memory bandwidth")
    fig.tight_layout()
    p = out / "roofline_bandwidth.png"
    fig.savefig(p, dpi=110)
    return [p]


def _survey(plt, report: dict, out: Path) -> list[Path]:
    rows = report["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for ax, key, label in ((axes[0], "inference_tok_s", "batch-1 tokens/s (1k in, 128 out)"),
                           (axes[1], "serving_req_s", "max ShareGPT req/s")):
        series = {}
        for b in backends:
            series[b] = [next((r.get(key) for r in rows if r["backend"] == b and r["model"] == m), None)
                         for m in models]
            series[b] = [v if _finite(v) else float("nan") for v in series[b]]
        _bars(ax, models, series, label)
        ax.set_title(label)
    fig.suptitle("bench survey engines (this machine)")
    fig.tight_layout()
    p = out / "survey_engines.png"
    fig.savefig(p, dpi=110)
    return [p]


def _survey_quant(plt, report: dict, out: Path) -> list[Path]:
    from nimblelm.bench.survey_quant import METHOD_LABELS, PHASE_NAMES, PHASES

    sp = report.get("speedups") or []
    pairs = list(dict.fromkeys((s["model"], s["method"]) for s in sp))
    if not pairs:
        return []
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter, NullFormatter

    paths = []
    for phase in PHASES:
        # a log scale symmetric about 1× (no change), so 0.5× and 2× are equally far from it
        top = max([2.0] + [max(s[phase], 1 / s[phase]) for s in sp if _finite(s[phase]) and s[phase] > 0])
        norm = LogNorm(vmin=1 / top, vmax=top)
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.8), squeeze=False)
        for ax, (model, method) in zip(axes[0], pairs):
            cells = {(s["batch"], s["input_len"]): s[phase] for s in sp if (s["model"], s["method"]) == (model, method)}
            bs, ns = sorted({b for b, _ in cells}), sorted({n for _, n in cells})
            grid = [[cells.get((b, n), float("nan")) for n in ns] for b in bs]
            im = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
            ax.set_xticks(range(len(ns)))
            ax.set_xticklabels(ns)
            ax.set_yticks(range(len(bs)))
            ax.set_yticklabels(bs)
            ax.set_xlabel("input length")
            ax.set_ylabel("batch size")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}" if _finite(v) else "–", ha="center", va="center", fontsize=8)
            ax.set_title(f"{model}: {METHOD_LABELS.get(method, method)}", fontsize=9)
        bar = fig.colorbar(im, ax=list(axes[0]), label="speedup over unquantized")
        bar.set_ticks(sorted({1 / top, 0.5, 1.0, 2.0, top}))
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}×"))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
        fig.suptitle(f"survey quantization: {PHASE_NAMES[phase]} speedup")
        paths.append(out / f"survey_quant_{phase}.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def _survey_spec(plt, report: dict, out: Path) -> list[Path]:
    rows = [r for r in report["results"] if r["method"] != "plain"]
    workloads = list(dict.fromkeys(r["workload"] for r in report["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    series = {}
    for r in rows:
        series.setdefault(f"{r['backend']}: {r['method']}", [float("nan")] * len(workloads))
        series[f"{r['backend']}: {r['method']}"][workloads.index(r["workload"])] = r["speedup"]
    _bars(axes[0], workloads, series, "speedup over plain decoding (batch 1)")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=7)
    load = [r for r in report["load"] if r["method"] != "plain"]
    for method in dict.fromkeys(r["method"] for r in load):
        pts = sorted((r["batch"], r["speedup"]) for r in load if r["method"] == method)
        axes[1].plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=method)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("requests at once (ShareGPT chat)")
    axes[1].set_ylabel("output tokens/s over plain decoding")
    axes[1].grid(alpha=0.3)
    if load:
        axes[1].legend()
    fig.suptitle(f"bench survey speculative: {report['config']['model']} (this machine)")
    fig.tight_layout()
    p = out / "survey_speculative.png"
    fig.savefig(p, dpi=110)
    return [p]


def _survey_data(plt, report: dict, out: Path) -> list[Path]:
    rows, records = report["results"], report["records"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    # One colour per method in every panel, whichever methods a panel lacks.
    keys = dict.fromkeys((r["backend"], r["method"]) for r in rows + records if r["method"] != "uncompressed")
    color = {key: f"C{k}" for k, key in enumerate(keys)}
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(4.6 * (len(workloads) + 1), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == workload]
        for key in dict.fromkeys((r["backend"], r["method"]) for r in mine if r["method"] != "uncompressed"):
            pts = sorted((r["achieved_ratio"], r["accuracy"]) for r in mine if (r["backend"], r["method"]) == key)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color[key], label=f"{key[0]}: {key[1]}")
        base = [r["accuracy"] for r in mine if r["method"] == "uncompressed"]
        if base:
            ax.axhline(base[0], color="black", linewidth=0.8, label="uncompressed")
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio reached")
        ax.set_ylabel("accuracy" if workload != "sharegpt" else "word F1 with the uncompressed answer")
        ax.set_title(workload)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    smallest = min((r["ratio"] for r in records if r["method"] != "uncompressed"), default=None)
    for key in dict.fromkeys((r["backend"], r["method"]) for r in records if r["method"] != "uncompressed"):
        pts = sorted((r["context_tokens"], r["compress_s"] + r["e2e_s"]) for r in records
                     if (r["backend"], r["method"]) == key and r["ratio"] == smallest)
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, color=color[key],
                   label=f"{key[0]}: {key[1]} at {smallest:g}x")
    pts = sorted((r["context_tokens"], r["e2e_s"]) for r in records if r["method"] == "uncompressed")
    ax.scatter([x for x, _ in pts], [y for _, y in pts], s=18, color="black", marker="x", label="uncompressed")
    ax.set_xlabel("context tokens (scorer)")
    ax.set_ylabel("compress + answer seconds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"bench survey data: {report['config']['model']} answering (this machine)")
    fig.tight_layout()
    p = out / "survey_data.png"
    fig.savefig(p, dpi=110)
    return [p]


def _survey_longctx(plt, report: dict, out: Path) -> list[Path]:
    rows, cfg = report["results"], report["config"]
    model = cfg["model"]
    paths = []
    for engine in dict.fromkeys(r["engine"] for r in report["records"]):
        paths.append(_needle_heatmaps(plt, report, engine, out / f"longctx_needle_{engine}.png"))
    ppl = [r for r in rows if r["workload"] == "ppl"]
    if ppl:
        fig, ax = plt.subplots(figsize=(6, 4))
        policies = [m for m in dict.fromkeys(r["method"] for r in ppl if r["budget"] is not None)]
        for k, method in enumerate(policies):
            pts = sorted((r["budget"], r["ppl_tail"]) for r in ppl if r["method"] == method)
            ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", color=f"C{k}", label=method)
        for k, r in enumerate(r for r in ppl if r["budget"] is None):  # full caches, at each KV precision
            ax.axhline(r["ppl_tail"], color="black", linewidth=0.8, linestyle=("-", "--", ":", "-.")[k % 4],
                       label="full cache" if r["method"] == "full" else r["method"])
        if policies:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("KV entries kept")
        ax.set_ylabel(f"perplexity past token {ppl[0]['tail_from']}")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"survey longctx: {cfg['ppl_tokens']} tokens, {cfg['chunk']} a step ({model})", fontsize=9)
        fig.tight_layout()
        paths.append(out / "longctx_ppl.png")
        fig.savefig(paths[-1], dpi=110)
    speed = [r for r in rows if r["workload"] == "speed"]
    if speed:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for k, method in enumerate(dict.fromkeys(r["method"] for r in speed)):
            pts = sorted((r["context"], r) for r in speed if r["method"] == method)
            for ax, key, scale in ((axes[0], "prefill_s", 1), (axes[1], "decode_tok_s", 1),
                                   (axes[2], "kv_decode_bytes", 2**-20)):
                ax.plot([c for c, _ in pts], [r[key] * scale if r[key] is not None else float("nan") for _, r in pts],
                        marker="o", color=f"C{k}", label=method)
        batch = cfg.get("speed_batch", 1)
        for ax, label in zip(axes, ("prefill seconds", f"decode tokens/s (batch {batch})", "KV MiB while decoding")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context tokens")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"survey longctx: {model}, methods keeping {cfg['budget']} entries (this machine)")
        fig.tight_layout()
        paths.append(out / "longctx_speed.png")
        fig.savefig(paths[-1], dpi=110)
    return paths


def _needle_heatmaps(plt, report: dict, engine: str, path: Path) -> Path:
    """One panel per method and kept fraction: accuracy per depth (rows) and context (columns)."""
    records = [r for r in report["records"] if r["engine"] == engine]
    contexts, depths = report["config"]["context_tokens"], report["config"]["depths"]
    configs = list(dict.fromkeys((r["method"], r["ratio"]) for r in records))
    cols = min(4, len(configs))
    rows = -(-len(configs) // cols)
    width, height = max(2.8, 1.2 + 0.8 * len(contexts)), max(2.2, 1.3 + 0.45 * len(depths))
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 + width * cols, 0.6 + height * rows), squeeze=False,
                             sharey=True, layout="constrained")
    for ax in axes.flat[len(configs):]:
        ax.axis("off")
    for ax, (method, ratio) in zip(axes.flat, configs):
        grid = []
        for d in depths:
            row = []
            for c in contexts:
                cell = [r["correct"] for r in records if (r["method"], r["ratio"], r["depth"], r["context"])
                        == (method, ratio, d, c)]
                row.append(sum(cell) / len(cell) if cell else float("nan"))
            grid.append(row)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(contexts)))
        ax.set_xticklabels(contexts, fontsize=8)
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d}%" for d in depths], fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}" if _finite(v) else "–", ha="center", va="center", fontsize=8)
        ax.set_title("full cache" if method == "full" else f"{method}, keeping {ratio:g}", fontsize=9)
        ax.set_xlabel("context tokens", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("depth", fontsize=8)
    fig.colorbar(im, ax=list(axes.flat), label="needle accuracy")
    fig.suptitle(f"survey longctx needle: {engine}, {report['config']['model']}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
