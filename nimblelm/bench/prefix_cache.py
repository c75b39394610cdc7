"""Prefix-cache hit rates of a benchmark pass, in prompt tokens, from whatever each backend exposes.

- nimblelm in process: LLMEngine.stats() (`prefix_cache_queries`, `prefix_cache_hits`), before and after.
- A server with Prometheus counters, before and after: nimblelm (`nimblelm_prefix_cache_{queries,hits}_total`),
  vLLM (`vllm:prefix_cache_{queries,hits}_total`).
- A server that reports per response: llama.cpp's `timings` (`cache_n` prompt tokens reused from the slot's
  cache, `prompt_n` computed), or OpenAI's `usage.prompt_tokens_details.cached_tokens` of `prompt_tokens`.

A pass's figure is {"queries", "hits", "hit_rate", "source"}; {"enabled": False} when the backend runs
without a prefix cache; {"source": None, "reason"} when it exposes none ("n/a").
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Sequence

from nimblelm.bench.metrics import RequestRecord

NOTE = ("Prefix cache hit: prompt tokens whose K/V the backend found cached / prompt tokens it looked up, "
        "over the pass (in-process engine stats, the server's /metrics counters before and after, or the "
        "cached-token counts of its responses); off: run without a prefix cache; n/a: the backend exposes no "
        "count.")

PASSES_NOTE = ("Each timed pass sends requests no earlier pass sent, the same ones on every backend (ShareGPT, "
               "HumanEval: the next --num-prompts of one seeded order, shared-prefix behind a system prompt of its "
               "own; random ids: seed + pass), so that no pass finds its prompts in a prefix cache an earlier one "
               "filled; the workload line describes the first pass.")

#: (queries, hits) counter names of the servers that export them, as they appear in /metrics
COUNTERS = (("nimblelm_prefix_cache_queries_total", "nimblelm_prefix_cache_hits_total"),
            ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"))

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def counted(queries: int, hits: int, source: str) -> dict:
    return {"queries": int(queries), "hits": int(hits), "hit_rate": hits / queries if queries else None,
            "source": source}


def disabled() -> dict:
    return {"enabled": False}


def unavailable(reason: str) -> dict:
    return {"source": None, "reason": reason}


def delta(before: tuple[int, int] | None, after: tuple[int, int] | None, source: str) -> dict | None:
    """The pass's figure from (queries, hits) counters read before and after it; None if either is missing."""
    if before is None or after is None:
        return None
    return counted(after[0] - before[0], after[1] - before[1], source)


def parse_prometheus(text: str) -> dict[str, float]:
    """Every metric name of a text exposition with the sum of its samples over all label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def scrape(base_url: str, timeout: float = 10.0) -> tuple[int, int] | None:
    """(queries, hits) from the server's /metrics, or None when it has no /metrics or none of COUNTERS."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    values = parse_prometheus(text)
    for queries, hits in COUNTERS:
        if queries in values and hits in values:
            return int(values[queries]), int(values[hits])
    return None


def from_records(records: Sequence[RequestRecord]) -> dict | None:
    """The pass's figure from per-response counts, when every completed response carried them."""
    done = [r for r in records if r.success]
    if not done or any(r.cache_query_tokens is None for r in done):
        return None
    return counted(sum(r.cache_query_tokens for r in done), sum(r.cache_hit_tokens for r in done),
                   "per-response counts")


def response_counts(event: dict) -> tuple[int, int] | None:
    """(prompt tokens looked up, of them found cached) of one response or stream event, if it says."""
    timings = event.get("timings")
    if isinstance(timings, dict) and "cache_n" in timings and "prompt_n" in timings:
        cached, computed = int(timings["cache_n"]), int(timings["prompt_n"])
        return cached + computed, cached
    usage = event.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None and usage.get("prompt_tokens") is not None:
        return int(usage["prompt_tokens"]), int(details["cached_tokens"])
    return None


def cell(figure: dict | None) -> str:
    """The report's cell: '87.5%', 'off' (no prefix cache), or 'n/a' (nothing exposed)."""
    if figure and figure.get("enabled") is False:
        return "off"
    rate = (figure or {}).get("hit_rate")
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def total(figures: Sequence[dict | None]) -> dict | None:
    """Several passes' figures as one (the sums), when all have counts from one source."""
    if not figures:
        return None
    if all(f and f.get("enabled") is False for f in figures):
        return disabled()
    if any(not f or "queries" not in f for f in figures):
        return None
    sources = {f["source"] for f in figures}
    return counted(sum(f["queries"] for f in figures), sum(f["hits"] for f in figures), " + ".join(sorted(sources)))
