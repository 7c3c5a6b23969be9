"""Push events to WebSocket subscribers of a training, only after the surrounding transaction commits.

Group name: ``training_<uuid-hex>``. The message type on the channel layer is dotted
(``training.event``); consumers relay ``{"type": <event>, "training_id": ..., **payload}`` to browsers.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger("monitoring.events")

EVENTS = (
    "metric_update",
    "round_completed",
    "training_completed",
    "alert",
    "training_started",
    "round_opened",
)


def training_group(training_id: Any) -> str:
    return f"training_{str(training_id).replace('-', '')}"


def event_send(*, training_id: Any, event: str, payload: dict[str, Any]) -> None:
    """Send now (use ``event_broadcast_on_commit`` from inside transactions)."""
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": "training.event", "event": event, "training_id": str(training_id), "payload": payload}
    try:
        async_to_sync(layer.group_send)(training_group(training_id), message)
    except Exception:  # a dashboard event must never break a round
        logger.exception("event_send_failed event=%s training_id=%s", event, training_id)


def event_broadcast_on_commit(*, training_id: Any, event: str, payload: dict[str, Any]) -> None:
    transaction.on_commit(lambda: event_send(training_id=training_id, event=event, payload=payload))
