"""The ASGI entry point's Django handler: the middleware chain and the view in one trip to a kept thread."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, iscoroutinefunction
from asgiref.testing import ApplicationCommunicator

from fedsite.tests.asgi_scope import http_scope


def _scope(path: str, query: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = ()) -> dict[str, Any]:
    return http_scope("GET", path, list(headers), query)


async def _get(application: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    communicator = ApplicationCommunicator(application, _scope(path))
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(10)
    body = b""
    while True:
        message = await communicator.receive_output(10)
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await communicator.wait(10)
    return start["status"], {name.lower(): value for name, value in start["headers"]}, body


@pytest.mark.django_db(transaction=True)
def test_a_request_crosses_to_its_thread_a_few_times_not_once_per_middleware(monkeypatch: Any) -> None:
    from fedsite.asgi import ReusedThreadASGIHandler, application

    handler = ReusedThreadASGIHandler()
    assert not iscoroutinefunction(handler._middleware_chain)  # the synchronous chain
    crossings: list[str] = []
    original = SyncToAsync.__call__

    async def counted(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        crossings.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted)

    status, headers, body = asyncio.run(_get(application, "/api/health"))

    assert status == 200, body
    # the middleware ran: SecurityMiddleware's and XFrameOptionsMiddleware's headers are there
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"x-frame-options"] == b"DENY"
    # request_started's receivers, the chain with the view, closing the response: the async chain made
    # two more per MiddlewareMixin middleware (process_request and process_response), about twenty
    assert 1 <= len(crossings) <= 3, crossings
    assert any("get_response" in name for name in crossings), crossings


@pytest.mark.django_db(transaction=True)
def test_long_polls_skip_djangos_handler_and_share_batches_of_database_work(make_agent: Any) -> None:
    import httpx
    from django.core.signals import request_finished, request_started
    from django.db import connection

    from fedsite.asgi import application
    from trainings.poll_batch import poll_batcher

    polls = 24
    tokens = [make_agent()[1] for _ in range(polls)]
    connection.close()
    signals: list[str] = []

    def started(**kwargs: Any) -> None:
        signals.append("started")

    def finished(**kwargs: Any) -> None:
        signals.append("finished")

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await asyncio.gather(
                *(
                    client.get("/api/v1/agent/tasks/next?wait=0", headers={"Authorization": f"Bearer {t}"})
                    for t in tokens
                )
            )

    request_started.connect(started, weak=False)
    request_finished.connect(finished, weak=False)
    batches, requests = poll_batcher.batches, poll_batcher.requests
    try:
        responses = asyncio.run(run())
    finally:
        request_started.disconnect(started)
        request_finished.disconnect(finished)

    assert [r.status_code for r in responses] == [204] * polls
    assert signals == []  # no trip through Django's handler and its signal receivers
    assert poll_batcher.requests - requests == polls
    # They arrived together: one batch took the first, the rest queued behind it (a batch each would be 24).
    assert poll_batcher.batches - batches <= 3, poll_batcher.batches - batches


@pytest.mark.django_db(transaction=True)
def test_a_long_poll_answer_carries_its_length_and_errors_keep_their_shape() -> None:
    import httpx
    from django.db import connection

    from fedsite.asgi import application

    connection.close()

    async def get(token: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(
                "/api/v1/agent/tasks/next?wait=0", headers={"Authorization": f"Bearer {token}"}
            )

    refused = asyncio.run(get("fsa_not-a-token"))
    assert refused.status_code == 401
    assert refused.headers["content-length"] == str(len(refused.content))
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["code"] == "invalid_token"
    assert refused.headers["www-authenticate"] == 'Bearer realm="fedsite-agent"'


@pytest.mark.django_db(transaction=True)
def test_a_client_that_leaves_mid_wait_ends_its_poll_at_once(make_agent: Any) -> None:
    from django.db import connection

    from fedsite.asgi import application
    from monitoring.health import open_long_polls

    token = make_agent()[1]
    connection.close()
    scope = _scope("/api/v1/agent/tasks/next", b"wait=30", ((b"authorization", f"Bearer {token}".encode()),))

    async def scenario() -> tuple[int, float]:
        before = open_long_polls.value
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
        deadline = asyncio.get_running_loop().time() + 20
        while open_long_polls.value <= before:
            assert asyncio.get_running_loop().time() < deadline, "the poll never started waiting"
            await asyncio.sleep(0.02)
        waiting = open_long_polls.value - before
        left = asyncio.get_running_loop().time()
        await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(5)  # the application returns: it does not wait out its 30 s
        assert await communicator.receive_nothing(0.1)  # and answers nothing to a client that left
        assert open_long_polls.value == before
        return waiting, asyncio.get_running_loop().time() - left

    waiting, seconds = asyncio.run(scenario())
    assert waiting == 1
    assert seconds < 5
