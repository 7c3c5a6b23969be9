"""A waiting long-poll costs no thread and no query: it waits for a wake-up, and one shared re-check per
process catches a lost one. Driven through ``fedsite.asgi.application`` (the stack ``manage.py serve``
runs) where the claim is about the server, and through Django's test client where it is about the view.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

POLLS = 40


async def _wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.mark.django_db(transaction=True)
def test_waiting_polls_through_the_asgi_application_hold_no_thread_each(make_agent: Any) -> None:
    from fedsite.asgi import application
    from monitoring.health import open_long_polls

    tokens = [make_agent()[1] for _ in range(POLLS)]
    connection.close()

    async def scenario() -> tuple[int, int, int, list[int]]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            warm = await client.get(
                "/api/v1/agent/tasks/next?wait=0", headers={"Authorization": f"Bearer {tokens[0]}"}
            )
            assert warm.status_code == 204
            before = threading.active_count()
            polls = [
                asyncio.ensure_future(
                    client.get("/api/v1/agent/tasks/next?wait=4", headers={"Authorization": f"Bearer {t}"})
                )
                for t in tokens
            ]
            await _wait_until(lambda: open_long_polls.value >= POLLS, 30)
            await asyncio.sleep(0.7)  # every poll is past its first check, waiting
            waiting = open_long_polls.value
            during = threading.active_count()
            responses = await asyncio.gather(*polls)
        return before, during, waiting, [r.status_code for r in responses]

    before, during, waiting, statuses = asyncio.run(scenario())
    assert statuses == [204] * POLLS
    assert waiting == POLLS
    # The loop's shared executor may have grown to its few workers; a thread per poll would add POLLS.
    assert during - before <= 8, (before, during)


@pytest.mark.django_db(transaction=True)
def test_a_waiting_poll_makes_no_query_while_nothing_happens(
    client: Any, make_agent: Any, settings: Any
) -> None:
    """The queries of a poll that waits 3 s are those of one that does not wait at all."""
    settings.FEDSITE_LONG_POLL_JITTER = 0  # (the whole 3 s)
    _, token = make_agent()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    client.get("/api/v1/agent/tasks/next?wait=0", **auth)  # warm caches (token lookup, content types)
    with CaptureQueriesContext(connection) as immediate:
        assert client.get("/api/v1/agent/tasks/next?wait=0", **auth).status_code == 204
    with CaptureQueriesContext(connection) as waited:
        started = time.monotonic()
        assert client.get("/api/v1/agent/tasks/next?wait=3", **auth).status_code == 204
        assert time.monotonic() - started >= 2.9  # it did wait
    assert len(waited.captured_queries) == len(immediate.captured_queries), [
        q["sql"][:80] for q in waited.captured_queries
    ]


@pytest.mark.django_db(transaction=True)
def test_a_lost_wake_up_is_caught_by_the_shared_recheck(
    client: Any, make_agent: Any, make_training: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the tasks' wake-up is dropped; the process's one re-check finds the task."""
    from trainings.api import agent_views
    from trainings.services import tasks
    from trainings.wakeup import SharedRecheck

    recheck = SharedRecheck(0.5)
    monkeypatch.setattr(agent_views, "shared_recheck", recheck)
    monkeypatch.setattr(tasks, "_wake_agents", lambda agent_pks: None)  # the lost message
    (_, token), _ = make_agent(), make_agent()

    def start_training() -> None:
        make_training(min_clients_per_round=2, max_clients_per_round=2)
        connection.close()

    timer = threading.Timer(1.0, start_training)
    timer.start()
    started = time.monotonic()
    response = client.get("/api/v1/agent/tasks/next?wait=20", HTTP_AUTHORIZATION=f"Bearer {token}")
    timer.join()
    assert response.status_code == 200, response.content
    assert time.monotonic() - started < 10  # well before the poll's own 20 s deadline
    assert recheck.runs >= 1


def test_the_asgi_middleware_chain_is_not_adapted_to_sync(caplog: pytest.LogCaptureFixture) -> None:
    """No sync-only middleware in the chain (WhiteNoise was one): Django would log each adaptation."""
    from django.core.handlers.asgi import ASGIHandler

    with caplog.at_level(logging.DEBUG, logger="django.request"):
        ASGIHandler()
    adapted = [r.getMessage() for r in caplog.records if "adapted" in r.getMessage()]
    assert adapted == []


@pytest.mark.django_db(transaction=True)
def test_django_requests_reuse_kept_threads_instead_of_one_new_thread_each(make_agent: Any) -> None:
    """Downloads, uploads and the API run their sync code on kept threads, the same ones request after
    request (Django alone starts and joins a thread per request)."""
    from fedsite.asgi import application

    _, token = make_agent()
    connection.close()

    def request_threads() -> set[threading.Thread]:  # the objects: an ident may be reused by a new thread
        return {t for t in threading.enumerate() if t.name.startswith("django-request")}

    async def requests(count: int) -> list[set[threading.Thread]]:
        transport = httpx.ASGITransport(app=application)
        seen = []
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            for _ in range(count):
                response = await client.get(
                    "/api/v1/agent/tasks/next/", headers={"Authorization": f"Bearer {token}"}
                )
                assert response.status_code in (301, 404, 405), response.status_code  # a Django request
                health = await client.get("/api/health")
                assert health.status_code == 200
                seen.append(request_threads())
        return seen

    seen = asyncio.run(requests(6))
    assert seen[0], "no kept request thread"
    assert all(s == seen[0] for s in seen[1:]), seen


def test_a_wake_up_that_comes_after_the_look_but_before_the_wait_is_not_lost() -> None:
    """A poll looks for its task, finds none, and only then waits: a round opened in between wakes it
    before it waits. That wake-up is remembered: the wait returns at once, and the poll looks again
    (without this the process's shared re-check found the task up to 5 s later)."""
    from trainings.wakeup import wait_for_wakeup, waiters

    async def scenario() -> tuple[bool, float, bool]:
        looked = time.monotonic()
        waiters.wake(["agent-between"])  # the round's wake-up: after the look, before the wait
        began = time.monotonic()
        early = await wait_for_wakeup("agent-between", 5.0, since=looked)
        took = time.monotonic() - began
        # a wake-up from before the poll's look is no reason to look again: this wait runs its course
        later = await wait_for_wakeup("agent-between", 0.3, since=time.monotonic())
        return early, took, later

    early, took, later = asyncio.run(scenario())
    assert early and took < 1.0, (early, took)
    assert not later
