"""Schemathesis against the live ``/openapi.json``: every route, valid and invalid inputs.

Every check ``st run --checks all`` runs (among them: no 5xx; every status, content type,
header and body, stream events included, as the schema declares; schema-invalid requests
refused, schema-valid ones accepted), plus OpenAI's error shape on every error. Bounded: a
low GUARD_MAX_NEW_TOKENS, a fixed number of examples per operation and a deterministic
seed, so it runs in about a minute on two cores. The other limits are the defaults, as
an independent run against ``hguard serve`` would meet them.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.checks import load_all_checks, not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    object_level_authorization,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
)

from guard.api.app import create_app
from guard.generation import GuardedModel
from guard.settings import GuardSettings
from tests.fixtures.servers import serve_in_thread
from tests.hardening.helpers import is_openai_error

EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def fuzz_url(tiny_guarded: GuardedModel) -> Iterator[str]:
    settings = GuardSettings(max_new_tokens=3)
    app = create_app(settings, guarded=tiny_guarded, registry=CollectorRegistry())
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {"generation": {"mode": "all", "deterministic": True, "database": "none"}}
    )
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", config=config)


def openai_error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Every 4xx/5xx carries OpenAI's ``{"error": {...}}`` body."""
    if response.status_code >= 400:
        body = response.json()
        if not is_openai_error(body):
            raise AssertionError(f"{response.status_code} without OpenAI's error shape: {body}")
    return None


SCHEMATHESIS_CHECKS = [  # what `st run --checks all` runs
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_headers_conformance, response_schema_conformance, negative_data_rejection,
    positive_data_acceptance, missing_required_header, unsupported_method,
    allow_header_conformance, use_after_free, ensure_resource_availability, ignored_auth,
    object_level_authorization,
]  # fmt: skip
CHECKS = [*SCHEMATHESIS_CHECKS, openai_error_shape]


def test_every_schemathesis_check_is_run() -> None:
    load_all_checks()
    names = {check.__name__ for check in SCHEMATHESIS_CHECKS}
    assert names == set(REGISTERED_CHECKS.get_all_names())


EXPECTED_ROUTES = {
    "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
    "GET /v1/models/{model_id}", "POST /v1/guard/score", "GET /healthz", "GET /readyz",
    "GET /metrics",
}  # fmt: skip


def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode) -> str | None:
    """Run one operation's examples; the first failure's description, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.generate],
    )  # fmt: skip
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    try:
        run()
    except Unsatisfiable:  # no parameters to make invalid (e.g. GET /healthz, negative mode)
        return None
    except (Exception, BaseExceptionGroup) as exc:  # every operation runs; report them all
        return f"{operation.label} ({mode.value}): {exc}"
    return None


def test_fuzz_every_route(api_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= EXPECTED_ROUTES
    failures = [
        failure
        for op in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if (failure := fuzz(op, mode)) is not None
    ]
    assert not failures, "\n\n".join(failures)


def test_server_still_serves_after_fuzzing(fuzz_url: str) -> None:
    response = httpx.get(f"{fuzz_url}/v1/models", timeout=10)
    model = response.json()["data"][0]["id"]
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(f"{fuzz_url}/v1/chat/completions", json=chat, timeout=30).status_code == 200
