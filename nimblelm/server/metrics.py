"""Prometheus metrics of the server, in a registry of its own (so tests and embedders get no globals).

Counters and histograms are fed by the engine thread as outputs come out of a step; the gauges are
set from the engine's stats after every step. prometheus-client is thread-safe, and /metrics
renders the registry in the text exposition format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nimblelm.engine.llm_engine import EngineStats

# Seconds; fine at the low end, where a small model's steps live, and up to minutes for queued requests.
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()  # the *_created series only add noise to a dashboard
        self.registry = registry = CollectorRegistry()
        label = {"model_name": model_name}

        def gauge(name, doc):
            return Gauge(name, doc, ["model_name"], registry=registry).labels(**label)

        def counter(name, doc):
            return Counter(name, doc, ["model_name"], registry=registry).labels(**label)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(**label)

        self.requests_running = gauge("nimblelm_requests_running", "Requests with a sequence in the running batch.")
        self.requests_waiting = gauge("nimblelm_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("nimblelm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.")
        self.kv_cache_used_blocks = gauge("nimblelm_kv_cache_used_blocks", "KV-cache blocks in use.")
        self.kv_cache_blocks = gauge("nimblelm_kv_cache_blocks", "KV-cache blocks in all.")
        self.preemptions = counter("nimblelm_preemptions", "Sequences preempted for lack of KV blocks.")
        self.prefix_cache_queries = counter(
            "nimblelm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "nimblelm_prefix_cache_hits", "Prompt tokens whose K/V the prefix cache held (not recomputed)."
        )
        self.prompt_tokens = counter("nimblelm_prompt_tokens", "Prompt tokens of requests that got a first token.")
        self.generation_tokens = counter("nimblelm_generation_tokens", "Tokens generated.")
        self.time_to_first_token = histogram(
            "nimblelm_time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "nimblelm_inter_token_latency_seconds", "Time between two steps that gave a request tokens.", _LATENCY_BUCKETS
        )
        self.request_latency = histogram(
            "nimblelm_e2e_request_latency_seconds", "Arrival to the last token of a finished request.", _REQUEST_BUCKETS
        )
        self._finished = Counter(
            "nimblelm_requests_finished",
            "Finished completions (choices) by finish reason: stop, length, abort (client gone or shutdown), error.",
            ["model_name", "reason"],
            registry=registry,
        )
        self._model_name = model_name
        self._rejected = Counter(
            "nimblelm_requests_rejected", "Requests refused before reaching the engine, by HTTP status.",
            ["model_name", "status"], registry=registry,
        )
        self.spec_decode_num_drafts = counter(
            "nimblelm_spec_decode_num_drafts", "Speculative decoding: sequence steps that verified drafts."
        )
        self.spec_decode_num_draft_tokens = counter(
            "nimblelm_spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified."
        )
        self.spec_decode_num_accepted_tokens = counter(
            "nimblelm_spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens the target kept."
        )
        self._accepted_per_pos = Counter(
            "nimblelm_spec_decode_num_accepted_tokens_per_pos",
            "Speculative decoding: draft tokens kept, by position in their draft (0 = first).",
            ["model_name", "position"], registry=registry,
        )
        self._last = {"preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                      "spec_decode_num_drafts": 0, "spec_decode_num_draft_tokens": 0,
                      "spec_decode_num_accepted_tokens": 0}
        self._last_per_pos: list[int] = []

    def finished(self, reason: str, count: int = 1) -> None:
        self._finished.labels(model_name=self._model_name, reason=reason).inc(count)

    def rejected(self, status: int) -> None:
        self._rejected.labels(model_name=self._model_name, status=str(status)).inc()

    def update(self, stats: EngineStats) -> None:
        self.requests_running.set(stats.num_running)
        self.requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_usage)
        self.kv_cache_used_blocks.set(stats.num_used_blocks)
        self.kv_cache_blocks.set(stats.num_blocks)
        # The engine counts since it started; the counters take the growth since the last update.
        for name, total in (("preemptions", stats.num_preemptions), ("prefix_cache_queries", stats.prefix_cache_queries),
                            ("prefix_cache_hits", stats.prefix_cache_hits)):
            getattr(self, name).inc(total - self._last[name])
            self._last[name] = total
        if stats.spec is not None:
            spec = stats.spec
            for name, total in (("spec_decode_num_drafts", spec.num_steps),
                                ("spec_decode_num_draft_tokens", spec.num_draft_tokens),
                                ("spec_decode_num_accepted_tokens", spec.num_accepted_tokens)):
                getattr(self, name).inc(total - self._last[name])
                self._last[name] = total
            last = self._last_per_pos + [0] * (len(spec.accepted_per_position) - len(self._last_per_pos))
            for pos, (total, before) in enumerate(zip(spec.accepted_per_position, last)):
                self._accepted_per_pos.labels(model_name=self._model_name, position=str(pos)).inc(total - before)
            self._last_per_pos = list(spec.accepted_per_position)

    def render(self) -> bytes:
        return generate_latest(self.registry)
