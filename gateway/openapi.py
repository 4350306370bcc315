"""``/openapi.json`` as the API really is, for schema-driven tools (client generators, fuzzers).

The model routes read their body themselves (``validated()``: one 400 in OpenAI's shape instead
of FastAPI's 422), so FastAPI cannot see it; this module writes what FastAPI would have: the
request body of every POST route (the real pydantic models, extensions included), the success
response (JSON, and SSE for ``stream: true``), and every error status a route can return, with
OpenAI's error body.  FastAPI's 422, which never happens, is removed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway import affinity
from gateway import protocol as p
from gateway import responses_protocol as responses

#: (path, request model, response model, streams?)
_BODIES: tuple[tuple[str, type[BaseModel], type[BaseModel], bool], ...] = (
    ("/v1/chat/completions", p.ChatCompletionRequest, p.ChatCompletion, True),
    ("/v1/completions", p.CompletionRequest, p.Completion, True),
    ("/v1/responses", responses.ResponsesRequest, responses.Response, True),
    ("/tokenize", p.TokenizeRequest, p.TokenizeResponse, False),
    ("/detokenize", p.DetokenizeRequest, p.DetokenizeResponse, False),
    ("/", p.ChatGLMRequest, p.ChatGLMResponse, False),
)

#: The routes that generate, which read a routing key from the header (``gateway/affinity.py``)
_GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/")
_SESSION_HEADER = {
    "name": affinity.HEADER, "in": "header", "required": False,
    "description": "The conversation's name: with several replicas (--ray), requests with the "
                   "same one go to the same replica. Takes precedence over prompt_cache_key and "
                   "user; a value that is not 1-128 visible ASCII characters is ignored.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"},
}
#: What every request can be answered besides its success (guards, auth, limits).
_COMMON_ERRORS = {
    "401": "No or a wrong API key (only when keys are configured).",
    "403": "A state-changing request from a foreign Origin.",
    "413": "The request body is larger than --max-request-bytes.",
    "421": "A Host header that is not served (DNS-rebinding protection).",
    "431": "Too many or too large headers.",
}
#: Statuses of the other routes besides success and the common ones.
_ROUTE_ERRORS = {
    "/ready": {"503": "A model is loading or failed to load, or the server is draining."},
    "/v1/models/{model_id}": {"404": "Unknown model."},
}
#: What a model route can answer besides those.
_MODEL_ERRORS = {
    "400": "Invalid request: a malformed body, a value out of range, a conversation the model "
           "cannot take, context_length_exceeded, a grammar that does not compile.",
    "404": "Unknown model.",
    "429": "The model is at capacity (Retry-After says when to retry).",
    "499": "The client left before the answer was complete (no body; logs and metrics only).",
    "500": "An internal fault (a generic message).",
    "503": "Models still loading, or the server draining on shutdown.",
}


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the completed schema (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    schemas: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})

    def ref(model: type[BaseModel]) -> dict[str, str]:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = ref(p.ErrorResponse)
    for path, request, response, streams in _BODIES:
        operation = schema["paths"][path]["post"]
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": ref(request)}}}
        content: dict[str, Any] = {"application/json": {"schema": ref(response)}}
        if streams:
            content["text/event-stream"] = {"schema": {
                "type": "string", "description": "With stream: true, Server-Sent Events: one "
                "chunk object per 'data:' line, then 'data: [DONE]'."}}
        operation["responses"] = {"200": {"description": "The answer.", "content": content}}
        operation["responses"].update({
            code: _error(text, error) for code, text in _MODEL_ERRORS.items()})
        if path in _GENERATING:
            operation.setdefault("parameters", []).append(_SESSION_HEADER)
    for path, methods in schema["paths"].items():
        for operation in methods.values():
            operation["responses"].pop("422", None)
            for code, text in _ROUTE_ERRORS.get(path, {}).items():
                operation["responses"][code] = _error(text, error)
            for code, text in _COMMON_ERRORS.items():
                operation["responses"].setdefault(code, _error(text, error))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return schema


def _error(description: str, error: dict[str, str]) -> dict[str, Any]:
    if description.startswith("The client left"):
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": error}}}
