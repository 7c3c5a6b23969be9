"""An update is kept and retried until the task's deadline, and a stored update is never logged as an error.

The protocol (docs/agent-protocol.md, section 5) says to keep an update's bytes until a 2xx; uploads are
idempotent per task, so retrying through a server restart is safe.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from fedagent import FederatedClient
from fedagent.errors import AgentApiError, AgentConnectionError
from fedagent.http import AgentHttpClient
from fedagent.tests import clients
from fedagent.tests.conftest import DIGITS_SPEC
from fedagent.tests.fake_server import FakeAgentServer, Scripted, error_body
from flcore.parameters import Parameters

Digits = tuple[np.ndarray, np.ndarray]


def make_client(server: FakeAgentServer, data: Digits, **kwargs: object) -> FederatedClient:
    """Two attempts per request unless a test says otherwise: the upload must outlast them."""
    return clients.make_client(server, data, **{"max_attempts": 2, **kwargs})


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_upload_outlasts_max_attempts_until_it_lands(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters, caplog: pytest.LogCaptureFixture
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    upload_path = f"/api/v1/agent/tasks/{task['task_id']}/update"
    fake_server.script("POST", upload_path, *[Scripted(503, error_body("busy", "Restarting."))] * 6)

    with caplog.at_level(logging.INFO), make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded", outcome
    # 6 refusals and the 7th lands, although the client allows only 2 attempts per ordinary request
    assert len(fake_server.requests_to("POST", upload_path)) == 7
    assert fake_server.uploads[task["task_id"]].sha256 == outcome.update_sha256
    assert errors_logged(caplog) == []


def test_model_download_outlasts_max_attempts_until_the_task_deadline(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters, caplog: pytest.LogCaptureFixture
) -> None:
    """A server restarting for longer than the back-off of ``max_attempts`` must not cost the agent its task
    (in a secure-aggregation round one agent's lost task fails the whole attempt)."""
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    fake_server.script("GET", model["url"], *[Scripted(503, error_body("busy", "Restarting."))] * 6)

    with caplog.at_level(logging.INFO), make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded", outcome
    # 6 refusals and the 7th is the model, although the client allows only 2 attempts per ordinary request
    assert len(fake_server.requests_to("GET", model["url"])) == 7
    assert task["task_id"] in fake_server.uploads
    assert errors_logged(caplog) == []


def test_upload_gives_up_only_at_the_task_deadline(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters
) -> None:
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    deadline = datetime.now(UTC) + timedelta(seconds=1.5)
    task = fake_server.add_task(model, deadline=deadline.isoformat())
    upload_path = f"/api/v1/agent/tasks/{task['task_id']}/update"
    fake_server.script(
        "POST", upload_path, *[Scripted(503, error_body("busy", "Later."), {"Retry-After": "0.2"})] * 1000
    )

    with make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "rejected"
    assert datetime.now(UTC) >= deadline  # it did not give up before the deadline
    assert len(fake_server.requests_to("POST", upload_path)) > 2
    assert task["task_id"] not in fake_server.uploads


def test_update_conflict_means_the_task_already_has_its_update(
    fake_server: FakeAgentServer, digits: Digits, global_params: Parameters, caplog: pytest.LogCaptureFixture
) -> None:
    """409 update_conflict: an earlier upload of this agent was stored; the server keeps it. Not an error."""
    model = fake_server.add_model(global_params, DIGITS_SPEC)
    task = fake_server.add_task(model)
    upload_path = f"/api/v1/agent/tasks/{task['task_id']}/update"
    fake_server.script(
        "POST",
        upload_path,
        Scripted(409, error_body("update_conflict", "Already accepted.", accepted_sha256="ab" * 32)),
    )

    with caplog.at_level(logging.INFO), make_client(fake_server, digits) as client:
        outcome = client.run_one()

    assert outcome is not None and outcome.status == "uploaded"
    assert outcome.update_sha256 == "ab" * 32 and "already stored" in outcome.detail
    assert fake_server.failures == []  # the task is not given back
    assert errors_logged(caplog) == []


def test_retry_until_outlasts_connection_errors_and_caps_waits_at_the_deadline() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= 8:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"task_id": "t", "status": "accepted", "sha256": "00" * 32})

    http = AgentHttpClient(
        "http://fedsite.invalid",
        "t",
        max_attempts=2,
        backoff_base=0.001,
        backoff_max=0.01,
        transport=httpx.MockTransport(handler),
    )
    with http:
        receipt = http.upload_update(
            "tasks/t/update", b"bytes", {"num_examples": 1}, deadline=datetime.now(UTC) + timedelta(minutes=5)
        )
    assert receipt.sha256 == "00" * 32 and len(calls) == 9
    assert all(call.content == b"bytes" for call in calls)  # the same body every time


def test_retry_after_beyond_the_deadline_is_cut_to_it() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, headers={"Retry-After": "3600"}, json={"error": {"code": "busy"}})

    sleeps: list[float] = []
    http = AgentHttpClient(
        "http://fedsite.invalid", "t", max_attempts=2, transport=httpx.MockTransport(handler)
    )
    real_sleep = http._sleep

    def record(seconds: float) -> None:
        sleeps.append(seconds)
        real_sleep(seconds)

    http._sleep = record  # type: ignore[method-assign]
    with http, pytest.raises(AgentApiError) as caught:
        http.upload_update(
            "tasks/t/update", b"x", {"num_examples": 1}, deadline=datetime.now(UTC) + timedelta(seconds=1)
        )
    assert caught.value.status == 503
    # one wait, cut from the server's hour to what was left of the second, then a last attempt at the deadline
    assert len(sleeps) == 1 and sleeps[0] <= 1.0
    assert len(calls) == 2


def test_without_a_deadline_uploads_keep_the_attempt_limit() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    http = AgentHttpClient(
        "http://fedsite.invalid",
        "t",
        max_attempts=3,
        backoff_base=0.001,
        transport=httpx.MockTransport(handler),
    )
    with http, pytest.raises(AgentConnectionError, match="after 3 attempt"):
        http.upload_update("tasks/t/update", b"x", {"num_examples": 1})
    assert len(calls) == 3
