"""Schema fuzzing: schemathesis against the live OpenAPI schema of a real server, as operator and agent.

A live ASGI server and Celery worker on the test database (the e2e stack); the schema is read from the
server itself. Every operation gets a bounded number of generated requests (``FEDSITE_FUZZ_EXAMPLES``,
default 12; seeded, so a run repeats): the agent protocol's with an agent's token, the rest with an
operator's token. Every answer must be a non-5xx whose status, content type and body the schema
documents.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import checks

from tests.test_end_to_end import live_stack  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FEDSITE_FUZZ_EXAMPLES", "12"))
AGENT_TAG = "agent protocol"
# Operations whose success would end the fuzzing identity or the server's state for the rest of the run.
SKIPPED = {
    ("POST", "/api/v1/agents/{agent_id}/rotate_token/"),
    ("POST", "/api/v1/agents/{agent_id}/disable/"),
    ("POST", "/api/v1/agents/{agent_id}/quarantine/"),
}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def _credentials() -> tuple[str, str, Any]:
    from django.contrib.auth import get_user_model

    from clients.services import agent_create, agent_touch, operator_token_create
    from trainings.configuration import TrainingConfiguration
    from trainings.services import training_create_and_start

    get_user_model().objects.create_user("fuzz-operator", password="fuzz-operator-password", is_staff=True)
    _, operator_token = operator_token_create(username="fuzz-operator", expires_in_days=1, actor="test")
    agent, agent_token = agent_create(agent_id="fuzz-agent")
    agent_touch(agent=agent)
    other, _ = agent_create(agent_id="fuzz-agent-2")
    agent_touch(agent=other)
    training = training_create_and_start(
        configuration=TrainingConfiguration.from_dict(
            {
                "name": "fuzzed",
                "model_type": "logreg",
                "input_dim": 4,
                "num_classes": 3,
                "min_clients_per_round": 2,
                "max_clients_per_round": 2,
                "max_rounds": 3,
            }
        )
    )
    return operator_token, agent_token, training


def _fuzzer(operation: Any, base: str, headers: dict[str, str]) -> Any:
    """A seeded Hypothesis test of one operation: call the live server, check the answer."""

    @seed(20261201)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        response = case.call(base_url=base, headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS)

    return run


def test_fuzzing_the_live_schema_finds_no_server_error_and_no_undocumented_answer(live_stack):  # noqa: F811
    operator_token, agent_token, _training = _credentials()
    operator = {"Authorization": f"Token {operator_token}"}
    agent = {"Authorization": f"Bearer {agent_token}"}
    base = live_stack["base"]
    raw = httpx.get(f"{base}/api/schema/?format=json", headers=operator, timeout=30)
    assert raw.status_code == 200, raw.text[:500]
    schema = schemathesis.openapi.from_dict(raw.json())

    failures: list[str] = []
    tested = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        headers = agent if AGENT_TAG in (operation.tags or []) else operator
        tested += 1

        run = _fuzzer(operation, base, headers)
        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, reported together
            parts = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
            detail = "\n".join(str(part)[:800] for part in parts)
            failures.append(f"{operation.method.upper()} {operation.path}:\n{detail}")

    assert tested > 20
    assert failures == [], "\n\n".join(failures)
