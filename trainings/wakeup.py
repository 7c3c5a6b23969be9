"""Wake long-polling agents as soon as a task exists for them, at no cost per waiting poll.

A waiting poll registers a future in :data:`waiters` (this process's registry) and awaits it: no thread,
no query, no broker call of its own. ``wake_agents`` resolves the futures of this process directly and
sends one ``task.available`` message naming the agents to :data:`BROADCAST_GROUP`; each event loop of
each server process holds one subscription to that group (:class:`_Listener`) that relays the names to
its waiters. The safety net for a lost wake-up is :class:`SharedRecheck`: one query per process every
few seconds while polls wait, not one per poll, so a lost wake-up costs latency, never correctness.

Invariants: nothing here raises when Redis is away. ``wake_agents`` still wakes this process's polls and
drops the rest; ``wait_for_wakeup`` degrades to a plain sleep of its timeout (the caller then re-checks,
i.e. polls the database). The outage is logged once per process (``monitoring.events.channel_layer_outage``),
not once per request, and while it lasts Redis is probed at most once per ``probe_interval`` instead of
once per waiting agent. ``wait_for_wakeup`` also returns early when the server is shutting down
(:data:`shutdown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from monitoring.events import BROKER_ERRORS, channel_layer_outage

logger = logging.getLogger("trainings.wakeup")

#: Longest wait for leaving the group when a listener stops; a stuck Redis must not hold it.
DISCARD_TIMEOUT_SECONDS = 1.0
#: The channel-layer group every server process's listener joins; wake-ups name the agents.
BROADCAST_GROUP = "fedsite.task_wakeups"
#: Agents named in one wake-up message.
WAKE_BATCH = 1000
#: A listener renews its group membership this often (channels_redis expires it after a day by default).
GROUP_RENEW_SECONDS = 600.0
#: How long a wake-up is remembered for a poll that had not begun waiting yet (far longer than a poll
#: takes from its look for a task to its wait), and past how many remembered agents the old ones go.
WOKEN_MEMORY_SECONDS = 60.0
WOKEN_PRUNE_SIZE = 4096


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


def _agent_key(agent_pk: Any) -> str:
    return str(agent_pk)


class _Waiters:
    """Futures of the waiting long-polls of this process, by agent; safe to wake from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_agent: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        #: When each agent was last named by a wake-up (time.monotonic()), for WOKEN_MEMORY_SECONDS: a
        #: wake-up that arrives after a poll looked for its task but before it waits is not lost.
        self._woken: dict[str, float] = {}

    def add(self, key: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
        with self._lock:
            self._by_agent.setdefault(key, set()).add(entry)

    def discard(self, key: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
        with self._lock:
            entries = self._by_agent.get(key)
            if entries is not None:
                entries.discard(entry)
                if not entries:
                    del self._by_agent[key]

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._by_agent)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._by_agent.values())

    def woken_since(self, key: str, since: float) -> bool:
        """Whether a wake-up named this agent at or after ``since`` (a time.monotonic() reading)."""
        with self._lock:
            return self._woken.get(key, -math.inf) >= since

    def wake(self, keys: Iterable[str]) -> int:
        """Resolve the futures of these agents' waiting polls; return how many were woken. Every agent
        named is remembered for :data:`WOKEN_MEMORY_SECONDS` (:meth:`woken_since`)."""
        now = time.monotonic()
        with self._lock:
            keys = list(keys)
            self._woken.update(dict.fromkeys(keys, now))
            if len(self._woken) > WOKEN_PRUNE_SIZE:
                self._woken = {k: t for k, t in self._woken.items() if now - t <= WOKEN_MEMORY_SECONDS}
            entries = [entry for key in keys for entry in self._by_agent.get(key, ())]
        for loop, future in entries:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, future)
        return len(entries)


#: The waiting long-polls of this process.
waiters = _Waiters()


def _is_in_memory(layer: Any) -> bool:
    from channels.layers import InMemoryChannelLayer

    return isinstance(layer, InMemoryChannelLayer)


def wake_agents(agent_pks: Iterable[Any]) -> None:
    """Wake these agents' waiting polls, in this process and (through the channel layer) in every other.

    One ``task.available`` message to :data:`BROADCAST_GROUP` per :data:`WAKE_BATCH` agents, whatever the
    number of server processes; best effort, never raises.
    """
    keys = [_agent_key(pk) for pk in agent_pks]
    if not keys:
        return
    waiters.wake(keys)  # this process's polls need no broker
    layer = get_channel_layer()
    if layer is None or _is_in_memory(layer):  # an in-memory layer reaches only this process: done
        return
    for first in range(0, len(keys), WAKE_BATCH):
        if channel_layer_outage.should_skip():
            return
        try:
            async_to_sync(layer.group_send)(
                BROADCAST_GROUP, {"type": "task.available", "agents": keys[first : first + WAKE_BATCH]}
            )
        except BROKER_ERRORS as exc:  # the shared re-check finds the tasks anyway
            channel_layer_outage.failed("wake_agents", exc)
        except Exception:
            logger.warning("wake_failed agents=%d", len(keys), exc_info=True)
        else:
            channel_layer_outage.recovered()


