"""`nimblelm bench scale`: one workload served by one process, by a model split over ranks (tensor parallel) and
by independent replicas (data parallel), at a fixed number of threads per process.

Configurations (each in processes of its own, started fresh):
- single: one process with 1 thread, and with as many threads as the parallel runs use in all;
- tp: the model split over --size ranks (the mp executor), 1 thread each;
- dp: --size replicas of the whole model, 1 thread each, each serving its share of the requests.

Each runs a ShareGPT batch (output tokens/s) and one request decoding alone (batch-1 decode tokens/s). The tensor-
parallel run also reports the time its ranks spent in the model's all-reduces per step (waiting for the slower rank
included), and a probe measures one all-reduce over gloo by size. From those inputs a cost model predicts a step of
size N (predict_tp): the single process's step split N ways plus the all-reduces; it is checked here against the
measured ranks (docs/distributed.md).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence

from nimblelm.bench.datasets import BenchRequest

PROBE_ROWS = (1, 8, 64, 512)  # all-reduce sizes probed, in rows of the model's hidden size


def _generate(llm, requests: Sequence[BenchRequest]) -> dict:
    """Run the requests to completion (every one forced to its output length), counting engine steps."""
    from nimblelm import SamplingParams

    engine = llm.llm_engine
    for i, r in enumerate(requests):
        params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
        engine.add_request(str(i), {"prompt_token_ids": list(r.prompt_token_ids)}, params)
    steps, outputs, start = 0, [], time.perf_counter()
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
        steps += 1
    elapsed = time.perf_counter() - start
    first = [o.metrics.first_token_time for o in outputs]
    return {"elapsed_s": elapsed, "steps": steps, "start": start, "end": start + elapsed,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "decode_s": max(o.metrics.finished_time for o in outputs) - max(first)}


def _engine_main(queue, index: int, model: str, options: dict, batch: list[BenchRequest], alone: BenchRequest,
                 core: int | None, barrier) -> None:
    """One configuration's engine process: warm up, then the batch and the lone request (with a barrier, the
    replicas start together)."""
    try:
        if core is not None:
            os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[core]])
        from nimblelm import LLM

        llm = LLM(model, **options)
        _generate(llm, [BenchRequest(batch[0].prompt_token_ids, 4)])
        executor = llm.llm_engine.executor
        before = executor.collective_rpc("collective_seconds")
        if barrier is not None:
            barrier.wait()
        result = {"batch": _generate(llm, batch) if batch else None}
        result["collective_s"] = [b - a for a, b in zip(before, executor.collective_rpc("collective_seconds"))]
        if barrier is not None:
            barrier.wait()
        result["alone"] = _generate(llm, [alone]) if alone is not None else None
        queue.put((index, result))
    except Exception as e:  # noqa: BLE001 - the parent reports it as this configuration's failure
        if barrier is not None:
            barrier.abort()  # the other replicas stop waiting for this one
        queue.put((index, {"error": f"{type(e).__name__}: {e}"}))


def _run_processes(model: str, jobs: list[tuple[dict, list[BenchRequest], BenchRequest | None, int | None]]) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    barrier = ctx.Barrier(len(jobs)) if len(jobs) > 1 else None
    procs = [ctx.Process(target=_engine_main, args=(queue, i, model, options, batch, alone, core, barrier))
             for i, (options, batch, alone, core) in enumerate(jobs)]
    for p in procs:
        p.start()
    results = [result for _, result in sorted(queue.get() for _ in procs)]
    for p in procs:
        p.join()
    for r in results:
        if "error" in r:
            raise RuntimeError(r["error"])
    return results


def run_configuration(name: str, model: str, dtype: str, size: int, batch: list[BenchRequest],
                      alone: BenchRequest) -> dict:
    """One row of the table: tokens/s of the batch and of the lone request's decode, per configuration."""
    base = {"dtype": dtype, "max_num_seqs": max(1, len(batch))}
    if name == "dp":
        shares = [batch[i::size] for i in range(size)]
        results = _run_processes(model, [({**base, "num_threads": 1}, share, alone if i == 0 else None, i)
                                         for i, share in enumerate(shares)])
        runs = [r["batch"] for r in results]
        elapsed = max(r["end"] for r in runs) - min(r["start"] for r in runs)
        row = {"processes": size, "threads_per_process": 1, "output_tokens": sum(r["output_tokens"] for r in runs),
               "batch_elapsed_s": elapsed, "alone": results[0]["alone"]}
    else:
        options = {**base, "num_threads": size if name == "single-all" else 1}
        if name == "tp":
            options["tensor_parallel_size"] = size
        (result,) = _run_processes(model, [(options, batch, alone, None)])
        row = {"processes": size if name == "tp" else 1, "threads_per_process": options["num_threads"],
               "output_tokens": result["batch"]["output_tokens"], "batch_elapsed_s": result["batch"]["elapsed_s"],
               "alone": result["alone"]}
        if name == "tp":
            row["collective_s_per_step"] = [s / result["batch"]["steps"] for s in result["collective_s"]]
            row["batch_steps"] = result["batch"]["steps"]
    row["name"] = name
    row["output_tok_s"] = row["output_tokens"] / row["batch_elapsed_s"]
    row["alone_decode_tok_s"] = (alone.output_len - 1) / row["alone"]["decode_s"]
    row["alone_step_ms"] = 1000 * row["alone"]["decode_s"] / (alone.output_len - 1)
    return row


