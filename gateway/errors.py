"""Every error the client sees, mapped once to OpenAI's body and status.

Body shape: ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.

Gateway error tree (adapter errors, see ``adapters/base.py``, map onto it by type)::

    GatewayError                                  status  type
     ├── RequestInvalid                           400     invalid_request_error
     ├── Unauthorized                             401     invalid_request_error / invalid_api_key
     ├── ModelNotFound                            404     invalid_request_error / model_not_found
     ├── RouteNotFound / MethodNotAllowed         404/405 invalid_request_error
     ├── RateLimited       (adapters.Overloaded)  429     rate_limit_error (+ Retry-After)
     ├── ServiceUnavailable (ModelUnavailable)    503     server_error
     └── InternalError     (anything else)        500     server_error, generic message

Nothing here reads exception message text to decide anything; only types are matched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from adapters.base import AdapterError, InvalidRequest, ModelUnavailable, Overloaded
from gateway.request_ids import HEADER as REQUEST_ID

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
#: nginx's code for "client closed the request"; nobody reads it, it only shows in access logs.
CLIENT_CLOSED = 499
SERVER_ERROR = "server_error"


class GatewayError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status_code = 500
    error_type = SERVER_ERROR

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class RequestInvalid(GatewayError):
    status_code = 400
    error_type = INVALID_REQUEST


class Unauthorized(GatewayError):
    """A missing or wrong API key (OpenAI's body and code for both)."""

    status_code = 401
    error_type = INVALID_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = INVALID_REQUEST

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


class RouteNotFound(GatewayError):
    status_code = 404
    error_type = INVALID_REQUEST


class MethodNotAllowed(GatewayError):
    status_code = 405
    error_type = INVALID_REQUEST


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"


class ServiceUnavailable(GatewayError):
    status_code = 503
    error_type = SERVER_ERROR


class InternalError(GatewayError):
    status_code = 500
    error_type = SERVER_ERROR

    def __init__(self) -> None:
        super().__init__(
            "The server had an error while processing your request. Sorry about that!",
            code="internal_error",
        )


class FieldError(ValueError):
    """Raised by a cross-field check of the wire schema to name its field: pydantic reports
    model-level errors without a location, so :func:`from_validation` reads ``param`` from it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------- mapping


def from_exception(exc: BaseException) -> GatewayError:
    """Map any exception to the error the client sees (unexpected ones are logged here)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, InvalidRequest):
        return RequestInvalid(exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, Overloaded):
        seconds = max(1, math.ceil(exc.retry_after))
        return RateLimited(exc.message, code=exc.code, headers={"Retry-After": str(seconds)})
    if isinstance(exc, ModelUnavailable):
        return ServiceUnavailable(exc.message, code=exc.code or "model_unavailable")
    if isinstance(exc, AdapterError):
        logger.error("model error: %s", exc.message, exc_info=exc)
        return InternalError()
    logger.error("unhandled error", exc_info=exc)
    return InternalError()


def from_validation(err: ValidationError) -> RequestInvalid:
    """A pydantic error -> 400 naming the first offending field in OpenAI's ``param`` style."""
    errors = err.errors(include_url=False)
    if not errors:
        return RequestInvalid("Invalid request body.")
    first = errors[0]
    if first["type"] == "json_invalid":
        return RequestInvalid(
            "We could not parse the JSON body of your request. The request body must be a "
            f"valid JSON object ({first['msg']}).",
            code="invalid_json",
        )
    # Report one field.  A union (content: string | parts) gives one error per member: the
    # deepest ones are the most specific ("messages.[0].content.[1].type"), the rest is noise.
    field = first["loc"][:1]
    same_field = [e for e in errors if e["loc"][:1] == field]
    depth = max(len(e["loc"]) for e in same_field)
    chosen = [e for e in same_field if len(e["loc"]) == depth]
    param = _param(chosen[0])
    if chosen[0]["type"] == "missing":
        return RequestInvalid(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    messages = _dedupe(_message(e) for e in chosen if _param(e) == param)
    where = f"Invalid '{param}': " if param else "Invalid request: "
    return RequestInvalid(where + "; or ".join(messages), param=param, code="invalid_value")


def _field_error(error: Any) -> FieldError | None:
    found = (error.get("ctx") or {}).get("error")
    return found if isinstance(found, FieldError) else None


def _param(error: Any) -> str | None:
    field_error = _field_error(error)
    loc = list(error["loc"])
    if field_error is not None:
        loc.append(field_error.param)
    return _loc_to_param(loc)


def _message(error: Any) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ValueError):  # our validators' own sentence, without pydantic's prefix
        return str(cause)
    return str(error["msg"])


