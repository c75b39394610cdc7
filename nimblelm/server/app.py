"""The FastAPI application: routes, API key and body-size checks, and the engine loop's lifetime.

Routes only parse, call OpenAIServing, and return a body or an SSE stream. A client that goes away
gets its request aborted: a stream's generator is closed when the response ends however it ends,
and a non-streaming request races its result against the client's disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nimblelm.engine.llm_engine import LLMEngine
from nimblelm.prompting.scorer import SCORER_MODEL
from nimblelm.server import errors
from nimblelm.server.async_engine import AsyncEngine, EngineThread
from nimblelm.server.errors import APIError
from nimblelm.server.metrics import CONTENT_TYPE, ServerMetrics
from nimblelm.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from nimblelm.server.serving import OpenAIServing

PUBLIC_PATHS = ("/health", "/metrics")  # answered without the API key: probes and scrapers


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 4 << 20
    max_waiting_requests: int = 256
    shutdown_timeout: float = 10.0
    prompt_compression_scorer: str = SCORER_MODEL  # the model requests' prompt_compression scores with


def build_app(engine: LLMEngine, settings: ServerSettings, on_ready: Callable[[], None] | None = None,
              engine_thread: EngineThread | None = None, prefill=None) -> FastAPI:
    """`engine_thread`: the thread that built `engine` (its loop then runs there too). `prefill`: a prefill
    instance that computes every prompt before `engine` generates from it (AsyncEngine)."""
    metrics = ServerMetrics(settings.model_name)
    async_engine = AsyncEngine(engine, metrics, settings.max_waiting_requests, engine_thread, prefill)
    serving = OpenAIServing(async_engine, settings.model_name, settings.prompt_compression_scorer)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await async_engine.stop()

    app = FastAPI(title="nimblelm", version=_version() or "dev", lifespan=lifespan,
                  summary="OpenAI-compatible LLM inference server")
    app.state.engine = async_engine
    app.state.metrics = metrics
    errors.install(app, on_error=metrics.rejected)
    app.add_middleware(_BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(_APIKey, api_key=settings.api_key)

    error_responses = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health():
        if not async_engine.is_alive:
            raise APIError(503, "the engine loop is not running", "server_error", code="engine_unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/props")
    async def props():
        """The effective settings: the engine's after defaults were filled in, and the server's limits."""
        config = engine.config
        return {
            "model": settings.model_name,
            "engine": asdict(config) | {
                "dtype": str(engine.dtype).removeprefix("torch."),
                "device": str(engine.device),
                "num_threads": engine.num_threads,
                "num_kv_blocks": engine.kv_cache_manager.num_blocks,
                "vocab_size": engine.model_config.vocab_size,
            },
            "server": {
                "host": settings.host,
                "port": settings.port,
                "api_key_required": bool(settings.api_key),
                "max_request_bytes": settings.max_request_bytes,
                "max_waiting_requests": settings.max_waiting_requests,
                "shutdown_timeout": settings.shutdown_timeout,
            },
            "structured_output": {"backend": "llguidance", "available": serving.structured is not None},
            "version": _version(),
        }

    def card() -> ModelCard:
        return ModelCard(id=settings.model_name, created=created, max_model_len=engine.config.max_model_len)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def get_model(model_id: str):
        serving.check_model(model_id)
        return card()

    @app.post("/tokenize", response_model=TokenizeResponse, responses=error_responses)
    async def tokenize(body: TokenizeRequest):
        return serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses)
    async def detokenize(body: DetokenizeRequest):
        return serving.detokenize(body)

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info():
        return serving.tokenizer_info()

    sse = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true"}}

    @app.post("/v1/completions", response_model=Completion, responses=error_responses | sse)
    async def completions(body: CompletionRequest, request: Request):
        body = await serving.compressed(body)
        request_id, streams, params = serving.completion_streams(body)
        if body.stream:
            return _EventStream(serving.completion_stream(body, request_id, streams, params))
        return await _unless_disconnected(request, serving.completion(body, request_id, streams))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=error_responses | sse)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body = await serving.compressed(body)
        if body.output_organization == "skeleton":
            plan = serving.skeleton_plan(body)
            if body.stream:
                return _EventStream(serving.skeleton_chat_stream(body, plan))
            return await _unless_disconnected(request, serving.skeleton_chat(body, plan))
        request_id, streams, params = serving.chat_streams(body)
        if body.stream:
            return _EventStream(serving.chat_stream(body, request_id, streams, params))
        return await _unless_disconnected(request, serving.chat(body, request_id, streams))

    _openapi_without_422(app)
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; validation errors here are OpenAI's 400s, so drop it."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


class _EventStream(StreamingResponse):
    """An SSE response whose generator is closed when the response ends, however it ends (the client
    gone included): closing it closes the request's stream, which aborts the request at once."""

    media_type = "text/event-stream"

    def __init__(self, content):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(request: Request, work):
    """The result of `work`, unless the client disconnects first: then `work` is cancelled (which
    aborts its requests) and nobody is left to read a response."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)  # nginx's "client closed request"; no one reads it
    return task.result()


class _BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413, by Content-Length up front or by counting as they arrive."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(APIError(413, message, code="request_too_large").body(), 413)(
                scope, receive, send
            )
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)  # FastAPI passes HTTPExceptions from body reading through
            return msg

        await self.app(scope, limited_receive, send)


class _APIKey:
    """Every route but PUBLIC_PATHS needs `Authorization: Bearer <key>`; checked before the body is read."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                error = APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return await JSONResponse(error.body(), 401)(scope, receive, send)
        await self.app(scope, receive, send)


def _version() -> str | None:
    try:
        return metadata.version("nimblelm")
    except metadata.PackageNotFoundError:
        return None