def _probe_main(rank: int, size: int, init_method: str, hidden: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size)
    out = {}
    for rows in PROBE_ROWS:
        x = torch.randn(rows, hidden)
        for _ in range(20):
            dist.all_reduce(x)
        times = []
        for _ in range(100):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        out[rows] = {"median_s": sorted(times)[len(times) // 2], "mean_s": sum(times) / len(times)}
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def probe_all_reduce(size: int, hidden: int) -> dict[int, dict[str, float]]:
    """Seconds of one all-reduce of [rows, hidden] float32 over gloo on this machine (median and mean of 100), by
    rows."""
    from nimblelm.distributed.worker import free_port

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_probe_main, args=(r, size, init, hidden, queue)) for r in range(size)]
    for p in procs:
        p.start()
    out = queue.get()
    for p in procs:
        p.join()
    return out


def predict_tp(single_step_s: float, num_layers: int, all_reduce_s: float, size: int) -> float:
    """A decode step of a model split over `size` ranks, one thread each: the single-thread step's work shared
    out, plus two all-reduces a layer and one for the embedding (the logits' gather is counted as one more)."""
    return single_step_s / size + (2 * num_layers + 2) * all_reduce_s


def all_reduce_at(two_rank_s: float, size: int) -> float:
    """A small all-reduce's time over `size` ranks from its time over two: a ring takes 2 (size - 1) latency-bound
    steps, two of them at two ranks."""
    return two_rank_s * (size - 1)


def run_scale(model: str, dtype: str, size: int, batch: list[BenchRequest], alone: BenchRequest,
              configurations: Sequence[str], hidden: int, num_layers: int, logger) -> dict:
    rows = []
    for name in configurations:
        logger(f"scale: {name}")
        rows.append(run_configuration(name, model, dtype, size, batch, alone))
    probe = probe_all_reduce(size, hidden)
    by_name = {r["name"]: r for r in rows}
    model_check = None
    if "single" in by_name and "tp" in by_name:
        # A step pays the all-reduces' mean: their times have a long tail (a woken rank that waits for a tick).
        single, measured = by_name["single"]["alone_step_ms"] / 1000, probe[1]["mean_s"]
        two_ranks = measured / (size - 1)  # the probe ran over `size` ranks
        model_check = {"predicted_step_ms": 1000 * predict_tp(single, num_layers, measured, size),
                       "measured_step_ms": by_name["tp"]["alone_step_ms"],
                       # Machines like this one, one rank a core, each all-reduce as measured here scaled to n ranks.
                       "predicted_tok_s": {n: 1 / predict_tp(single, num_layers, all_reduce_at(two_ranks, n), n)
                                           for n in (2, 4, 8)}}
    return {"rows": rows, "all_reduce_s": probe, "model_check": model_check}


def scale_markdown(report: dict) -> str:
    from nimblelm.bench.report import machine_lines

    s = report["scale"]
    cfg = report["config"]
    lines = [f"# nimblelm bench scale: {cfg['size']} ranks or replicas", "", *machine_lines(report), "",
             f"- workload: {cfg['workload']}", "",
             ("| configuration | processes × threads | batch output tok/s | vs single 1 thread | batch-1 decode tok/s "
             "| vs single 1 thread | all-reduce ms a step (per rank) |"),
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    base = next((r for r in s["rows"] if r["name"] == "single"), None)
    for r in s["rows"]:
        coll = ", ".join(f"{1000 * c:.2f}" for c in r.get("collective_s_per_step", [])) or "-"
        lines.append(
            f"| {r['name']} | {r['processes']} × {r['threads_per_process']} | {r['output_tok_s']:.1f} | "
            f"{r['output_tok_s'] / base['output_tok_s']:.2f}× | {r['alone_decode_tok_s']:.1f} | "
            f"{r['alone_decode_tok_s'] / base['alone_decode_tok_s']:.2f}× | {coll} |" if base else
            f"| {r['name']} | {r['processes']} × {r['threads_per_process']} | {r['output_tok_s']:.1f} | - | "
            f"{r['alone_decode_tok_s']:.1f} | - | {coll} |")
    lines += ["", "One all-reduce over gloo on this machine, median / mean of 100: "
              + ", ".join(f"{rows} × hidden {1e6 * t['median_s']:.0f} / {1e6 * t['mean_s']:.0f} µs"
                          for rows, t in s["all_reduce_s"].items())]
    if s.get("model_check"):
        m = s["model_check"]
        lines += ["", (f"Cost model (bench/scale.py predict_tp), batch-1 decode step at {cfg['size']} ranks: predicted "
                  f"{m['predicted_step_ms']:.1f} ms, measured {m['measured_step_ms']:.1f} ms. Predicted batch-1 decode "
                  "on ranks like these (one core each, this all-reduce scaled as a ring): "
                  + ", ".join(f"{n} ranks {t:.1f} tok/s" for n, t in m["predicted_tok_s"].items()) + ".")]
    return "\n".join(lines) + "\n"
