"""The ASGI entry point's Django handler: the middleware chain and the view in one trip to a kept thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, iscoroutinefunction
from asgiref.testing import ApplicationCommunicator


async def _get(application: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8001),
    }
    communicator = ApplicationCommunicator(application, scope)
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
def test_long_polls_share_a_few_kept_threads_for_djangos_plumbing_not_one_for_all(make_agent: Any) -> None:
    import httpx
    from django.core.signals import request_started
    from django.db import connection

    from fedsite.asgi import LONG_POLL_PLUMBING_THREADS, application

    tokens = [make_agent()[1] for _ in range(3 * LONG_POLL_PLUMBING_THREADS)]
    connection.close()
    seen: list[threading.Thread] = []

    def record(**kwargs: Any) -> None:
        seen.append(threading.current_thread())

    async def polls() -> list[int]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            responses = await asyncio.gather(
                *(
                    client.get("/api/v1/agent/tasks/next?wait=0", headers={"Authorization": f"Bearer {t}"})
                    for t in tokens
                )
            )
        return [r.status_code for r in responses]

    request_started.connect(record, weak=False)
    try:
        statuses = asyncio.run(polls())
    finally:
        request_started.disconnect(record)

    assert statuses == [204] * len(tokens)
    assert len(seen) == len(tokens)
    assert all(thread.name.startswith("long-poll-plumbing") for thread in seen), seen
    assert len(set(seen)) == LONG_POLL_PLUMBING_THREADS, seen  # in turn, not all on one
