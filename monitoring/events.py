"""Push events to WebSocket subscribers of a training, only after the surrounding transaction commits.

Group name: ``training_<uuid-hex>``. The message type on the channel layer is dotted
(``training.event``); consumers relay ``{"type": <event>, "training_id": ..., **payload}`` to browsers.

Invariant: the channel layer (Redis) is best effort for every caller. Nothing here raises when it is
away, and an outage is logged once when it starts and once when it ends (:data:`channel_layer_outage`),
not once per message.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from redis.exceptions import RedisError

logger = logging.getLogger("monitoring.events")

EVENTS = (
    "metric_update",
    "round_completed",
    "training_completed",
    "alert",
    "training_started",
    "round_opened",
    "agent_update",
)


class BrokerOutage:
    """Process-wide record of whether the channel layer is reachable, so an outage is logged once.

    Callers report every failure (:meth:`failed`) and every success (:meth:`recovered`); the first failure
    logs a warning and the first success after it logs the recovery. While the broker is known to be down,
    :meth:`should_skip` tells callers to skip it for ``probe_interval`` seconds instead of paying a failed
    connection per request.

    Parameters
    ----------
    probe_interval : float
        Seconds between two attempts to reach a broker that is known to be down.
    """

    def __init__(self, probe_interval: float = 1.0) -> None:
        self.probe_interval = probe_interval
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_probe = 0.0

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def should_skip(self) -> bool:
        """True while the broker is down and the next probe is not due yet."""
        with self._lock:
            return self._down_since is not None and time.monotonic() < self._next_probe

    def failed(self, where: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            self._next_probe = now + self.probe_interval
        if first:
            logger.warning(
                "channel_layer_unreachable where=%s error=%r; wake-ups and live events are paused, "
                "long-polls fall back to re-checking the database",
                where,
                exc,
            )

    def recovered(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            logger.warning("channel_layer_reachable_again after=%.1fs", time.monotonic() - since)


#: What the channel layer raises when Redis is away (refused, reset, timed out); anything else is a bug.
BROKER_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

#: The one record for this process: the channel layer, wake-ups and events share one Redis.
channel_layer_outage = BrokerOutage()


#: Every staff WebSocket joins this group on connect: events of no training (system alerts) go to it.
SYSTEM_GROUP = "system_events"


def training_group(training_id: Any) -> str:
    return f"training_{str(training_id).replace('-', '')}"


def event_group(training_id: Any) -> str:
    """The group of a training's events, or :data:`SYSTEM_GROUP` for ``training_id=None``."""
    return SYSTEM_GROUP if training_id is None else training_group(training_id)


def event_send(*, training_id: Any, event: str, payload: dict[str, Any]) -> None:
    """Send now (use ``event_broadcast_on_commit`` from inside transactions). Never raises.

    ``training_id=None`` sends a system event (``"training_id": null``) to every connected dashboard."""
    layer = get_channel_layer()
    if layer is None or channel_layer_outage.should_skip():
        return
    subject = None if training_id is None else str(training_id)
    message = {"type": "training.event", "event": event, "training_id": subject, "payload": payload}
    try:
        async_to_sync(layer.group_send)(event_group(training_id), message)
    except BROKER_ERRORS as exc:  # a dashboard event must never break a round (nor the request that sent it)
        channel_layer_outage.failed(f"event {event} training_id={training_id}", exc)
    except Exception:
        logger.exception("event_send_failed event=%s training_id=%s", event, training_id)
    else:
        channel_layer_outage.recovered()


def event_broadcast_on_commit(*, training_id: Any, event: str, payload: dict[str, Any]) -> None:
    transaction.on_commit(lambda: event_send(training_id=training_id, event=event, payload=payload))
