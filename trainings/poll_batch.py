"""The long-polls' database work, batched: the polls that start (or wake up) together share one trip to a
worker thread and a handful of statements, whatever their number.

An idle agent's poll costs the server its start: authenticate the token, note that the agent is alive,
open a waiting round if one can open, look for the agent's task. One at a time that is five round trips
to Postgres and Redis and four ORM queries compiled, for every poll of every agent: at 10,000 agents
polling every 30 s, 330 a second. :class:`PollBatcher` queues the starts on the event loop and hands
them to ONE worker thread in batches (:func:`process_polls`): one cache round trip for the failure
counters of their IPs and one query for their tokens (``clients.services.agents_authenticate``), one
``UPDATE`` for their heartbeats (``agents_touch_seen``), one check for waiting rounds, one query for
their open tasks and one conditional ``UPDATE`` that marks the pending ones delivered
(``trainings.services.tasks.tasks_next_for_agents``). Polls woken by a task (``trainings.wakeup``) come
back through a queue of their own for that lookup, so a delivery never waits behind a backlog of starts.

Each request gets what it would get alone, in the same order of checks (the throttle, the token, the
agent's status, the heartbeat before the waiting round opens, then the task); an error of one request
(401, 403, 429) is that request's own. Batches form by themselves (fedsite.batching): the first poll of a
quiet moment is sent to the thread at once (no added delay), and while a batch runs the next ones queue,
so the batch grows with the load. A poll whose client has gone (its future cancelled) before its batch
runs is dropped from it, and costs nothing more.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from django.db import connection

from clients.services import agents_authenticate, agents_touch_seen
from fedsite.batching import ThreadBatcher
from fedsite.errors import ServiceError
from trainings.selectors import task_payload
from trainings.services import rounds_try_open_waiting_if_any
from trainings.services.tasks import tasks_next_for_agents

logger = logging.getLogger("trainings.poll_batch")

#: A poll that starts: ``(START, (authorization header, client IP))``.
START = "start"
#: An authenticated poll that looks for its task again (woken): ``(POLL, agent)``.
POLL = "poll"
#: The most requests one batch takes; more wait for the next batch.
MAX_BATCH = 500
#: A batch slower than this is logged (``poll_batch_slow``, with the seconds of each step), and so is a
#: request that waited longer than this in the queue before its batch ran (``poll_batch_queued``).
SLOW_BATCH_SECONDS = 1.0

#: A task's JSON (trainings.selectors.task_payload), or None when the agent has no task.
Payload = dict[str, Any] | None
#: What each request of a batch gets: ``(agent, payload)``, or the exception it raises.
Outcome = tuple[Any, Payload] | BaseException


def release_connection() -> None:
    """Hand this thread's database connection back to the pool (tests wrap requests in a transaction:
    never close one)."""
    if not connection.in_atomic_block:
        connection.close()


def process_polls(items: list[tuple[str, Any]]) -> list[Outcome]:
    """The database work of a batch of polls, in order (synchronous: a worker thread runs it)."""
    outcomes: list[Outcome | None] = [None] * len(items)
    marks = [time.perf_counter()]
    try:
        agents: dict[int, Any] = {}
        starts = [index for index, (kind, _) in enumerate(items) if kind == START]
        if starts:
            try:
                authenticated = agents_authenticate([items[index][1] for index in starts])
            except Exception as exc:  # a statement shared by the batch failed: every start gets its error
                for index in starts:
                    outcomes[index] = exc
                authenticated = []
            marks.append(time.perf_counter())
            for index, result in zip(starts, authenticated, strict=False):
                if isinstance(result, ServiceError):
                    outcomes[index] = result
                else:
                    agents[index] = result
            started = list(agents)
            if started:
                try:
                    agents_touch_seen([agents[index] for index in started])
                    marks.append(time.perf_counter())
                    rounds_try_open_waiting_if_any()
                except Exception as exc:
                    for index in started:
                        outcomes[index] = exc
                        del agents[index]
        for index, (kind, value) in enumerate(items):
            if kind == POLL:
                agents[index] = value
        marks.append(time.perf_counter())
        order = list(agents)
        try:
            tasks: list[Any] = tasks_next_for_agents([agents[index] for index in order])
        except Exception as exc:  # a statement shared by the batch failed: every poll gets its error
            tasks = [exc] * len(order)
        for index, task in zip(order, tasks, strict=True):
            if isinstance(task, Exception):
                outcomes[index] = task
                continue
            try:
                outcomes[index] = (agents[index], task_payload(task) if task is not None else None)
            except Exception as exc:
                outcomes[index] = exc
    finally:
        release_connection()
        marks.append(time.perf_counter())
        if marks[-1] - marks[0] > SLOW_BATCH_SECONDS:
            steps = " ".join(f"{b - a:.3f}" for a, b in itertools.pairwise(marks))
            logger.warning(
                "poll_batch_slow requests=%d seconds=%.3f steps=%s", len(items), marks[-1] - marks[0], steps
            )
    return outcomes  # type: ignore[return-value]  # (every index was filled above)


class PollBatcher(ThreadBatcher):
    """Long-poll requests per event loop, processed by :func:`process_polls` in batches
    (:class:`fedsite.batching.ThreadBatcher`).

    Starts and woken polls queue apart, each queue with its own batch in flight: a woken poll (a task to
    deliver) never waits behind a backlog of starts, as after thousands of agents reconnect at once.
    """

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        super().__init__(
            process_polls,
            name="poll_batch",
            kinds=(START, POLL),
            max_batch=max_batch,
            slow_seconds=SLOW_BATCH_SECONDS,
            log=logger,
        )

    async def start(self, authorization: str | None, client_ip: str | None) -> tuple[Any, Payload]:
        """Authenticate and touch the polling agent, open a waiting round if one can, find its task:
        ``(agent, task payload or None)``, or the :class:`~fedsite.errors.ServiceError` it gets."""
        return await self.submit(START, (authorization, client_ip))  # type: ignore[no-any-return]

    async def poll(self, agent: Any) -> Payload:
        """The agent's task payload (the task marked delivered), or None."""
        return (await self.submit(POLL, agent))[1]  # type: ignore[no-any-return]


poll_batcher = PollBatcher()
