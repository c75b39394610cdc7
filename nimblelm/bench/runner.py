"""Runs a workload on each backend in turn: check, load, measure, close; a peer that cannot run is skipped."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from nimblelm.bench.backends import Backend, BackendUnavailable, BenchContext, make_backend
from nimblelm.bench.machine import CpuMonitor, disturbed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def for_each_backend(ctx: BenchContext, names: Sequence[str], body: Callable[[Backend], None],
                     backend_opts: dict | None = None, logger: Callable[[str], None] = log) -> dict:
    """Call body(backend) for each available backend; returns {name: status record}."""
    statuses: dict[str, dict] = {}
    for name in names:
        try:
            backend = make_backend(name, ctx, **(backend_opts or {}))
            backend.check()
        except ImportError as e:
            logger(f"skipping {name}: cannot import its bench backend ({e})")
            statuses[name] = {"status": "skipped", "reason": f"cannot import its bench backend ({e})"}
            continue
        except BackendUnavailable as e:
            logger(f"skipping {name}: {e}")
            statuses[name] = {"status": "skipped", "reason": str(e)}
            continue
        closed = False
        try:
            # A child that lives from load() to close() (vLLM's worker) hands its CPU time to us only when it
            # is waited for, load included: then the quietness span must include the load too, or the
            # load's CPU would hide other processes' use.
            spans_load = getattr(backend, "child_spans_load", False)
            monitor = CpuMonitor() if spans_load else None
            t0 = time.perf_counter()
            backend.load()
            load_s = time.perf_counter() - t0
            logger(f"{name}: loaded in {load_s:.1f} s")
            monitor = monitor or CpuMonitor()
            body(backend)
            info = backend.info()
            backend.close()  # waits for any server child, so its CPU time counts as our own
            closed = True
            activity = monitor.stop()
            if spans_load:
                activity["includes_load"] = True
            statuses[name] = {"status": "ok", "load_s": round(load_s, 2), "info": info, "other_activity": activity}
            if disturbed(activity, ctx.threads):
                logger(f"warning: other processes used {activity['other_cpu_s']:.1f} CPU-s "
                       f"({100 * activity['other_share']:.0f}% of the machine, more than the cores left free) "
                       f"while {name} ran: its figures may be disturbed")
        except BackendUnavailable as e:
            logger(f"skipping {name}: {e}")
            statuses[name] = {"status": "skipped", "reason": str(e)}
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a peer failing mid-run must not lose the others' figures
            logger(f"{name} failed: {_one_line(e)}")
            statuses[name] = {"status": "failed", "reason": _one_line(e)}
            if name == "nimblelm" and len(names) == 1:
                raise
        finally:
            if not closed:
                backend.close()
    return statuses
