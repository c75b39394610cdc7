"""`nimblelm bench throughput`: offline throughput of N requests (ShareGPT or random lengths)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nimblelm.bench.backends import BenchContext, mean_std
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.runner import interleave, log
from nimblelm.errors import InvalidRequestError


def workload_summary(requests: Sequence[BenchRequest]) -> dict:
    p = [r.prompt_len for r in requests]
    o = [r.output_len for r in requests]
    return {"num_requests": len(requests), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "prompt_len_min": min(p), "prompt_len_mean": round(sum(p) / len(p), 1), "prompt_len_max": max(p),
            "output_len_min": min(o), "output_len_mean": round(sum(o) / len(o), 1), "output_len_max": max(o)}


def run_throughput(ctx: BenchContext, backends: Sequence[str], requests: Sequence[BenchRequest], *,
                   repeat: int = 1, warmup: int = 1, backend_opts: dict | None = None, progress: bool = True,
                   logger: Callable[[str], None] = log, peak_gflops: float | None = None) -> dict:
    """Run the whole workload `repeat` times on each backend (all requests submitted at once), the passes
    interleaved across backends (see runner.interleave).

    total tok/s = (prompt + output tokens of the requests) / wall time; output tok/s = output tokens /
    wall time. Only each request's own tokens are counted (see each backend's throughput()).
    """
    if not requests:
        raise InvalidRequestError("the workload has no requests")
    if repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise InvalidRequestError(f"--warmup must be >= 0, got {warmup}")
    concurrency = min(len(requests), ctx.max_num_seqs)
    runs: dict[str, list] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(repeat + warmup) * len(backends), desc="throughput", unit="pass", leave=False)

    def step(backend, i: int) -> None:
        if i < warmup:
            backend.warmup_throughput(concurrency)
        else:
            runs.setdefault(backend.name, []).append(backend.throughput(requests))
        if bar is not None:
            bar.update()

    try:
        statuses = interleave(ctx, backends, warmup + repeat, step, backend_opts, logger)
    finally:
        if bar is not None:
            bar.close()
    results = [_row(ctx, name, runs[name], concurrency, peak_gflops, logger)
               for name in backends if statuses[name]["status"] == "ok"]
    return {"results": results, "backends": statuses, "workload": workload_summary(requests)}


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
           "req_s": [round(x, 5) for x in reqs], "extra": [r.extra for r in runs]}
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
           f"{row['mean_output_tok_s']:.1f} output tok/s, {row['mean_req_s']:.3f} req/s")
    return row
