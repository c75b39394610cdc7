"""Runs a workload on every backend, interleaved: all are loaded, then each step of the workload runs on each
backend in turn, so that a drift of the machine's speed (its memory bandwidth moves by up to a third here over
minutes) lands on every backend alike instead of on the ratio. A peer that cannot run is skipped."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from nimblelm.bench.backends import Backend, BackendUnavailable, BenchContext, make_backend
from nimblelm.bench.machine import CpuMonitor, activity_text, disturbed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    """'Type: first line of the message', for a report's reason column."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def interleave(ctx: BenchContext, names: Sequence[str], steps: int, step: Callable[[Backend, int], None],
               backend_opts: dict | None = None, logger: Callable[[str], None] = log) -> dict:
    """Load every available backend, then call step(backend, i) for i in range(steps) on each of them in turn.

    The order of the backends rotates from one step to the next, so that none always runs first. A backend
    that fails is dropped from the later steps and reported as failed; the others go on. Returns
    {name: status record}.
    """
    statuses: dict[str, dict] = {}
    loaded: list[Backend] = []
    monitor = None
    try:
        for name in names:
            try:
                backend = make_backend(name, ctx, **(backend_opts or {}))
                backend.check()
            except ImportError as e:
                statuses[name] = _skipped(name, f"cannot import its bench backend ({e})", logger)
                continue
            except BackendUnavailable as e:
                statuses[name] = _skipped(name, str(e), logger)
                continue
            # A child that lives from load() to close() (vLLM's worker) hands its CPU time to us only when it
            # is waited for, load included: then the quietness span must include the load too, or the
            # load's CPU would hide other processes' use.
            if monitor is None and getattr(backend, "child_spans_load", False):
                monitor = CpuMonitor()
            try:
                t0 = time.perf_counter()
                backend.load()
            except BackendUnavailable as e:
                backend.close()
                statuses[name] = _skipped(name, str(e), logger)
                continue
            except Exception as e:  # noqa: BLE001 - a peer failing must not lose the others' figures
                backend.close()
                statuses[name] = _failed(name, e, logger, alone=len(names) == 1)
                continue
            except BaseException:
                backend.close()
                raise
            load_s = time.perf_counter() - t0
            logger(f"{name}: loaded in {load_s:.1f} s")
            statuses[name] = {"status": "ok", "load_s": round(load_s, 2)}
            loaded.append(backend)
        monitor = monitor or CpuMonitor()
        live = list(loaded)
        for i in range(steps):
            k = i % len(live) if live else 0
            for backend in live[k:] + live[:k]:
                try:
                    step(backend, i)
                except Exception as e:  # noqa: BLE001 - as above
                    statuses[backend.name] = _failed(backend.name, e, logger, alone=len(names) == 1)
                    live.remove(backend)
        for backend in live:
            statuses[backend.name]["info"] = backend.info()
            statuses[backend.name]["prefix_cache"] = backend.prefix_cache_run()
    finally:
        for backend in loaded:
            backend.close()  # waits for any server child, so its CPU time counts as our own
    activity = monitor.stop()
    if any(getattr(b, "child_spans_load", False) for b in loaded):
        activity["includes_load"] = True
    for backend in loaded:
        if statuses[backend.name]["status"] == "ok":
            statuses[backend.name]["other_activity"] = activity
    if loaded and disturbed(activity, ctx.threads):
        logger(f"warning: {activity_text(activity)}, more than the cores left free, while the backends ran: "
               "their figures may be disturbed")
    return statuses


def _skipped(name: str, reason: str, logger: Callable[[str], None]) -> dict:
    logger(f"skipping {name}: {reason}")
    return {"status": "skipped", "reason": reason}


def _failed(name: str, e: Exception, logger: Callable[[str], None], alone: bool) -> dict:
    logger(f"{name} failed: {one_line(e)}")
    if name == "nimblelm" and alone:
        raise e
    return {"status": "failed", "reason": one_line(e)}
