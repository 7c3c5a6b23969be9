"""The long-polls' database work, batched: the polls that start (or wake up) together share one trip to a
worker thread and a handful of statements, whatever their number.

An idle agent's poll costs the server its start: authenticate the token, note that the agent is alive,
open a waiting round if one can open, look for the agent's task. One at a time that is five round trips
to Postgres and Redis and four ORM queries compiled, for every poll of every agent: at 10,000 agents
polling every 30 s, 330 a second. :class:`PollBatcher` queues the starts on the event loop and hands
them to ONE worker thread in batches (:func:`process_polls`): one cache round trip for the failure
counters of their IPs and one query for their tokens (``clients.services.agents_authenticate``), one
``UPDATE`` for their heartbeats (``agents_touch_seen``), one check for waiting rounds, and one query for
which of them have a task (``trainings.services.tasks.agents_with_open_tasks``); only those agents then
look their task up and take it, one by one, exactly as a single poll does. Polls woken by a task
(``trainings.wakeup``) come back through the same queue for that lookup.

Each request gets what it would get alone, in the same order of checks (the throttle, the token, the
agent's status, the heartbeat before the waiting round opens, then the task); an error of one request
(401, 403, 429) is that request's own. Batches form by themselves: the first poll of a quiet moment is
sent to the thread at once (no added delay), and while a batch runs the next ones queue, so the batch
grows with the load. A poll whose client has gone (its future cancelled) before its batch runs is
dropped from it, and costs nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection

from clients.services import agents_authenticate, agents_touch_seen
from fedsite.errors import ServiceError
from trainings.selectors import task_payload
from trainings.services import rounds_try_open_waiting_if_any, task_next_for_agent
from trainings.services.tasks import agents_with_open_tasks

logger = logging.getLogger("trainings.poll_batch")

#: A poll that starts: ``(START, (authorization header, client IP))``.
START = "start"
#: An authenticated poll that looks for its task again (woken): ``(POLL, agent)``.
POLL = "poll"
#: The most requests one batch takes; more wait for the next batch.
MAX_BATCH = 500

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
            for index, result in zip(starts, authenticated, strict=False):
                if isinstance(result, ServiceError):
                    outcomes[index] = result
                else:
                    agents[index] = result
            started = list(agents)
            if started:
                try:
                    agents_touch_seen([agents[index] for index in started])
                    rounds_try_open_waiting_if_any()
                except Exception as exc:
                    for index in started:
                        outcomes[index] = exc
                        del agents[index]
        for index, (kind, value) in enumerate(items):
            if kind == POLL:
                agents[index] = value
        try:
            with_work = agents_with_open_tasks({agent.pk for agent in agents.values()}) if agents else set()
        except Exception as exc:
            for index in agents:
                outcomes[index] = exc
            agents = {}
            with_work = set()
        for index, agent in agents.items():
            if with_work is not None and agent.pk not in with_work:
                outcomes[index] = (agent, None)
                continue
            try:
                task = task_next_for_agent(agent=agent)
                outcomes[index] = (agent, task_payload(task) if task is not None else None)
            except Exception as exc:  # this agent's own lookup: the others are unaffected
                outcomes[index] = exc
    finally:
        release_connection()
    return outcomes  # type: ignore[return-value]  # (every index was filled above)


@dataclass
class _LoopState:
    queue: list[tuple[tuple[str, Any], asyncio.Future[Outcome]]] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None


class PollBatcher:
    """Queue of poll requests per event loop, processed by :func:`process_polls` one batch at a time."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch
        #: Batches handed to a thread, and the requests they carried, since the process started.
        self.batches = 0
        self.requests = 0
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    async def start(self, authorization: str | None, client_ip: str | None) -> tuple[Any, Payload]:
        """Authenticate and touch the polling agent, open a waiting round if one can, find its task:
        ``(agent, task payload or None)``, or the :class:`~fedsite.errors.ServiceError` it gets."""
        return await self._submit((START, (authorization, client_ip)))

    async def poll(self, agent: Any) -> Payload:
        """The agent's task payload (the task marked delivered), or None."""
        return (await self._submit((POLL, agent)))[1]

    async def _submit(self, item: tuple[str, Any]) -> tuple[Any, Payload]:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState()
        future: asyncio.Future[Outcome] = loop.create_future()
        state.queue.append((item, future))
        if state.drain is None:
            state.drain = loop.create_task(self._drain(state))
        outcome = await future
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _drain(self, state: _LoopState) -> None:
        try:
            while state.queue:
                taken, state.queue = state.queue[: self.max_batch], state.queue[self.max_batch :]
                batch = [(item, future) for item, future in taken if not future.done()]  # clients gone
                if not batch:
                    continue
                self.batches += 1
                self.requests += len(batch)
                try:
                    outcomes = await _in_thread([item for item, _ in batch])
                except asyncio.CancelledError:  # the loop shuts down: so do the polls of this batch
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # (process_polls catches its own: a failure of the hand-off itself)
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            state.drain = None
            for _, future in state.queue:  # (left only when this task was cancelled)
                future.cancel()
            state.queue = []


_in_thread = sync_to_async(process_polls, thread_sensitive=False)
poll_batcher = PollBatcher()
