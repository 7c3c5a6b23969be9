"""AgentHttpClient: retries, Retry-After, error shape, origin check."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import httpx
import pytest

from fedagent.errors import AgentApiError, AgentConnectionError, ProtocolError
from fedagent.http import AgentHttpClient, parse_retry_after
from fedagent.tests.fake_server import FakeAgentServer, Scripted, error_body


def make_client(server: FakeAgentServer, token: str = "good-token", **kwargs: object) -> AgentHttpClient:
    options: dict[str, object] = {"backoff_base": 0.01, "backoff_max": 0.05, "timeout": 5.0}
    options.update(kwargs)
    return AgentHttpClient(server.url, token, **options)  # type: ignore[arg-type]


def test_retries_503_then_succeeds(fake_server: FakeAgentServer) -> None:
    fake_server.script(
        "POST",
        "/api/v1/agent/heartbeat",
        Scripted(503, error_body("overloaded", "Try again later.")),
        Scripted(503, error_body("overloaded", "Try again later.")),
    )
    with make_client(fake_server) as http:
        reply = http.heartbeat("idle")

    assert reply["agent_id"] == "agent_001"
    assert len(fake_server.requests_to("POST", "/api/v1/agent/heartbeat")) == 3


@pytest.mark.parametrize("status", [408, 429, 502, 504])
def test_retries_every_retryable_status(fake_server: FakeAgentServer, status: int) -> None:
    fake_server.script("POST", "/api/v1/agent/heartbeat", Scripted(status, b"<html>busy</html>"))
    with make_client(fake_server) as http:
        http.heartbeat("idle")

    assert len(fake_server.requests_to("POST", "/api/v1/agent/heartbeat")) == 2


def test_honours_retry_after(fake_server: FakeAgentServer) -> None:
    fake_server.script(
        "POST",
        "/api/v1/agent/heartbeat",
        Scripted(429, error_body("rate_limited", "Slow down."), {"Retry-After": "1"}),
    )
    with make_client(fake_server) as http:
        started = time.monotonic()
        http.heartbeat("idle")
        elapsed = time.monotonic() - started

    # The computed back-off is at most 0.05 s here, so only Retry-After explains a wait of a second.
    assert elapsed >= 0.95


def test_gives_up_after_max_attempts_with_the_last_error(fake_server: FakeAgentServer) -> None:
    fake_server.script("POST", "/api/v1/agent/heartbeat", *[Scripted(503, b"")] * 3)
    with make_client(fake_server, max_attempts=3) as http, pytest.raises(AgentApiError) as caught:
        http.heartbeat("idle")

    assert caught.value.status == 503
    assert caught.value.code == "http_503"
    assert len(fake_server.requests_to("POST", "/api/v1/agent/heartbeat")) == 3


def test_does_not_retry_400_and_raises_the_servers_message(fake_server: FakeAgentServer) -> None:
    fake_server.script(
        "POST",
        "/api/v1/agent/heartbeat",
        Scripted(400, error_body("invalid_state", "Send state 'idle' or 'training'.", field="state")),
    )
    with make_client(fake_server) as http, pytest.raises(AgentApiError) as caught:
        http.heartbeat("idle")

    assert caught.value.status == 400
    assert caught.value.code == "invalid_state"
    assert caught.value.message == "Send state 'idle' or 'training'."
    assert caught.value.details == {"field": "state"}
    assert len(fake_server.requests_to("POST", "/api/v1/agent/heartbeat")) == 1


def test_bad_token_is_401_without_retry(fake_server: FakeAgentServer) -> None:
    with make_client(fake_server, token="wrong") as http, pytest.raises(AgentApiError) as caught:
        http.next_task(wait=0)

    assert caught.value.status == 401
    assert caught.value.code == "not_authenticated"
    assert len(fake_server.requests_to("GET", "/api/v1/agent/tasks/next")) == 1


def test_sends_bearer_token_and_long_poll_wait(fake_server: FakeAgentServer) -> None:
    with make_client(fake_server) as http:
        assert http.next_task(wait=0) is None

    request = fake_server.requests_to("GET", "/api/v1/agent/tasks/next")[0]
    assert request.headers["Authorization"] == "Bearer good-token"
    assert request.query == {"wait": ["0"]}


def test_long_poll_returns_as_soon_as_a_task_exists(
    fake_server: FakeAgentServer, global_params: dict
) -> None:
    model = fake_server.add_model(global_params, None)
    with make_client(fake_server) as http:
        import threading

        threading.Timer(0.3, lambda: fake_server.add_task(model)).start()
        started = time.monotonic()
        task = http.next_task(wait=10)
        elapsed = time.monotonic() - started

    assert task is not None and task["model"]["version_id"] == model["version_id"]
    assert elapsed < 5


def test_retries_connection_errors_then_raises_connection_error() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("refused", request=request)

    http = AgentHttpClient(
        "http://fedsite.invalid",
        "t",
        max_attempts=4,
        backoff_base=0.001,
        transport=httpx.MockTransport(handler),
    )
    with http, pytest.raises(AgentConnectionError, match="after 4 attempt"):
        http.heartbeat("idle")

    assert len(attempts) == 4


def test_connection_error_then_success() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"agent_id": "a", "server_time": "x", "heartbeat_interval": 5})

    with AgentHttpClient(
        "http://fedsite.invalid", "t", backoff_base=0.001, transport=httpx.MockTransport(handler)
    ) as http:
        assert http.heartbeat("training")["heartbeat_interval"] == 5

    assert json.loads(calls[1].content) == {"state": "training"}


def test_enroll_does_not_retry_read_timeouts() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadTimeout("slow", request=request)

    with (
        AgentHttpClient(
            "http://fedsite.invalid", backoff_base=0.001, transport=httpx.MockTransport(handler)
        ) as http,
        pytest.raises(AgentConnectionError),
    ):
        http.enroll("key", "agent_9")

    # A read timeout may hide a successful enrolment; retrying would answer 409.
    assert len(calls) == 1
    assert "Authorization" not in calls[0].headers


def test_refuses_to_send_the_token_to_another_origin() -> None:
    with AgentHttpClient("http://localhost:8000", "secret") as http:
        assert http.url("/api/v1/agent/models/x") == "http://localhost:8000/api/v1/agent/models/x"
        assert http.url("tasks/next") == "http://localhost:8000/api/v1/agent/tasks/next"
        assert http.url("http://localhost:8000/a") == "http://localhost:8000/a"
        with pytest.raises(ProtocolError):
            http.url("http://evil.example/api/v1/agent/models/x")


def test_caps_response_bodies(fake_server: FakeAgentServer, global_params: dict) -> None:
    model = fake_server.add_model(global_params, None)
    with make_client(fake_server) as http, pytest.raises(ProtocolError, match="limit"):
        http.download_model(model["url"], max_bytes=100)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 0 ", 0.0),
        ("-5", 0.0),
        ("soon", None),
        (None, None),
        ("Wed, 01 Jan 2025 00:00:10 GMT", 10.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected
