"""`nimblelm bench latency`: llama-bench style prompt processing (pp) and token generation (tg) tests."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from nimblelm.bench.backends import BenchContext, LatencyTest, mean_std
from nimblelm.bench.roofline import matmul_weights_per_token
from nimblelm.bench.runner import interleave, log
from nimblelm.errors import InvalidRequestError


def make_tests(n_prompt: Sequence[int], n_gen: Sequence[int], batch: Sequence[int],
               prompt_gen: Sequence[tuple[int, int]] = ()) -> list[LatencyTest]:
    """Every pp length and every tg length at every batch size (pp tests first, as llama-bench), then
    every (prompt, generated) pair of prompt_gen at every batch size."""
    for p_, n_ in prompt_gen:
        if int(p_) <= 0 or int(n_) <= 0:
            raise InvalidRequestError(f"-pg values must be > 0, got {p_},{n_}")
    for label, values in (("-p", n_prompt), ("-n", n_gen), ("-b", batch)):
        for v in values:
            if int(v) <= 0:
                raise InvalidRequestError(f"{label} values must be > 0, got {v}")
    tests = [LatencyTest("pp", int(p), int(b)) for p in n_prompt for b in batch]
    tests += [LatencyTest("tg", int(n), int(b)) for n in n_gen for b in batch]
    tests += [LatencyTest("pg", int(n_), int(b), n_prompt=int(p_)) for p_, n_ in prompt_gen for b in batch]
    for t in tests:
        if t.kind == "tg" and t.n_tokens < 2:
            raise InvalidRequestError("-n values must be >= 2 (tg times the tokens after the first)")
    return tests


def run_latency(ctx: BenchContext, backends: Sequence[str], tests: Sequence[LatencyTest], *, repeat: int = 5,
                warmup: int = 1, backend_opts: dict | None = None, progress: bool = True,
                logger: Callable[[str], None] = log, bandwidth_gbs: float | None = None,
                peak_gflops: float | None = None) -> dict:
    """Measure every test on every backend. Returns {"results": [...], "backends": {...}}.

    Repetitions are interleaved: each one runs on every backend in turn (the first after `warmup` untimed
    runs), so that the machine's drift does not land in the ratios between backends.
    With the machine's measured bandwidth, batch-1 tg rows also get the decode limit it implies for that
    backend's weight bytes (bandwidth / bytes per token) and the share of it reached; with its matmul peak,
    pp rows get their GFLOP/s (2 FLOPs per weight per token, attention left out) and the share of the peak.
    """
    if repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {repeat}")
    if warmup < 0:
        raise InvalidRequestError(f"--warmup must be >= 0, got {warmup}")
    samples: dict[tuple[str, int], list[float]] = {}
    token_nbytes: dict[str, int | None] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tests) * (repeat + warmup) * len(backends), desc="latency", unit="run", leave=False)

    def step(backend, i: int) -> None:
        t, r = divmod(i, repeat)
        test = tests[t]
        if i == 0:
            token_nbytes[backend.name] = backend.token_nbytes()
        if bar is not None:
            bar.set_postfix_str(f"{backend.name} {test.name} b{test.batch}")
        got = backend.latency(test, 1, warmup if r == 0 else 0, progress=(bar.update if bar else None))
        samples.setdefault((backend.name, t), []).extend(got)
        if r == repeat - 1:
            m, s = mean_std(samples[backend.name, t])
            line = f"{backend.name}: {test.name} batch {test.batch}: {m:.2f} ± {s:.2f} tok/s"
            if bar is not None and logger is log:
                bar.write(line, file=sys.stderr)  # keeps the progress bar intact
            else:
                logger(line)

    try:
        statuses = interleave(ctx, backends, len(tests) * repeat, step, backend_opts, logger)
    finally:
        if bar is not None:
            bar.close()
    results = []
    for name in (n for n in backends if statuses[n]["status"] == "ok"):
        nbytes = token_nbytes.get(name)
        for t, test in enumerate(tests):
            xs = samples[name, t]
            m, s = mean_std(xs)
            row = {"backend": name, "test": test.name, "kind": test.kind, "n_tokens": test.n_tokens,
                   "batch": test.batch, "threads": ctx.threads, "samples_ts": [round(x, 4) for x in xs],
                   "mean_ts": m, "std_ts": s}
            if test.kind == "tg" and test.batch == 1 and nbytes:
                gb = [nbytes * x / 1e9 for x in xs]
                row["token_nbytes"] = nbytes
                row["mean_gbps"], row["std_gbps"] = mean_std(gb)
                if bandwidth_gbs:
                    row["bw_limit_ts"] = bandwidth_gbs * 1e9 / nbytes
                    row["pct_of_bw_limit"] = 100.0 * row["mean_gbps"] / bandwidth_gbs
            if test.kind == "pp" and peak_gflops:
                row["gflops"] = 2.0 * matmul_weights_per_token(ctx.config) * m / 1e9
                row["peak_gflops"] = peak_gflops
                row["pct_of_peak"] = 100.0 * row["gflops"] / peak_gflops
            results.append(row)
    return {"results": results, "backends": statuses}
