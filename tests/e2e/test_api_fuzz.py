"""The REST API fuzzed from its own OpenAPI description (schemathesis), against the real daemon.

For every operation, schema-conforming and schema-violating requests (hypothesis, a few
examples each so the whole run stays well under a minute):
- no 500, and the response matches what the OpenAPI document declares (status, content type,
  body schema); schema-violating requests are rejected with a 4xx;
- a rejected request (4xx) changes nothing: the PDs, pools, LDs, volumes and alerts read the
  same before and after it;
- the daemon is still serving afterwards, and stops cleanly (exit 0).

Twice: without tokens (the loopback default: anonymous is an admin) and with an operator token
against a daemon that demands one (admin-only operations answer 403, which the document declares).

Left out: ``POST /pds`` with generated paths, which would create sparse files wherever the
fuzzer points (the daemon runs as root here); its validation is tested in
tests/unit/test_api_app.py.  Without tokens, ``POST /tokens`` too: the first token created makes
the API demand one (tests/unit/test_api_auth.py), which would lock the rest of the run out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.daemon import SMALL_CONFIG, Daemon, running_daemon

pytestmark = pytest.mark.e2e

EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 6}
# With a token, fewer: the operations are the same, what differs is the gate's answer.
TOKEN_EXAMPLES = {GenerationMode.POSITIVE: 4, GenerationMode.NEGATIVE: 3}
SKIPPED = {("POST", "/api/v1/pds")}
SKIPPED_WITHOUT_TOKENS = {("POST", "/api/v1/tokens")}
ADMIN_TOKEN = "fuzz-admin-token"
STATE = ("/pds", "/pools", "/lds", "/volumes", "/alerts?all=true", "/tokens")


@pytest.fixture(params=[False, True], ids=["without-tokens", "operator-token"])
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    with_tokens = request.param
    config = SMALL_CONFIG + (f'[api]\ntoken = "{ADMIN_TOKEN}"\n' if with_tokens else "")
    with running_daemon(
        tmp_path, config=config, token=ADMIN_TOKEN if with_tokens else None, clean_stop=True
    ) as d:
        yield d


def test_fuzz_the_api_from_its_openapi(daemon: Daemon) -> None:
    # Something of everything for the fuzzer to meet: a second pool and volume with limits.
    daemon.cli_json("pool", "create", "silver", "--raid", "0", "--growth-limit", "64MiB")
    daemon.cli_json("vv", "create", "thin", "--pool", "silver", "--size", "1GiB", "--alloc-limit", "50%")
    headers: dict[str, str] = {}
    skipped = set(SKIPPED)
    examples = EXAMPLES
    if daemon.token:
        operator = daemon.cli_json("token", "create", "fuzzer", "--role", "operator")
        headers = {"Authorization": f"Bearer {operator['token']}"}
        examples = TOKEN_EXAMPLES
    else:
        skipped |= SKIPPED_WITHOUT_TOKENS

    with daemon.http() as client:
        schema = schemathesis.openapi.from_dict(client.get("/api/v1/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 28
    state_client = daemon.http()

    def snapshot() -> list[Any]:
        # The forecast is derived from the clock (its window grows): not state a request changes.
        return [_without_forecast(state_client.get(f"/api/v1{path}").json()) for path in STATE]

    tried = 0
    for operation in operations:
        if (operation.method.upper(), operation.path) in skipped:
            continue
        for mode, count in examples.items():
            tried += _fuzz_operation(daemon, operation, mode, count, headers, snapshot)
    state_client.close()
    assert tried >= 40

    # Still serving, still consistent.
    assert daemon.running
    status = daemon.cli_json("status")
    assert status["pools"] >= 1
    assert "Traceback" not in daemon.log_text() and "api-internal-error" not in daemon.log_text()


def _without_forecast(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_forecast(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_forecast(v) for k, v in value.items() if k not in ("forecast", "forecasts")}
    return value


def _fuzz_operation(
    daemon: Daemon, operation: Any, mode: GenerationMode, count: int, headers: dict[str, str], snapshot: Any
) -> int:
    """Fuzz one operation in one mode; 1 if it ran, 0 when no request of that mode exists
    (an operation without parameters has no schema-violating request)."""
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    if mode == GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        before = snapshot()
        response = case.call(base_url=daemon.api_url, headers=headers)
        case.validate_response(response, checks=checks)
        if 400 <= response.status_code < 500:
            assert snapshot() == before, f"{case.method} {case.formatted_path} was refused but changed state"

    try:
        fuzz()
    except Unsatisfiable:
        if mode == GenerationMode.POSITIVE:
            raise
        return 0
    return 1
