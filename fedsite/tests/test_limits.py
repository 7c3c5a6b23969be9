"""fedsite.limits in front of an application: a body is counted and cut off at its endpoint's limit unless
the request declares, by HTTP/1.x's own rules, that it has none."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator

from fedsite.limits import RequestLimitsMiddleware


async def _echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body and answers its length."""
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = str(total).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


def _run(http_version: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/agent/heartbeat",
        "raw_path": b"/api/v1/agent/heartbeat",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8001),
    }

    async def scenario() -> tuple[int, bytes]:
        communicator = ApplicationCommunicator(RequestLimitsMiddleware(_echo_length), scope)
        for index, chunk in enumerate(chunks):
            await communicator.send_input(
                {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
            )
        start = await communicator.receive_output(5)
        body = await communicator.receive_output(5)
        await communicator.wait(5)
        return start["status"], body["body"]

    return asyncio.run(scenario())


@pytest.fixture
def small_limit(settings: Any) -> int:
    settings.FEDSITE_MAX_JSON_BODY_BYTES = 1000
    return 1000


def test_a_request_that_declares_no_body_passes_and_reads_it_empty(small_limit: int) -> None:
    assert _run("1.1", [], [b""]) == (200, b"0")


@pytest.mark.parametrize(
    ("http_version", "headers"),
    [
        ("1.1", [(b"transfer-encoding", b"chunked")]),  # HTTP/1.1 chunked: a body with no length
        ("2", []),  # HTTP/2 frames a body without either header: never taken for empty
    ],
)
def test_a_body_without_a_declared_length_is_still_cut_off_at_the_limit(
    small_limit: int, http_version: str, headers: list[tuple[bytes, bytes]]
) -> None:
    status, body = _run(http_version, headers, [b"x" * 600, b"x" * 600])
    assert status == 413, body
    assert b"payload_too_large" in body


def test_a_declared_length_over_the_limit_is_refused_before_the_body(small_limit: int) -> None:
    status, body = _run("1.1", [(b"content-length", b"5000")], [b"x" * 10])
    assert status == 413 and b"payload_too_large" in body
