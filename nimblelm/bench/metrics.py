"""Serving metrics from per-request timelines: TTFT, TPOT, ITL, end-to-end latency, throughput, goodput.

Everything here is pure arithmetic on recorded timestamps, so it is tested on synthetic timelines.

Definitions (the usual serving-benchmark ones):
- TTFT: first token received − request sent.
- E2E: last token received − request sent.
- TPOT (per request): (E2E − TTFT) / (output tokens − 1); undefined for a one-token output.
- ITL: every gap between consecutive streamed chunks of every request (a chunk carrying k tokens
  counts as one gap, as the client saw it).
- Throughput: completed requests, output tokens and prompt + output tokens per second of the whole
  run (first request sent to last response finished).
- Goodput: completed requests per second that met every given SLO (TTFT, TPOT, E2E bounds).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds on one monotonic clock."""

    prompt_len: int
    expected_output_len: int = 0
    start: float = 0.0  # request sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with tokens
    end: float = 0.0  # response complete
    output_tokens: int = 0  # as the server counted them (usage), or chunks when it reports none
    success: bool = False
    error: str = ""
    cache_query_tokens: int | None = None  # prompt tokens the server looked up in its prefix cache, if it says
    cache_hit_tokens: int | None = None  # of those, tokens it found cached

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.success and self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.start if self.success else None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2 or not self.chunk_times:
            return None
        last = self.chunk_times[-1]
        return (last - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        if not self.success:
            return []
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


def percentile(xs: Sequence[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default), p in [0, 100]; nan for no data."""
    data = sorted(float(x) for x in xs)
    if not data:
        return float("nan")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    k = (len(data) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summarize(xs: Iterable[float], percentiles: Sequence[float] = PERCENTILES) -> dict:
    """mean, std, min, max and the given percentiles, in the unit of xs; nan when xs is empty."""
    data = [float(x) for x in xs]
    out = {"n": len(data)}
    if not data:
        out.update(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"))
    else:
        out.update(mean=statistics.fmean(data), std=statistics.pstdev(data) if len(data) > 1 else 0.0,
                   min=min(data), max=max(data))
    for p in percentiles:
        out[f"p{p:g}"] = percentile(data, p)
    return out


@dataclass(frozen=True)
class SLO:
    """Latency bounds in seconds for goodput; None = no bound on that metric."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.success:
            return False
        if self.ttft_s is not None and (r.ttft is None or r.ttft > self.ttft_s):
            return False
        if self.tpot_s is not None and r.tpot is not None and r.tpot > self.tpot_s:
            return False
        return not (self.e2e_s is not None and (r.e2e is None or r.e2e > self.e2e_s))

    def as_dict(self) -> dict:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None


def parse_slo(text: str | None) -> SLO:
    """'ttft:2,tpot:0.1,e2e:30' (seconds; 'ms' suffix allowed) -> SLO."""
    if not text:
        return SLO()
    vals: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        if not sep:
            key, sep, value = part.partition("=")
        key = key.strip().lower()
        if key not in ("ttft", "tpot", "e2e") or not sep:
            raise ValueError(f"bad SLO {part!r}: expected ttft:SECONDS, tpot:SECONDS or e2e:SECONDS")
        value = value.strip().lower()
        scale = 1.0
        if value.endswith("ms"):
            value, scale = value[:-2], 1e-3
        elif value.endswith("s"):
            value = value[:-1]
        try:
            v = float(value) * scale
        except ValueError:
            raise ValueError(f"bad SLO value in {part!r}") from None
        if not v > 0:
            raise ValueError(f"SLO bounds must be > 0, got {part!r}")
        vals[key + "_s"] = v
    return SLO(**vals)


def serving_metrics(records: Sequence[RequestRecord], duration_s: float | None = None,
                    slo: SLO | None = None) -> dict:
    """Aggregate figures of one serving run. duration_s defaults to first start .. last end."""
    done = [r for r in records if r.success]
    if duration_s is None:
        if records:
            duration_s = max((r.end for r in records), default=0.0) - min(r.start for r in records)
        else:
            duration_s = 0.0
    dur = duration_s if duration_s and duration_s > 0 else float("nan")
    out_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    m = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(done) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (prompt_tokens + out_tokens) / dur,
        "ttft_s": summarize(r.ttft for r in done if r.ttft is not None),
        "tpot_s": summarize(r.tpot for r in done if r.tpot is not None),
        "itl_s": summarize(x for r in done for x in r.itls),
        "e2e_s": summarize(r.e2e for r in done),
    }
    if slo is not None and not slo.empty:
        good = sum(1 for r in done if slo.met_by(r))
        m["slo"] = slo.as_dict()
        m["good_requests"] = good
        m["goodput"] = good / dur
    errors = sorted({r.error for r in records if not r.success and r.error})
    if errors:
        m["errors"] = errors[:5]
    return m


def max_sustained_rate(points: Sequence[dict], tpot_p99_s: float) -> float | None:
    """The highest offered rate whose run met p99 TPOT <= bound with every request completed.

    points: [{"rate": r (req/s, inf allowed), "metrics": serving_metrics(...)}...]. None if none met it.
    """
    best = None
    for pt in points:
        m = pt["metrics"]
        p99 = m["tpot_s"].get("p99")
        if m["failed"] or p99 is None or math.isnan(p99) or p99 > tpot_p99_s:
            continue
        rate = float(pt["rate"])
        if math.isinf(rate):  # "as fast as possible" met the bound: the sustained rate is what it achieved
            rate = m["request_throughput"]
        if best is None or rate > best:
            best = rate
    return best