class _Listener:
    """One subscription of this event loop to :data:`BROADCAST_GROUP`: relays wake-ups to :data:`waiters`.

    While it runs, a waiting poll needs nothing else: no query, no broker call of its own. It stops on a
    broker error (the outage is recorded); the next wait after ``probe_interval`` starts a new one.
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.subscribed = False
        self.ready = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    @property
    def alive(self) -> bool:
        return not self.task.done()

    async def _run(self) -> None:
        channel: str | None = None
        try:
            channel = await self.layer.new_channel()
            await self.layer.group_add(BROADCAST_GROUP, channel)
            self.subscribed = True
            self.ready.set()
            channel_layer_outage.recovered()
            renewed = time.monotonic()
            while True:
                if time.monotonic() - renewed > GROUP_RENEW_SECONDS:  # before the group membership expires
                    await self.layer.group_add(BROADCAST_GROUP, channel)
                    renewed = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GROUP_RENEW_SECONDS):
                        message = await self.layer.receive(channel)
                        waiters.wake(str(key) for key in message.get("agents", ()))
        except BROKER_ERRORS as exc:
            channel_layer_outage.failed("wake-up listener", exc)
        except Exception:
            logger.warning("wakeup_listener_failed", exc_info=True)
        finally:
            self.subscribed = False
            self.ready.set()  # nobody waits for a listener that has stopped
            if channel is not None and not channel_layer_outage.should_skip():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.layer.group_discard(BROADCAST_GROUP, channel), DISCARD_TIMEOUT_SECONDS
                    )


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = weakref.WeakKeyDictionary()


def _ensure_listener(layer: Any) -> _Listener | None:
    """This loop's listener, started if needed; None when there is no broker to listen to."""
    if layer is None or _is_in_memory(layer):
        return None
    loop = asyncio.get_running_loop()
    listener = _listeners.get(loop)
    if listener is not None and listener.layer is layer and listener.alive:
        return listener
    if channel_layer_outage.should_skip():
        return None
    listener = _Listener(layer)
    _listeners[loop] = listener
    return listener


async def wakeups_ready(timeout: float) -> bool:
    """Whether a wake-up sent by any process now reaches this loop's waiting polls.

    True with the in-memory layer (one process: wake-ups are delivered in process) and once this loop's
    broker listener has subscribed (waiting up to ``timeout`` seconds for a new one to do so). False
    without a channel layer and while the broker is away.
    """
    layer = get_channel_layer()
    if layer is None:
        return False
    if _is_in_memory(layer):
        return True
    listener = _ensure_listener(layer)
    if listener is None:
        return False
    if not listener.subscribed and timeout > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(listener.ready.wait()), timeout)
    return listener.subscribed


async def _sleep_unless_shutdown(seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shutdown.wait(), timeout=max(seconds, 0))


async def wait_for_wakeup(agent_pk: Any, timeout: float, *, since: float | None = None) -> bool:
    """Wait up to ``timeout`` seconds for a wake-up for this agent. True if one arrived.

    Returns False after ``timeout`` seconds without one, and at once when the server starts shutting
    down. The wait costs no thread and no broker call of its own: it registers a future in
    :data:`waiters`, which this process's :func:`wake_agents` and the loop's listener resolve. When the
    channel layer is unreachable no listener runs, and this is a plain sleep of ``timeout``. ``since``
    is when the caller last looked for the agent's task (time.monotonic()): a wake-up that named the
    agent since then, before this wait began, returns True at once (the task may have been issued just
    after the look).
    """
    if timeout <= 0:
        return False
    _ensure_listener(get_channel_layer())
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    entry = (loop, future)
    key = _agent_key(agent_pk)
    waiters.add(key, entry)
    if since is not None and waiters.woken_since(key, since):
        waiters.discard(key, entry)
        return True
    stop = asyncio.ensure_future(shutdown.wait())
    try:
        done, _ = await asyncio.wait({future, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return future in done
    finally:
        waiters.discard(key, entry)
        future.cancel()
        stop.cancel()
        await asyncio.gather(stop, return_exceptions=True)


# ----------------------------------------------------------------------------------------------------------
# One shared re-check per process: the safety net for lost wake-ups, whatever the number of waiting polls
# ----------------------------------------------------------------------------------------------------------
class SharedRecheck:
    """Every ``interval`` seconds while polls wait, one query finds which waiting agents have work.

    It wakes those agents' polls (they then fetch their task as after any wake-up). It replaces a
    re-check per waiting poll: its cost does not grow with the number of waiting agents. ``finder`` is a
    sync callable ``(agent keys) -> keys with work`` (``trainings.services.tasks_agents_with_work``); it
    runs in a worker thread. At most one re-check runs at a time in the process.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last = 0.0
        self._tasks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )
        self.runs = 0

    def ensure_running(self, finder: Callable[[list[str]], Iterable[str]]) -> None:
        loop = asyncio.get_running_loop()
        task = self._tasks.get(loop)
        if task is None or task.done():
            self._tasks[loop] = loop.create_task(self._run(finder))

    def _claim(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval * 0.9:  # another loop of this process just did it
                return False
            self._last = now
            return True

    async def _run(self, finder: Callable[[list[str]], Iterable[str]]) -> None:
        from asgiref.sync import sync_to_async

        while True:
            await asyncio.sleep(self.interval)
            keys = waiters.keys()
            if not keys:
                return  # started again by the next waiting poll
            if not self._claim():
                continue
            try:
                found = await sync_to_async(_call_and_release, thread_sensitive=False)(finder, keys)
                self.runs += 1
                waiters.wake(found)
            except Exception:  # one failed re-check must not end the loop; the next one retries
                logger.warning("shared_recheck_failed waiting=%d", len(keys), exc_info=True)


def _call_and_release(finder: Callable[[list[str]], Iterable[str]], keys: list[str]) -> list[str]:
    from django.db import connection

    try:
        return list(finder(keys))
    finally:
        connection.close()  # (a pooled connection goes back to the pool)
