"""``/openapi.json`` describes the API as it is, and a schema-driven fuzzer (schemathesis) finds
no server error and no answer that breaks the schema, against a live server on the demo model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import checks

from adapters.demo import ensure_demo_checkpoint
from gateway.app import create_app
from gateway.settings import ModelEntry, ServerSettings
from tests.server import running_server


def test_the_schema_is_valid_and_complete() -> None:
    schema = create_app(ServerSettings(), models={}).openapi()
    validate(schema)  # OpenAPI 3.x, by openapi-spec-validator
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/completions", "CompletionRequest"), ("/", "ChatGLMRequest")):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(operation["responses"])
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "response_format", "structured_outputs", "tools", "top_k"} <= set(request)
    for methods in schema["paths"].values():
        for operation in methods.values():
            assert "422" not in operation["responses"]
    assert "text/event-stream" in \
        schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/"):
        headers = schema["paths"][path]["post"]["parameters"]
        assert [(h["name"], h["in"]) for h in headers] == [("X-Session-Id", "header")]
    assert "prompt_cache_key" in request


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = ensure_demo_checkpoint(tmp_path_factory.mktemp("demo"))
    settings_ = ServerSettings(max_running=4, max_waiting=4, models=(
        ModelEntry(id="demo", path=folder, dtype="float32", device="cpu",
                   defaults={"max_tokens": 8}),))  # type: ignore[arg-type]
    with running_server(create_app(settings_), timeout=60, wait_ready=True) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(live_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live_url}/openapi.json")


#: No 5xx; status, content type, headers and body as documented.  Not "positive data
#: acceptance": a schema cannot say everything a request is checked for (a 'tool' message needs
#: content, a model must exist), so a schema-valid body may still be a documented 400.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance,
          checks.response_headers_conformance]


def test_no_server_error_and_no_schema_violation(api_schema: schemathesis.BaseSchema) -> None:
    """Every operation, fuzzed with bodies and parameters generated from the schema (valid and
    invalid), gets no 5xx and no answer outside what the schema documents."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(timeout=60, checks=CHECKS)

        fuzz()
