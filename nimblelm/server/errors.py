"""Every failure as OpenAI's error body, {"error": {"message", "type", "param", "code"}}, with its status.

Handlers raise APIError (or let an InvalidRequestError from the engine's validation through); the
exception handlers here turn those, FastAPI's validation errors and Starlette's 404/405 into the
OpenAI shape, so that no client ever sees FastAPI's own {"detail": ...}.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from nimblelm.errors import InvalidRequestError, NimbleLMError
from nimblelm.server.async_engine import EngineDeadError, ServerOverloadedError

logger = logging.getLogger("nimblelm.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def as_api_error(exc: BaseException) -> APIError:
    """The APIError a failure shows to the client, also when it happens in the middle of a stream."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, ServerOverloadedError):
        return APIError(503, str(exc), "server_error", code="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "server_error", code="engine_unavailable")
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}", "server_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """A pydantic error location as an OpenAI param ("messages.0.role"), without "body" and union tags."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or (p not in _TYPE_TAGS and not any(c in p for c in "[-"))]
    return ".".join(parts) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                        code="invalid_json")
    param = _param(tuple(first["loc"]))
    if param is None and first["type"] == "model_attributes_type":
        return APIError(400, "the request body must be a JSON object, sent with Content-Type: application/json",
                        code="invalid_type")
    if first["type"] == "missing":
        message, code = f"missing required parameter: {param}", "missing_required_parameter"
    elif param is None:
        message, code = f"the request body is invalid: {first['msg']}", "invalid_type"
    else:
        kind = "invalid_type" if first["type"].endswith(("_type", "_parsing")) else "invalid_value"
        message, code = f"invalid value for {param}: {first['msg']}", kind
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code=code)


def install(app: FastAPI, on_error=None) -> None:
    """Register the handlers; `on_error(status)` is told of every error response (for metrics)."""

    def respond(error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(error.status)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        return respond(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message, code = str(exc.detail), codes.get(exc.status_code)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's, e.g. bad UTF-8
            message, code = "the request body could not be parsed: send UTF-8 JSON", "invalid_json"
        return respond(APIError(exc.status_code, message, code=code, headers=exc.headers))

    @app.exception_handler(APIError)
    @app.exception_handler(NimbleLMError)
    async def known(request: Request, exc: Exception):
        return respond(as_api_error(exc))

    # A bug: Starlette answers through this handler, then re-raises so the traceback is logged.
    @app.exception_handler(Exception)
    async def other(request: Request, exc: Exception):
        return respond(as_api_error(exc))
