"""`nimblelm bench throughput`: offline throughput of N requests (ShareGPT or random lengths)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nimblelm.bench import prefix_cache
from nimblelm.bench.backends import Backend, BenchContext, ThroughputRun, mean_std
from nimblelm.bench.datasets import BenchRequest, chains, common_prefix_len
from nimblelm.bench.runner import interleave, log
from nimblelm.errors import InvalidRequestError


def workload_summary(requests: Sequence[BenchRequest]) -> dict:
    p = [r.prompt_len for r in requests]
    o = [r.output_len for r in requests]
    out = {"num_requests": len(requests), "prompt_tokens": sum(p), "output_tokens": sum(o),
           "prompt_len_min": min(p), "prompt_len_mean": round(sum(p) / len(p), 1), "prompt_len_max": max(p),
           "output_len_min": min(o), "output_len_mean": round(sum(o) / len(o), 1), "output_len_max": max(o),
           "common_prefix_tokens": common_prefix_len(requests)}
    turns = [len(c) for c in chains(requests) if requests[c[0]].conversation is not None]
    if turns:
        out.update(conversations=len(turns), turns_min=min(turns), turns_max=max(turns))
    return out


def workload_line(cfg: dict, w: dict) -> str:
    """The report's description of a workload summary."""
    text = (f"{cfg.get('dataset')} (seed {cfg.get('seed')}), {w['num_requests']} requests, "
            f"{w['prompt_tokens']} prompt + {w['output_tokens']} output tokens "
            f"(prompt {w['prompt_len_min']}–{w['prompt_len_max']}, mean {w['prompt_len_mean']}; "
            f"output {w['output_len_min']}–{w['output_len_max']}, mean {w['output_len_mean']})")
    if w.get("common_prefix_tokens"):
        text += f"; every prompt starts with the same {w['common_prefix_tokens']} tokens"
    if w.get("conversations"):
        text += (f"; {w['conversations']} conversations of {w['turns_min']}–{w['turns_max']} turns, each turn "
                 "sent after the one before it finished")
    return text


def run_pass(backend: Backend, requests: Sequence[BenchRequest]) -> ThroughputRun:
    """One timed pass: every request submitted at once. Conversations go in rounds instead: round t submits
    the t-th turn of every conversation that has one, once round t-1 finished (so each turn comes after
    the one before it, as a chat would send it); the pass is the rounds' sums."""
    turns = chains(requests)
    depth = max(len(c) for c in turns)
    if depth == 1:
        return backend.throughput(requests)
    runs = [backend.throughput([requests[c[t]] for c in turns if t < len(c)]) for t in range(depth)]
    return ThroughputRun(sum(r.elapsed_s for r in runs), sum(r.prompt_tokens for r in runs),
                         sum(r.output_tokens for r in runs), sum(r.num_requests for r in runs),
                         {"rounds": [r.extra for r in runs],
                          "prefix_cache": prefix_cache.total([r.extra.get("prefix_cache") for r in runs])})


def run_throughput(ctx: BenchContext, backends: Sequence[str], workloads: Sequence[Sequence[BenchRequest]], *,
                   warmup: int = 1, backend_opts: dict | None = None, progress: bool = True,
                   logger: Callable[[str], None] = log, peak_gflops: float | None = None) -> dict:
    """One timed pass per workload on each backend (see run_pass), the passes interleaved across backends
    (see runner.interleave); every backend's pass i runs workloads[i].

    total tok/s = (prompt + output tokens of the requests) / wall time; output tok/s = output tokens /
    wall time. Only each request's own tokens are counted (see each backend's throughput()).
    """
    if not workloads or not all(workloads):
        raise InvalidRequestError("the workload has no requests")
    if warmup < 0:
        raise InvalidRequestError(f"--warmup must be >= 0, got {warmup}")
    repeat = len(workloads)
    concurrency = min(len(chains(workloads[0])), ctx.max_num_seqs)  # a conversation has one turn in flight
    runs: dict[str, list] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(repeat + warmup) * len(backends), desc="throughput", unit="pass", leave=False)

    def step(backend, i: int) -> None:
        if i < warmup:
            backend.warmup_throughput(concurrency)
        else:
            runs.setdefault(backend.name, []).append(run_pass(backend, workloads[i - warmup]))
        if bar is not None:
            bar.update()

    try:
        statuses = interleave(ctx, backends, warmup + repeat, step, backend_opts, logger)
    finally:
        if bar is not None:
            bar.close()
    results = [_row(ctx, name, runs[name], concurrency, peak_gflops, logger)
               for name in backends if statuses[name]["status"] == "ok"]
    return {"results": results, "backends": statuses, "workload": workload_summary(workloads[0])}


def _row(ctx: BenchContext, name: str, runs: list, concurrency: int, peak_gflops: float | None,
         logger: Callable[[str], None]) -> dict:
    """One backend's figures over its passes, logged as a line."""
    total = [(r.prompt_tokens + r.output_tokens) / r.elapsed_s for r in runs]
    out = [r.output_tokens / r.elapsed_s for r in runs]
    reqs = [r.num_requests / r.elapsed_s for r in runs]
    row = {"backend": name, "num_requests": runs[0].num_requests, "concurrency": concurrency,
           "prompt_tokens": runs[0].prompt_tokens, "output_tokens": runs[0].output_tokens,
           "elapsed_s": [round(r.elapsed_s, 4) for r in runs], "threads": ctx.threads,
           "total_tok_s": [round(x, 4) for x in total], "output_tok_s": [round(x, 4) for x in out],
           "req_s": [round(x, 5) for x in reqs], "extra": [r.extra for r in runs],
           "prefix_cache": prefix_cache.total([r.extra.get("prefix_cache") for r in runs])}
    for key, xs in (("total_tok_s", total), ("output_tok_s", out), ("req_s", reqs)):
        row[f"mean_{key}"], row[f"std_{key}"] = mean_std(xs)
    try:
        from nimblelm.bench.roofline import matmul_weights_per_token

        w = matmul_weights_per_token(ctx.config)
    except Exception:  # noqa: BLE001 - a config without the fields: no FLOP figure
        w = None
    if w:
        gflops = [2.0 * w * x / 1e9 for x in total]
        row["weights_per_token"] = w
        row["gflops"] = [round(x, 3) for x in gflops]
        row["mean_gflops"], row["std_gflops"] = mean_std(gflops)
        if peak_gflops:
            row["peak_gflops"] = peak_gflops
            row["pct_of_peak"] = 100.0 * row["mean_gflops"] / peak_gflops
    logger(f"{name}: {row['mean_total_tok_s']:.1f} total tok/s, "
           f"{row['mean_output_tok_s']:.1f} output tok/s, {row['mean_req_s']:.3f} req/s, "
           f"prefix cache hit {prefix_cache.cell(row['prefix_cache'])}")
    return row
