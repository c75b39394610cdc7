"""Disaggregated prefill and decode: one engine computes prompts, another generates from them, and each prompt's KV
blocks travel between the two through Ray's object store.

Each engine runs in a Ray actor of its own. The prefill instance computes a prompt (and samples nothing that is
kept), then reads out the K/V of the prompt's full blocks with their prefix-cache hashes (LLMEngine.export_prefix).
The decode instance writes them into free blocks of its own cache and files them under the same hashes
(LLMEngine.import_prefix), so the request that follows finds them as a prefix-cache hit: it computes only the
prompt's last, partial block and then generates, as if it had computed the whole prompt itself. A prompt's
generation therefore never shares a step with another prompt's long prefill.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

from nimblelm.engine.kv_cache.transfer import PrefixKV
from nimblelm.errors import InvalidRequestError
from nimblelm.llm import LLM
from nimblelm.outputs import RequestOutput
from nimblelm.sampling_params import SamplingParams

PREFILL_CALLS = 4096  # prefill_one calls a prefill instance holds at once (a server's requests in flight)


class _Instance:
    """An engine in a Ray actor. `generate`-style calls run it offline; `submit` and `collect` run it online: a
    thread of its own steps it (the thread that built it: server/async_engine.EngineThread says why) while requests
    come in and results go out. role "prefill" computes prompts and hands out their blocks; "decode" (and
    "both", a colocated engine) generates."""

    def __init__(self, model: str, options: dict, role: str = "both"):
        from nimblelm.server.async_engine import EngineThread

        self.role = role
        self.thread = EngineThread()
        self.llm = self.thread.call(lambda: LLM(model, **options))
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.online = None  # the thread's loop, from the first submit on
        self.waiters: dict[str, Future] = {}  # prefill_one's callers, by request id
        self.lock = threading.Lock()  # prefill_one runs on several of the actor's threads at once

    def prefill(self, prompts: list) -> list:
        """Compute the prompts (each to its first sampled token) and return each one's prefix KV."""
        self._offline()

        def run():
            self.llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
            return [self.llm.llm_engine.export_prefix(p) for p in prompts]
        return self.thread.call(run)

    def decode(self, prompts: list, params: list[SamplingParams], prefixes: list) -> list[RequestOutput]:
        self._offline()

        def run():
            for prefix in prefixes:
                self.llm.llm_engine.import_prefix(prefix)
            return self.llm.generate(prompts, params, use_tqdm=False)
        return self.thread.call(run)

    def _offline(self) -> None:
        if self.online is not None:  # the engine's thread runs the online loop from then on
            raise InvalidRequestError("an instance that served online cannot run offline calls any more")

    def submit(self, requests: list[tuple]) -> None:
        """(request_id, prompt, params, arrival_time, prefix or a Ray reference to it or None) each."""
        for request in requests:
            self.inbox.put(request)
        with self.lock:
            if self.online is None:
                self.online = self.thread.submit(self._serve)

    def prefill_one(self, request_id: str, prompt, arrival: float) -> PrefixKV:
        """Online, on a prefill instance: compute the prompt beside whatever else is in flight and return its prefix
        KV (through the object store, as the call's result). A server's engine calls it once per request: the
        actor's max_concurrency lets the calls wait together while one loop batches their prompts."""
        done: Future = Future()
        self.waiters[request_id] = done
        self.submit([(request_id, prompt, None, arrival, None)])
        return done.result()

    def collect(self) -> list[tuple]:
        """What happened since the last call: ("prefilled", request_id, a Ray reference to its PrefixKV) from a
        prefill instance, ("done", request_id, RequestOutput) from the others, ("failed", request_id, the error)."""
        if self.online is not None and self.online.done():
            self.online.result()  # the loop died: raise its error here
        out = []
        while not self.events.empty():
            out.append(self.events.get())
        return out

    def _serve(self) -> None:
        import ray

        engine = self.llm.llm_engine
        prompts = {}
        while True:
            requests = [] if engine.has_unfinished_requests() else [self.inbox.get()]
            while not self.inbox.empty():
                requests.append(self.inbox.get())
            for request_id, prompt, params, arrival, prefix in requests:
                if prefix is not None:
                    engine.import_prefix(ray.get(prefix) if isinstance(prefix, ray.ObjectRef) else prefix)
                if self.role == "prefill":
                    prompts[request_id], params = prompt, SamplingParams(max_tokens=1)
                try:
                    engine.add_request(request_id, prompt, params, arrival_time=arrival)
                except InvalidRequestError as e:  # this request's alone: the others go on
                    prompts.pop(request_id, None)
                    self._finish(request_id, ("failed", request_id, e))
            if not engine.has_unfinished_requests():
                continue
            for out in engine.step():
                if not out.finished:
                    continue
                if self.role == "prefill":
                    prefix = engine.export_prefix(prompts.pop(out.request_id))
                    self._finish(out.request_id, ("prefilled", out.request_id, prefix))
                else:
                    self._finish(out.request_id, ("done", out.request_id, out))

    def _finish(self, request_id: str, event: tuple) -> None:
        """Hand a request's end to its prefill_one caller, or else to collect (blocks through the object store)."""
        import ray

        waiter = self.waiters.pop(request_id, None)
        kind, _, payload = event
        if waiter is not None and kind == "failed":
            waiter.set_exception(payload)
        elif waiter is not None:
            waiter.set_result(payload)
        else:
            self.events.put((kind, request_id, ray.put(payload) if kind == "prefilled" else payload))

    def stats(self):
        return self.llm.llm_engine.stats()


