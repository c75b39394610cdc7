"""nimblelm on Ray Serve: engine replicas behind one OpenAI-compatible endpoint, on one machine or a Ray cluster.

Ray Serve runs the HTTP proxy, the replicas, their placement and autoscaling, and the routing; nimblelm brings the
replica (an engine with the same FastAPI app `nimblelm serve` runs, called in-process through ASGI) and one
routing policy. The ingress reads each request's prompt and passes its start along as `prefix`; the policy
(PrefixAffinityRouter, on Ray Serve's RequestRouter interface) sends a request to the replica that last served the
same prefix, whose prefix cache then holds its KV blocks, unless that replica is full, and otherwise to the replica
with the shortest queue (Ray Serve's own choice within a rank).

Each replica's engine load goes to Ray's metrics (ray.serve.metrics: tagged with the replica), which every node
of the cluster exports for Prometheus.

    from ray import serve
    from nimblelm.server.ray_serve import build_app
    serve.run(build_app("smollm2-135m", num_replicas=2), route_prefix="/")

`nimblelm serve --data-parallel-size N` and `--ray-serve` do the same from the command line.
"""

# No `from __future__ import annotations`: FastAPI reads the ingress route's parameter types at run time.
import asyncio
import json
import random
from collections import OrderedDict
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from nimblelm.server.app import ServerSettings

PREFIX_CHARS = 512  # of a prompt's text: the part requests must share to be sent to the same replica
METRICS_PERIOD_S = 1.0


def prompt_prefix(body: bytes) -> str:
    """The start of a completion or chat request's prompt text ("" when the body has none)."""
    try:
        request = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    if isinstance(request.get("messages"), list):
        text = "".join(str(m.get("content", "")) for m in request["messages"] if isinstance(m, dict))
    else:
        text = str(request.get("prompt", ""))
    return text[:PREFIX_CHARS]


class PrefixAffinityRouter(RequestRouter):
    """Ranks the replica that last served a request's prefix first, then every other replica."""

    def initialize_state(self, max_prefixes: int = 65536):
        self.owners: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix -> replica, least recent first
        self.max_prefixes = max_prefixes

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        owner = self.owners.get(_prefix(pending_request))
        first = [r for r in candidate_replicas if r.replica_id == owner]
        rest = [r for r in candidate_replicas if r.replica_id != owner]
        random.shuffle(rest)  # equal queues: no replica is everyone's first pick
        return [first, rest] if first else [rest]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        prefix = _prefix(pending_request)
        if prefix:
            self.owners[prefix] = replica_id
            self.owners.move_to_end(prefix)
            if len(self.owners) > self.max_prefixes:
                self.owners.popitem(last=False)


def _prefix(pending_request: PendingRequest | None) -> str:
    return "" if pending_request is None else pending_request.kwargs.get("prefix", "")


class EngineReplica:
    """One engine and its OpenAI app; Ray Serve sends it each request as (method, path, query, headers, body)."""

    async def __init__(self, model: str, engine_options: dict, settings: ServerSettings):
        from nimblelm.llm import LLM
        from nimblelm.server.app import build_app as build_server_app
        from nimblelm.server.async_engine import EngineThread

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine_thread = EngineThread()
        llm = engine_thread.call(lambda: LLM(model, **engine_options))
        self.app = build_server_app(llm.llm_engine, settings, engine_thread=engine_thread)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        self.metrics_task = asyncio.get_running_loop().create_task(self._export_metrics())

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                     prefix: str = "") -> AsyncIterator[dict]:
        """The app's ASGI messages for one request: the response start, then its body, in as few items as it comes
        (every item crosses processes: the chunks that are ready together go as one). `prefix` is for the router
        only."""
        messages: asyncio.Queue = asyncio.Queue()
        received = False

        async def receive() -> dict:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client's disconnect arrives as this call's cancellation
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": None, "server": None}
        call = asyncio.get_running_loop().create_task(self.app(scope, receive, messages.put))
        try:
            start = await messages.get()
            # Which replica answered, for clients and tests.
            start["headers"] = [*start["headers"], (b"x-nimblelm-replica", self.replica_id.encode())]
            yield start
            more = True
            while more:
                chunks = [await messages.get()]
                while not messages.empty():
                    chunks.append(messages.get_nowait())
                more = chunks[-1].get("more_body", False)
                yield {"type": "http.response.body", "body": b"".join(c.get("body", b"") for c in chunks),
                       "more_body": more}
        finally:
            call.cancel()  # a stream the client left: the app aborts its request

    async def _export_metrics(self) -> None:
        from ray.serve.metrics import Gauge

        engine = self.app.state.engine  # its stats: the snapshot the engine thread takes after each step
        gauges = {name: Gauge(f"nimblelm_{name}", description=text) for name, text in (
            ("num_requests_running", "requests in the running batch"),
            ("num_requests_waiting", "requests waiting to be scheduled"),
            ("kv_cache_usage", "fraction of KV blocks in use"),
            ("prefix_cache_hit_rate", "prompt tokens found in the prefix cache, of those looked up"),
        )}
        while True:
            stats = engine.stats
            gauges["num_requests_running"].set(stats.num_running)
            gauges["num_requests_waiting"].set(stats.num_waiting)
            gauges["kv_cache_usage"].set(stats.kv_usage)
            gauges["prefix_cache_hit_rate"].set(stats.prefix_cache_hits / max(1, stats.prefix_cache_queries))
            await asyncio.sleep(METRICS_PERIOD_S)


ingress_app = FastAPI(title="nimblelm on Ray Serve")


@serve.ingress(ingress_app)
class Ingress:
    """Forwards every request to a replica, its prompt's start beside it for the router, and streams the answer."""

    def __init__(self, replicas):
        self.replicas = replicas

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, request: Request, path: str):
        body = await request.body()
        stream = self.replicas.options(stream=True).handle.remote(
            request.method, request.url.path, request.url.query.encode(), request.headers.raw, body,
            prefix=prompt_prefix(body))
        start = await stream.__anext__()

        async def chunks():
            async for message in stream:
                yield message.get("body", b"")

        headers = {k.decode(): v.decode() for k, v in start["headers"] if k.lower() != b"content-length"}
        return StreamingResponse(chunks(), status_code=start["status"], headers=headers)


def build_app(model: str, engine_options: dict | None = None, settings: ServerSettings | None = None, *,
              num_replicas: int | None = 1, min_replicas: int | None = None, max_replicas: int | None = None,
              cpus_per_replica: float = 1.0):
    """The Ray Serve application: the ingress and the engine replicas (num_replicas of them, or between
    min_replicas and max_replicas as Ray Serve's autoscaler sees their queues)."""
    engine_options = dict(engine_options or {})
    settings = settings or ServerSettings(model_name=model)
    scaling = {"num_replicas": num_replicas}
    if min_replicas is not None or max_replicas is not None:
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=min_replicas or 1, max_replicas=max_replicas or min_replicas or 1,
            target_ongoing_requests=engine_options.get("max_num_seqs", 64))}
    per_replica = engine_options.get("max_num_seqs", 64) + settings.max_waiting_requests
    replica = serve.deployment(
        EngineReplica, name="nimblelm-engine",
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=per_replica,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
        **scaling,
    ).bind(model, engine_options, settings)
    # The ingress only forwards bytes: it reserves no CPU, so the replicas can take every core, and it holds as
    # many requests as every replica may (Ray Serve's default of 5 would cap each engine's batch).
    most = max_replicas or num_replicas or min_replicas or 1
    return serve.deployment(Ingress, name="nimblelm-ingress", ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=most * per_replica).bind(replica)
