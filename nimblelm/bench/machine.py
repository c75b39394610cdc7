"""What machine, software and code produced a benchmark figure."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path

from nimblelm.platform import memory_total_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur = {}
            continue
        key, _, value = line.partition(":")
        cur[key.strip()] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) ...'."""
    blocks = _cpuinfo_blocks(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
    for b in blocks:
        for key in ("model name", "Model Name", "cpu model", "Processor"):
            if b.get(key):
                return b[key]
    return platform.processor() or platform.machine() or "unknown"


_FEATURES = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "asimd", "sve")


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """The SIMD features that matter for inference kernels, as /proc/cpuinfo lists them."""
    blocks = _cpuinfo_blocks(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
    flags: set[str] = set()
    for b in blocks[:1]:
        flags.update((b.get("flags") or b.get("Features") or "").split())
    return [f for f in _FEATURES if f in flags]


def logical_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores available to this process (SMT siblings counted once)."""
    blocks = _cpuinfo_blocks(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
    try:
        allowed = os.sched_getaffinity(0) if cpuinfo is None else None
    except (AttributeError, OSError):
        allowed = None
    cores = set()
    for b in blocks:
        if "processor" not in b:
            continue
        if allowed is not None and int(b["processor"]) not in allowed:
            continue
        if "core id" in b:
            cores.add((b.get("physical id", "0"), b["core id"]))
        else:
            cores.add(("cpu", b["processor"]))
    if cores:
        return len(cores)
    return logical_cpus() if cpuinfo is None else 1


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The nimblelm commit (short hash, '+dirty' for uncommitted changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def machine_info(threads: int | None = None) -> dict:
    """A JSON-able record of the machine and software a benchmark ran on."""
    import torch

    from nimblelm.kernels import kernels_in_use

    mem = memory_total_bytes()
    load = load_average()
    return {
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "kernels": kernels_in_use(),
        "physical_cores": physical_cores(),
        "logical_cpus": logical_cpus(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "memory_total_bytes": mem,
        "memory_total_gib": round(mem / 2**30, 1) if mem else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "nimblelm_commit": git_commit(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def disturbed(activity: dict, threads: int, margin: float = 0.05) -> bool:
    """Whether other processes and the hypervisor (steal) took more of the machine than the cores this run
    left free (+ margin)."""
    share = activity.get("other_share")
    if share is None:
        return False
    free = max(0.0, 1.0 - threads / max(1, logical_cpus()))
    return share + activity.get("steal_share", 0.0) > free + margin


def activity_text(activity: dict) -> str | None:
    """What a CpuMonitor record says in words, for reports; None without /proc/stat figures."""
    share = activity.get("other_share")
    if share is None:
        return None
    text = f"other processes took {100 * share:.1f}% of the machine"
    steal = activity.get("steal_share")
    return text + (f", the hypervisor {100 * steal:.1f}% (steal)" if steal else "")


def default_threads() -> int:
    """Threads for every backend: the physical cores this process may use."""
    return max(1, physical_cores())


def busy_cores(sample_s: float = 1.0) -> float:
    """How many CPUs other processes kept busy over a sample_s sleep (0.0 where /proc/stat is missing)."""
    mon = CpuMonitor()
    time.sleep(sample_s)
    act = mon.stop()
    return float(act.get("other_cpu_s", 0.0)) / max(1e-9, act["wall_s"])


def auto_threads(sample_s: float = 1.0) -> tuple[int, float]:
    """(threads, busy CPUs): the physical cores left free by other processes, at least 1.

    On a shared machine a 2-thread run on 2 cores collapses (up to 20× slower decode here) as soon as
    another process holds one core, since every parallel region waits for the descheduled thread; one
    thread per free core keeps the figures meaningful.
    """
    busy = busy_cores(sample_s)
    return max(1, default_threads() - int(busy + 0.5)), busy


def _proc_stat_cpu() -> tuple[float, float] | None:
    """(busy seconds, steal seconds) of the whole machine since boot, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    vals = [int(x) for x in first[1:]]
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    # user nice system idle iowait irq softirq steal guest guest_nice (guest time is inside user already)
    user, nice, system, _idle, _iowait, irq, softirq = vals[:7]
    steal = vals[7] if len(vals) > 7 else 0
    return (user + nice + system + irq + softirq) / hz, steal / hz


def process_tree_cpu(pid: int) -> float:
    """CPU seconds used so far by pid and every live descendant (with the children they have waited for),
    from /proc (0 elsewhere)."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        parents[int(e)] = int(fields[1])
        # utime, stime, and cutime, cstime: children it has already waited for
        times[int(e)] = sum(int(x) for x in fields[11:15]) / hz
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMonitor:
    """How much CPU other processes (and the hypervisor, as steal) took while a benchmark ran.

    other_cpu_s = machine busy time - this process's and its waited-for children's CPU time. On a quiet
    machine it is near 0; a large share means the figures of that span were disturbed.
    """

    def __init__(self, extra_own=None):
        """extra_own: a callable giving CPU seconds of processes to count as ours while they live (a
        server's process tree, whose grandchildren never reach our own rusage)."""
        self._extra = extra_own
        self._t0 = time.perf_counter()
        self._stat0 = _proc_stat_cpu()
        self._own0 = _own_cpu() + (extra_own() if extra_own else 0.0)

    def stop(self) -> dict:
        wall = time.perf_counter() - self._t0
        stat1 = _proc_stat_cpu()
        own = _own_cpu() + (self._extra() if self._extra else 0.0) - self._own0
        out = {"wall_s": round(wall, 2), "own_cpu_s": round(own, 2)}
        if self._stat0 is not None and stat1 is not None:
            busy = stat1[0] - self._stat0[0]
            other = max(0.0, busy - own)
            out["other_cpu_s"] = round(other, 2)
            out["steal_s"] = round(stat1[1] - self._stat0[1], 2)
            out["other_share"] = round(other / (wall * logical_cpus()), 4) if wall > 0 else None
            out["steal_share"] = round(out["steal_s"] / (wall * logical_cpus()), 4) if wall > 0 else None
        return out
