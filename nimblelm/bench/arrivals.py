"""Request arrival processes for the serving benchmark: Poisson, or gamma with a burstiness factor.

Inter-arrival gaps are drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)), whose mean is
1/rate for every burstiness; burstiness 1 is a Poisson process (exponential gaps), below 1 burstier,
above 1 more regular. rate = inf sends every request at time 0.
"""

from __future__ import annotations

import math
import random


def parse_rate(text: str | float) -> float:
    """'inf' or a positive number of requests per second."""
    if isinstance(text, (int, float)):
        rate = float(text)
    else:
        t = str(text).strip().lower()
        rate = math.inf if t in ("inf", "infinity", "max") else float(t)
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 or inf, got {text!r}")
    return rate


def parse_rates(text: str) -> list[float]:
    rates = [parse_rate(x) for x in str(text).split(",") if x.strip()]
    if not rates:
        raise ValueError("no request rate given")
    return rates


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of n requests; the first is at 0."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        out.append(t)
    return out
