"""The engine loop for the server: one background thread builds the LLMEngine and then steps it;
handlers on the asyncio loop add requests and read their outputs through a RequestStream.

Nothing but that thread touches the LLMEngine, not even to load it (see EngineThread). Handlers send
it commands (add, abort, stop) through a queue, and it hands outputs back with `call_soon_threadsafe`.
A stream keeps only the newest output of its request (outputs carry the whole text so far), so a slow
client costs one object of memory and never holds up the step loop; it just gets several tokens in
its next chunk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from nimblelm.engine.llm_engine import EngineStats, LLMEngine, Prompt
from nimblelm.errors import NimbleLMError
from nimblelm.outputs import RequestOutput
from nimblelm.sampling_params import SamplingParams
from nimblelm.server.metrics import ServerMetrics

logger = logging.getLogger("nimblelm.server")
T = TypeVar("T")


class ServerOverloadedError(NimbleLMError):
    """Too many requests are waiting: the client should retry later."""


class EngineDeadError(NimbleLMError):
    """The engine loop stopped (a bug or shutdown); no request can be served."""


class RequestStream:
    """The outputs of one request as they come, each with everything generated so far.

    Iterate it; `close()` it when done (idempotent): a request closed before it finished is aborted,
    which frees its KV blocks in the engine's next loop turn.
    """

    def __init__(self, owner: AsyncEngine, request_id: str):
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self._closed = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._latest = item
        self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            self.finished = True  # the engine already dropped the request
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._forget(self.request_id, abort=not self.finished)


class EngineThread:
    """One daemon thread that runs the calls given to it, in order: first building the engine, then its loop.

    Why the same thread for both: libgomp gives every thread that opens a parallel region its own pool of
    workers, and once a process holds more pool threads than cores, idle workers stop spinning almost at
    once and sleep. Each of the hundreds of parallel regions in a step then waits for a futex wake-up. A
    model loaded on the main thread and stepped on another ran 32 sequences of decode 40-60% slower on
    2 cores (8.3-9.4 s vs 12.8-15.1 s for the same generate call).
    """

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="nimblelm-engine", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((fn, future))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the thread and return its result (or raise its exception) here."""
        return self.submit(fn).result()

    def _serve(self) -> None:
        while True:
            fn, future = self._calls.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)