# pydantic names union members in ``loc`` ("str", "list[TextContentPart]", "function-after[..]");
# they are not request fields, so they are left out of the parameter path.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _loc_to_param(loc: Sequence[int | str]) -> str | None:
    """``("messages", 0, "role")`` -> ``"messages.[0].role"`` (OpenAI's own param format)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if item in _TYPE_TAGS or not item.replace("_", "").isalnum() or item[:1].isupper():
            continue
        parts.append(item)
    return ".".join(parts) or None


def _dedupe(items: Any) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


# --------------------------------------------------------------------------- handlers


def _methods(routes: Sequence[Any], scope: MutableMapping[str, Any]) -> set[str]:
    """The methods of every route whose path matches ``scope`` (included routers too)."""
    methods: set[str] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's included-router wrapper
        if inner is not None:
            methods |= _methods(inner.routes, scope)
        elif route.matches(scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return methods


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise to OpenAI's error body (never FastAPI's 422)."""

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        response = from_exception(exc).response()
        # An unhandled error is answered outside every middleware: name the request here too.
        request_id = request.scope.get("state", {}).get("request_id")
        if request_id is not None:
            response.headers[REQUEST_ID] = request_id
        return response

    async def on_request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _request_validation(exc).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        route = f"{request.method} {request.url.path}"
        error: GatewayError
        if exc.status_code == 404:
            error = RouteNotFound(f"Unknown request URL: {route}.", code="unknown_url")
        elif exc.status_code == 405:
            error = MethodNotAllowed(
                f"Method {request.method} is not allowed for {request.url.path}.",
                code="method_not_allowed",
                headers={**dict(exc.headers or {}), "Allow": _allowed(request)},
            )
        else:
            error = GatewayError(str(exc.detail), headers=dict(exc.headers or {}))
            error.status_code = exc.status_code
            error.error_type = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return error.response()

    def _allowed(request: Request) -> str:
        # Starlette names only the first route whose path matches; "/" has GET (the web page)
        # and POST (ChatGLM's API) in two routes, and a client needs both.
        return ", ".join(sorted(_methods(app.router.routes, request.scope)))

    async def on_client_disconnect(request: Request, exc: Exception) -> Response:
        # The client left while sending its body: nothing to answer, nothing went wrong here.
        logger.info("client left during the upload of %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    app.add_exception_handler(ClientDisconnect, on_client_disconnect)
    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(AdapterError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Registered for Exception, Starlette runs this in its outermost middleware and then
    # re-raises so the server logs the traceback too.
    app.add_exception_handler(Exception, on_gateway_error)


def _request_validation(exc: RequestValidationError) -> RequestInvalid:
    errors = list(exc.errors())
    if not errors:
        return RequestInvalid("Invalid request.")
    first = dict(errors[0])
    # FastAPI puts where the value came from first: ("path", "model_id"), ("query", ...).
    if first["loc"][:1] and first["loc"][0] in _FASTAPI_SOURCES:
        first["loc"] = tuple(first["loc"][1:])
    param = _param(first)
    return RequestInvalid(f"Invalid '{param}': {_message(first)}", param=param,
                          code="invalid_value")


_FASTAPI_SOURCES = frozenset({"body", "path", "query", "header", "cookie"})
