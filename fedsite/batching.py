"""Requests of one event loop whose database work runs in batches on a worker thread.

Agents act together: a round's opening wakes its agents' long-polls at once, and their uploads arrive
within a fraction of a second of each other. Done one request at a time, each of them is a trip to a
worker thread and a handful of ORM statements, compiled and sent one by one. A :class:`ThreadBatcher`
queues the requests on the event loop and hands them to ONE worker thread in batches, where a function
does the work of the whole batch in a few statements (``trainings.poll_batch.process_polls``,
``trainings.upload_batch.process_uploads``).

Batches form by themselves: the first request of a quiet moment is sent to the thread at once (no added
delay), and while a batch runs the next ones queue, so the batch grows with the load. Requests queue by
kind, each kind with its own batch in flight, so one kind never waits behind a backlog of another. A
request whose client has gone (its future cancelled) before its batch runs is dropped from it and costs
nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async

logger = logging.getLogger("fedsite.batching")

#: What the batch function gives each request: its result, or the exception it raises.
Outcome = Any | BaseException


@dataclass
class _Queue:
    #: (request, its future, when it was queued: the loop's clock)
    items: list[tuple[tuple[str, Any], asyncio.Future[Outcome], float]] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None


class ThreadBatcher:
    """Requests per event loop and kind, processed in batches by ``process`` on a worker thread.

    ``process`` is synchronous; it gets the batch's ``(kind, value)`` requests in their order and returns
    one outcome per request: a result, or the exception that request raises (an error of one request is
    that request's own). At most ``max_batch`` requests go in one batch; a request that waited longer
    than ``slow_seconds`` in the queue is logged (``<name>_queued``, to ``log``).
    """

    def __init__(
        self,
        process: Callable[[list[tuple[str, Any]]], Sequence[Outcome]],
        *,
        name: str,
        kinds: Sequence[str],
        max_batch: int,
        slow_seconds: float = 1.0,
        log: logging.Logger = logger,
    ) -> None:
        self.name = name
        self.log = log
        self.kinds = tuple(kinds)
        self.max_batch = max_batch
        self.slow_seconds = slow_seconds
        #: Batches handed to a thread, and the requests they carried, since the process started.
        self.batches = 0
        self.requests = 0
        self._process = sync_to_async(process, thread_sensitive=False)  # the event loop's shared executor
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Queue]] = (
            weakref.WeakKeyDictionary()
        )

    async def submit(self, kind: str, value: Any) -> Any:
        """Queue ``(kind, value)`` for the next batch of its kind; its result, or raise its exception."""
        loop = asyncio.get_running_loop()
        queues = self._queues.get(loop)
        if queues is None:
            queues = self._queues[loop] = {k: _Queue() for k in self.kinds}
        queue = queues[kind]
        future: asyncio.Future[Outcome] = loop.create_future()
        queue.items.append(((kind, value), future, loop.time()))
        if queue.drain is None:
            queue.drain = loop.create_task(self._drain(queue))
        outcome = await future
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _drain(self, queue: _Queue) -> None:
        try:
            while queue.items:
                taken, queue.items = queue.items[: self.max_batch], queue.items[self.max_batch :]
                batch = [(item, future) for item, future, _ in taken if not future.done()]  # clients gone
                if not batch:
                    continue
                waited = asyncio.get_running_loop().time() - taken[0][2]
                if waited > self.slow_seconds:
                    self.log.warning(
                        "%s_queued kind=%s requests=%d waited=%.3f",
                        self.name,
                        taken[0][0][0],
                        len(batch),
                        waited,
                    )
                self.batches += 1
                self.requests += len(batch)
                try:
                    outcomes = await self._process([item for item, _ in batch])
                except asyncio.CancelledError:  # the loop shuts down: so do the requests of this batch
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # (process catches its own: a failure of the hand-off itself)
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            queue.drain = None
            for _, future, _ in queue.items:  # (left only when this task was cancelled)
                future.cancel()
            queue.items = []
