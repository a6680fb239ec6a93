"""Property-based fuzzing of every operation in the OpenAPI schema, as admin: no 5xx, and every
documented response matches its schema. Bounded (25 examples per operation) to run in a few
minutes on two cores.

The app is built at import: schemathesis' `from_fixture` does not work with pytest 9 here."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.api.conftest import make_api

FUZZED = make_api(Path(tempfile.mkdtemp(prefix="goldilocks-api-fuzz-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZED.app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {FUZZED.tokens['admin']}"},
                           checks=[not_a_server_error, response_schema_conformance])