@dataclass
class _Timing:
    arrival: float
    last_token: float = 0.0
    num_tokens: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting_requests: int,
                 thread: EngineThread | None = None, prefill=None):
        """`thread`: the EngineThread that built `engine`, so that the loop runs where the model was loaded.
        `prefill`: a prefill instance (distributed/disaggregated.prefill_instance) that computes each prompt
        first; its KV blocks are then imported, and `engine` computes only the prompt's last partial block before
        it generates."""
        self.engine = engine
        self.prefill = prefill
        self._prefilling: dict[str, tuple] = {}  # engine-thread side: (prompt, params, arrival) while prefilled
        self.metrics = metrics
        # Requests beyond what runs at once wait in the scheduler; past this many in flight, refuse.
        self.max_in_flight = engine.config.max_num_seqs + max_waiting_requests
        self.stats: EngineStats = engine.stats()
        self.error: BaseException | None = None  # set if the loop itself died
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side: requests in flight
        self._timings: dict[str, _Timing] = {}  # engine-thread side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = thread or EngineThread()
        self._running: Future | None = None  # the loop, once started

    # -- event-loop side ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = self._thread.submit(self._run)

    async def stop(self) -> None:
        """Abort whatever is still in flight and end the loop."""
        if self._running is not None and not self._running.done():
            self._inbox.put(("stop",))
            await asyncio.wrap_future(self._running)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def is_alive(self) -> bool:
        return self._running is not None and not self._running.done() and self.error is None

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> RequestStream:
        """Queue a request; raises ServerOverloadedError at once when too many are in flight."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        if len(self._streams) >= self.max_in_flight:
            raise ServerOverloadedError(
                f"the server is overloaded: {len(self._streams)} requests in flight "
                f"(max_num_seqs + max_waiting_requests = {self.max_in_flight}); retry later"
            )
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, prompt, params, time.perf_counter()))
        return stream

    def _forget(self, request_id: str, abort: bool) -> None:
        self._streams.pop(request_id, None)
        if abort:
            self._inbox.put(("abort", request_id))

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._put(item)

    def _fail_streams(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream._put(error)

    # -- engine-thread side ---------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                # Idle: sleep until a command comes. Busy: take whatever came, then step.
                commands = [] if engine.has_unfinished_requests() else [self._inbox.get()]
                while True:
                    try:
                        commands.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if command[0] == "stop":
                        self._abort_all(EngineDeadError("the server is shutting down"), "abort", everyone=True)
                        return
                    self._apply(command)
                if engine.has_unfinished_requests():
                    self._step()
                self.stats = engine.stats()
                self.metrics.update(self.stats)
        except BaseException as e:  # a bug in the loop: say so, fail everyone, let /health report it
            logger.exception("the engine loop died")
            self.error = e
            self._abort_all(EngineDeadError(f"the engine loop died: {type(e).__name__}: {e}"), "error", everyone=True)

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, arrival = command
            try:
                if self.prefill is None:
                    self.engine.add_request(request_id, prompt, params, arrival_time=arrival)
                else:
                    self.engine.check_request(prompt, params)
            except Exception as e:  # noqa: BLE001 - the handler validated already; whatever is left goes back to it
                self._send([(request_id, e)])
                return
            self._timings[request_id] = _Timing(arrival)
            if self.prefill is not None:
                self._prefilling[request_id] = (prompt, params, arrival)
                done = self.prefill.prefill_one.remote(request_id, prompt, arrival).future()
                done.add_done_callback(lambda blocks: self._inbox.put(("prefilled", request_id, blocks)))
        elif command[0] == "prefilled":
            _, request_id, blocks = command
            pending = self._prefilling.pop(request_id, None)
            if pending is None:  # aborted while its prompt was computed
                return
            prompt, params, arrival = pending
            try:
                self.engine.import_prefix(blocks.result())
                self.engine.add_request(request_id, prompt, params, arrival_time=arrival)
            except Exception as e:  # noqa: BLE001 - the prefill instance failed it, or died: this request's end
                self._timings.pop(request_id, None)
                self._send([(request_id, e)])
        elif command[0] == "abort":
            request_id = command[1]
            self._prefilling.pop(request_id, None)
            request = self.engine.requests.get(request_id)
            if request is not None:
                self.metrics.finished("abort", sum(not s.is_finished for s in request.seqs))
                self.engine.abort_request(request_id)
            self._timings.pop(request_id, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # A failed step leaves no trustworthy state for the requests in it: end them all with the
            # error and keep serving new ones.
            logger.exception("an engine step failed")
            self._abort_all(e, "error")
            return
        now = time.perf_counter()
        items = []
        for output in outputs:
            self._observe(output, now)
            for completion in output.outputs:
                if completion.logprobs is not None:  # the engine keeps appending to its own list
                    completion.logprobs = list(completion.logprobs)
            items.append((output.request_id, output))
        self._send(items)

    def _observe(self, output: RequestOutput, now: float) -> None:
        timing = self._timings.get(output.request_id)
        if timing is None:
            return
        metrics = self.metrics
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        new = num_tokens - timing.num_tokens
        if new > 0:
            if timing.num_tokens == 0:
                metrics.time_to_first_token.observe(now - timing.arrival)
                metrics.prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                metrics.inter_token_latency.observe(now - timing.last_token)
            metrics.generation_tokens.inc(new)
            timing.num_tokens, timing.last_token = num_tokens, now
        if output.finished:
            metrics.request_latency.observe(now - timing.arrival)
            for completion in output.outputs:
                metrics.finished(completion.finish_reason or "stop")
            del self._timings[output.request_id]

    def _abort_all(self, error: BaseException, reason: str, everyone: bool = False) -> None:
        """Abort every request in the engine and hand each stream `error`; with `everyone`, also the
        streams whose add is still queued (the loop is ending and will not read it)."""
        items = []
        for request_id in list(self.engine.requests):
            request = self.engine.requests[request_id]
            self.metrics.finished(reason, sum(not s.is_finished for s in request.seqs))
            try:
                self.engine.abort_request(request_id)
            except Exception:  # keep freeing the others
                logger.exception("abort of %s failed", request_id)
            items.append((request_id, error))
        self._timings.clear()
        self._send(items)
        if everyone and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._fail_streams, error)
            except RuntimeError:
                pass

    def _send(self, items: list) -> None:
        if items and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
