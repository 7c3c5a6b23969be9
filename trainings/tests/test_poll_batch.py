"""Long-poll starts in batches (trainings.poll_batch): each request gets what it would get alone, the
batch costs a fixed number of statements whatever its size, and the failed-authentication throttle
holds as it does for requests one after the other."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from clients.models import Agent
from clients.services import agent_set_status
from fedsite.errors import AuthenticationFailed, Forbidden, TooManyRequests
from trainings.models import Task
from trainings.poll_batch import POLL, START, PollBatcher, process_polls

KS = Task.Status


def _starts(tokens: list[str], ip: str = "10.0.0.1") -> list[tuple[str, Any]]:
    return [(START, (f"Bearer {token}", ip)) for token in tokens]


@pytest.mark.django_db
def test_a_batch_costs_the_same_statements_for_five_starts_as_for_forty(make_agent: Any) -> None:
    counts = []
    for size in (5, 40):
        tokens = [make_agent(online=False)[1] for _ in range(size)]
        with CaptureQueriesContext(connection) as context:
            outcomes = process_polls(_starts(tokens))
        assert all(isinstance(o, tuple) and o[1] is None for o in outcomes), outcomes
        counts.append(len(context.captured_queries))
    # tokens, heartbeats, waiting rounds, asynchronous trainings, open tasks: one statement each
    assert counts[0] == counts[1] <= 6, counts


@pytest.mark.django_db
def test_every_request_of_a_batch_gets_its_own_answer(make_agent: Any, make_training: Any) -> None:
    with_task = [make_agent() for _ in range(2)]
    make_training(min_clients_per_round=2, max_clients_per_round=2)  # tasks for the two online agents
    idle_agent, idle_token = make_agent()
    disabled_agent, disabled_token = make_agent()
    agent_set_status(agent=disabled_agent, status=Agent.Status.DISABLED, actor="test")
    items = [
        *_starts([with_task[0][1]]),
        (START, (None, "10.0.0.1")),
        *_starts(["fsa_unknown-token", idle_token, disabled_token, with_task[1][1]]),
        (START, ("Bearer fso_an-operator-token", "10.0.0.1")),
    ]

    outcomes = process_polls(items)

    first, missing, unknown, idle, disabled, second, operator = outcomes
    for (agent, _), outcome in zip(with_task, (first, second), strict=True):
        assert outcome[0].pk == agent.pk
        task = Task.objects.get(agent=agent)
        assert outcome[1]["task_id"] == str(task.pk)
        assert task.status == KS.DELIVERED  # taken, as a single poll takes it
    assert isinstance(missing, AuthenticationFailed) and missing.code == "not_authenticated"
    assert isinstance(unknown, AuthenticationFailed) and unknown.code == "invalid_token"
    assert isinstance(operator, AuthenticationFailed) and "operator token" in str(operator)
    assert isinstance(disabled, Forbidden) and disabled.code == "agent_disabled"
    assert idle[0].pk == idle_agent.pk and idle[1] is None


@pytest.mark.django_db
def test_the_batch_writes_every_stale_heartbeat_in_one_update(make_agent: Any, settings: Any) -> None:
    settings.FEDSITE_AGENT_SEEN_WRITE_SECONDS = 60
    pairs = [make_agent(online=False) for _ in range(6)]
    Agent.objects.update(last_seen_at=None)
    before = timezone.now()

    with CaptureQueriesContext(connection) as context:
        process_polls(_starts([token for _, token in pairs]))

    updates = [q["sql"] for q in context.captured_queries if q["sql"].startswith('UPDATE "clients_agent"')]
    assert len(updates) == 1, updates
    seen = list(Agent.objects.filter(pk__in=[a.pk for a, _ in pairs]).values_list("last_seen_at", flat=True))
    assert len(seen) == 6 and all(s is not None and s >= before for s in seen), seen
    with CaptureQueriesContext(connection) as again:  # written within the interval: no second UPDATE
        process_polls(_starts([token for _, token in pairs]))
    assert not [q for q in again.captured_queries if q["sql"].startswith("UPDATE")]


@pytest.mark.django_db
def test_a_burst_of_guesses_in_one_batch_gets_no_more_tries_than_one_after_the_other(
    make_agent: Any, settings: Any
) -> None:
    settings.FEDSITE_AUTH_FAILURE_RATES = {**settings.FEDSITE_AUTH_FAILURE_RATES, "agent_token": "3/m"}
    _, token = make_agent()
    guesses = [f"fsa_guess-{i}" for i in range(8)]

    outcomes = process_polls(_starts([*guesses, token]))

    assert [type(o) for o in outcomes[:3]] == [AuthenticationFailed] * 3  # the limit: 3 per minute
    assert all(isinstance(o, TooManyRequests) for o in outcomes[3:8]), outcomes
    # past the limit the right token is refused too, before it is checked: a refusal tells nothing
    assert isinstance(outcomes[8], TooManyRequests)
    # another IP is not affected
    (other,) = process_polls(_starts([token], ip="10.0.0.2"))
    assert isinstance(other, tuple) and other[0] is not None


@pytest.mark.django_db
def test_a_woken_poll_takes_its_task_and_one_without_a_task_gets_none(
    make_agent: Any, make_training: Any
) -> None:
    (agent, _), (idle, _) = make_agent(), make_agent()
    make_training(min_clients_per_round=1, max_clients_per_round=1)
    picked, other = (agent, idle) if Task.objects.filter(agent=agent).exists() else (idle, agent)

    woken, spurious = process_polls([(POLL, picked), (POLL, other)])

    assert woken[1]["task_id"] == str(Task.objects.get(agent=picked).pk)
    assert spurious == (other, None)


@pytest.mark.django_db(transaction=True)
def test_polls_that_start_together_share_a_batch_and_a_cancelled_one_is_dropped(make_agent: Any) -> None:
    tokens = [make_agent()[1] for _ in range(6)]
    connection.close()
    batcher = PollBatcher()

    async def scenario() -> list[Any]:
        polls = [asyncio.ensure_future(batcher.start(f"Bearer {t}", "10.0.0.9")) for t in tokens]
        await asyncio.sleep(0)  # the first has queued, and its batch begins
        polls[-1].cancel()  # the client left before its batch ran
        return await asyncio.gather(*polls, return_exceptions=True)

    outcomes = asyncio.run(scenario())

    assert all(isinstance(o, tuple) and o[1] is None for o in outcomes[:-1]), outcomes
    assert isinstance(outcomes[-1], asyncio.CancelledError)
    assert batcher.requests == 5  # the cancelled poll cost no database work
    assert batcher.batches <= 2, batcher.batches


@pytest.mark.django_db
def test_the_tasks_of_a_batch_are_read_and_taken_in_the_same_statements_for_three_agents_as_for_eight(
    make_agent: Any, make_training: Any, settings: Any
) -> None:
    settings.FEDSITE_MAX_CONCURRENT_TRAININGS = 5
    counts = []
    for size in (3, 8):
        agents = [make_agent()[0] for _ in range(size)]
        training = make_training(min_clients_per_round=size, max_clients_per_round=size)
        picked = [a for a in agents if Task.objects.filter(agent=a, round__training=training).exists()]
        with CaptureQueriesContext(connection) as context:
            outcomes = process_polls([(POLL, agent) for agent in picked])
        counts.append(len(context.captured_queries))
        for agent, (polled, payload) in zip(picked, outcomes, strict=True):
            task = Task.objects.get(agent=agent, round__training=training)
            assert polled.pk == agent.pk and payload["task_id"] == str(task.pk)
            assert task.status == KS.DELIVERED and task.delivered_at is not None
    # asynchronous trainings, the open tasks with what their JSON needs, one UPDATE for the pending ones
    assert counts[0] == counts[1] == 3, counts


@pytest.mark.django_db
def test_a_task_changed_since_the_batch_read_it_is_not_moved(make_agent: Any, make_training: Any) -> None:
    from trainings.state import deliver_tasks_if_pending

    (a, _), (b, _) = make_agent(), make_agent()
    make_training(min_clients_per_round=2, max_clients_per_round=2)
    read = list(Task.objects.filter(agent__in=[a, b]).order_by("agent__agent_id"))
    Task.objects.filter(pk=read[1].pk).update(status=KS.CANCELLED)  # another request, meanwhile

    moved = deliver_tasks_if_pending(read)

    assert moved == {read[0].pk}
    assert read[0].status == KS.DELIVERED and read[1].status == KS.PENDING  # in memory, as stored
    assert Task.objects.get(pk=read[0].pk).status == KS.DELIVERED
    assert Task.objects.get(pk=read[1].pk).status == KS.CANCELLED
