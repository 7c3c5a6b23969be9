"""Wake long-polling agents as soon as a task exists for them.

The channel layer carries a ``task.available`` message to the group ``agent_<uuid-hex>``. The long-poll
also re-checks the database every couple of seconds, so a lost wake-up costs latency, never correctness.

Invariants: nothing here raises when Redis is away. ``wake_agents`` drops the wake-up; ``wait_for_wakeup``
degrades to a plain sleep of its timeout (the caller's re-check interval), i.e. to database polling. The
outage is logged once per process (``monitoring.events.channel_layer_outage``), not once per request, and
while it lasts Redis is probed at most once per ``probe_interval`` instead of once per waiting agent.
``wait_for_wakeup`` also returns early when the server is shutting down (:data:`shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from monitoring.events import BROKER_ERRORS, channel_layer_outage

logger = logging.getLogger("trainings.wakeup")

#: Longest wait for leaving a group after a wake-up wait; a stuck Redis must not hold the poll.
DISCARD_TIMEOUT_SECONDS = 1.0


class ShutdownSignal:
    """A process-wide flag that coroutines on any event loop can await, settable from any thread.

    ``manage.py serve`` sets it from uvicorn's signal handling (SIGTERM/SIGINT), so long-polls stop
    waiting at once instead of being cancelled at the end of the graceful-shutdown period. It is not an
    ``asyncio.Event`` because those bind to one loop, and tests run views on a loop per request.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def set(self) -> None:
        """Set the flag and wake every waiter (safe from a signal handler and from other threads)."""
        self._flag.set()
        with self._lock:
            waiters = list(self._waiters)
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, future)

    def clear(self) -> None:
        self._flag.clear()

    async def wait(self) -> None:
        """Return once the flag is set."""
        if self._flag.is_set():
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            self._waiters.add(entry)
        try:
            if not self._flag.is_set():  # set between the first check and the registration
                await future
        finally:
            with self._lock:
                self._waiters.discard(entry)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: Set when this server process starts shutting down.
shutdown = ShutdownSignal()


def agent_group(agent_pk: Any) -> str:
    return f"agent_{str(agent_pk).replace('-', '')}"


def wake_agents(agent_pks: Iterable[Any]) -> None:
    """Send ``task.available`` to each agent's group; best effort, never raises."""
    layer = get_channel_layer()
    if layer is None:
        return
    for pk in agent_pks:
        if channel_layer_outage.should_skip():
            return
        try:
            async_to_sync(layer.group_send)(agent_group(pk), {"type": "task.available"})
        except BROKER_ERRORS as exc:  # the poll loop re-checks the database anyway
            channel_layer_outage.failed("wake_agents", exc)
        except Exception:
            logger.warning("wake_failed agent=%s", pk, exc_info=True)
        else:
            channel_layer_outage.recovered()


async def _sleep_unless_shutdown(seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shutdown.wait(), timeout=max(seconds, 0))


async def wait_for_wakeup(agent_pk: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a wake-up for this agent. True if one arrived.

    Returns False after ``timeout`` seconds without one, at once when the server starts shutting down,
    and after a plain sleep of the rest of ``timeout`` when the channel layer is unreachable.
    """
    layer = get_channel_layer()
    if layer is None or timeout <= 0 or channel_layer_outage.should_skip():
        await _sleep_unless_shutdown(timeout)
        return False
    started = time.monotonic()
    channel: str | None = None
    group = agent_group(agent_pk)
    try:
        async with asyncio.timeout(timeout):
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
            channel_layer_outage.recovered()
            receive = asyncio.ensure_future(layer.receive(channel))
            stop = asyncio.ensure_future(shutdown.wait())
            try:
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for future in (receive, stop):
                    future.cancel()
                await asyncio.gather(receive, stop, return_exceptions=True)
            if receive in done and not receive.cancelled():
                receive.result()  # a broker error while waiting raises here
                return True
            return False
    except TimeoutError:
        return False
    except BROKER_ERRORS as exc:
        channel_layer_outage.failed("wait_for_wakeup", exc)
        await _sleep_unless_shutdown(timeout - (time.monotonic() - started))
        return False
    finally:
        if channel is not None and not channel_layer_outage.should_skip():
            try:
                await asyncio.wait_for(layer.group_discard(group, channel), DISCARD_TIMEOUT_SECONDS)
            except (*BROKER_ERRORS, TimeoutError) as exc:
                channel_layer_outage.failed("wait_for_wakeup discard", exc)