class DisaggregatedLLM:
    """`generate` as LLM's, with prompts computed on a prefill instance and generated on a decode instance; `serve`
    runs requests as they arrive."""

    def __init__(self, model: str, prefill_options: dict | None = None, decode_options: dict | None = None,
                 cpus_per_instance: float = 1, **options):
        """options: engine options of both instances; prefill_options and decode_options add to them."""
        ray = _ray()
        instance = ray.remote(_Instance).options(num_cpus=cpus_per_instance)
        threads = {"num_threads": max(1, int(cpus_per_instance))}
        self.prefill = instance.remote(model, {**threads, **options, **(prefill_options or {})}, "prefill")
        self.decode = instance.remote(model, {**threads, **options, **(decode_options or {})}, "decode")

    def generate(self, prompts: Sequence, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        prompts, params = _with_params(prompts, sampling_params)
        # The prefill instance's result stays in the object store; the decode instance reads it from there.
        prefixes = self.prefill.prefill.remote(prompts)
        return _ray().get(self.decode.decode.remote(prompts, params, prefixes))

    def serve(self, requests: Sequence[tuple]) -> list[RequestOutput]:
        """(prompt, params, arrival in seconds from now) each: submitted to the prefill instance when it arrives,
        to the decode instance once prefilled. The outputs' metrics time each request from its arrival."""
        return serve_online(requests, self.prefill, self.decode)

    def stats(self):
        """(the prefill instance's EngineStats, the decode instance's)."""
        return tuple(_ray().get([self.prefill.stats.remote(), self.decode.stats.remote()]))

    def close(self) -> None:
        for actor in (self.prefill, self.decode):
            _ray().kill(actor)


def prefill_instance(model: str, options: dict, cpus: float = 1):
    """A prefill instance in a Ray actor, for a server whose own engine decodes (`nimblelm serve
    --disaggregated-prefill`; server/async_engine.AsyncEngine's prefill): the server calls its prefill_one once per
    request, and up to PREFILL_CALLS calls wait at once while its engine batches their prompts."""
    ray = _ray()
    return ray.remote(_Instance).options(num_cpus=cpus, max_concurrency=PREFILL_CALLS).remote(
        model, {**options, "num_threads": max(1, int(cpus))}, "prefill")


def colocated(model: str, cpus: float = 2, **options):
    """One engine in a Ray actor, the baseline `serve_online(requests, it)` measures disaggregation against."""
    ray = _ray()
    return ray.remote(_Instance).options(num_cpus=cpus).remote(model, {"num_threads": max(1, int(cpus)), **options})


def serve_online(requests: Sequence[tuple], first, second=None, poll_s: float = 0.002) -> list[RequestOutput]:
    """Run (prompt, params, arrival offset) requests as they arrive through instance actors: `first` alone (a
    colocated engine), or `first` prefilling and `second` decoding. Outputs in the requests' order."""
    ray = _ray()
    order = sorted(range(len(requests)), key=lambda i: requests[i][2])
    start = time.perf_counter()
    arrivals = {str(i): start + requests[i][2] for i in range(len(requests))}
    done: dict[str, RequestOutput] = {}
    sent = 0
    while len(done) < len(requests):
        now = time.perf_counter()
        due = []
        while sent < len(order) and arrivals[str(order[sent])] <= now:
            i = order[sent]
            due.append((str(i), requests[i][0], requests[i][1], arrivals[str(i)], None))
            sent += 1
        if due:
            first.submit.remote(due)
        events = ray.get(first.collect.remote()) + (ray.get(second.collect.remote()) if second is not None else [])
        handoff = []
        for kind, request_id, payload in events:
            if kind == "failed":
                raise payload
            if kind == "done":
                done[request_id] = payload
            else:
                i = int(request_id)
                handoff.append((request_id, requests[i][0], requests[i][1], arrivals[request_id], payload))
        if handoff:
            second.submit.remote(handoff)
        time.sleep(poll_s)
    return [done[str(i)] for i in range(len(requests))]


def _with_params(prompts: Sequence, sampling_params) -> tuple[list, list[SamplingParams]]:
    prompts = list(prompts)
    params = sampling_params or SamplingParams()
    return prompts, [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)


def _ray():
    try:
        import ray
    except ImportError:
        raise InvalidRequestError("disaggregated prefill and decode need Ray: pip install 'nimblelm[ray]'") from None
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    return ray
