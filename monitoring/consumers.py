"""WebSocket consumer for ``/ws/<client_id>``: authenticate, join training groups, relay events.

Protocol (the seed's): the browser sends ``{"action": "subscribe", "training_id": "..."}`` (and
``unsubscribe``, ``ping``); the server sends ``{"type": "metric_update" | "round_completed" |
"training_completed" | "alert" | ..., "training_id": "...", ...}``; every connection also gets the
events of no training (system alerts: ``"training_id": null``) without subscribing. Only staff users
(session login) may connect. The consumer holds no logic beyond that.

Invariants: no frame a client sends raises out of the consumer. A binary, non-JSON or non-object frame
gets ``{"type": "error", ...}`` and the socket stays open; a frame over ``FEDSITE_WS_MAX_FRAME_BYTES``
gets an error frame and close code 1009. When the channel layer (Redis) fails, in the background receive
or in a group operation, the socket is closed with code 1011 and a reason, and the failure is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from monitoring.events import SYSTEM_GROUP, training_group

logger = logging.getLogger("monitoring.consumers")

CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
LAYER_UNAVAILABLE_REASON = "The live event service (Redis) is unavailable; reconnect later."


@database_sync_to_async
def _training_exists(training_id: str) -> bool:
    from trainings.models import Training

    return Training.objects.filter(pk=training_id).exists()


class TrainingEventsConsumer(AsyncJsonWebsocketConsumer):
    accepted = False
    layer_failed = False
    closed = False

    # channels' AsyncConsumer.__call__ assigns ``self.channel_receive`` (the channel layer's receive for
    # this consumer) and then awaits it next to the client's messages; an exception there (Redis down)
    # would end the application with no close frame. The setter wraps it so a failure becomes a message.
    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict[str, Any]]]:
        return self._guarded_channel_receive

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._layer_receive = receive

    async def _guarded_channel_receive(self) -> dict[str, Any]:
        if self.layer_failed:
            await asyncio.Event().wait()  # nothing more will come; cancelled when the consumer exits
        try:
            return await self._layer_receive()
        except Exception as exc:
            self.layer_failed = True
            logger.warning("channel_layer_receive_failed error=%r", exc)
            return {"type": "channel_layer.unavailable"}

    async def channel_layer_unavailable(self, message: dict[str, Any]) -> None:
        if self.accepted:  # before connect() has run, connect() sees layer_failed and closes
            await self._close_unavailable()

    async def _close_unavailable(self) -> None:
        if not self.closed:
            self.closed = True
            await self.close(code=CLOSE_INTERNAL_ERROR, reason=LAYER_UNAVAILABLE_REASON)

    async def _layer_call(self, operation: str, group: str) -> bool:
        """Run ``group_add`` or ``group_discard``; on a channel-layer failure close with 1011."""
        try:
            await getattr(self.channel_layer, operation)(group, self.channel_name)
        except Exception as exc:
            self.layer_failed = True
            logger.warning("channel_layer_%s_failed group=%s error=%r", operation, group, exc)
            await self._close_unavailable()
            return False
        return True

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_staff", False):
            await self.close(code=4401)
            return
        self.client_id = self.scope["url_route"]["kwargs"].get("client_id", "")
        self.groups_joined: set[str] = set()
        await self.accept()
        self.accepted = True
        if self.layer_failed:
            await self._close_unavailable()
            return
        if not await self._layer_call("group_add", SYSTEM_GROUP):  # system alerts reach every dashboard
            return
        self.groups_joined.add(SYSTEM_GROUP)
        await self.send_json({"type": "connected", "client_id": self.client_id})

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", set()):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception as exc:  # the layer is gone; its group memberships expire on their own
                logger.warning("channel_layer_group_discard_failed group=%s error=%r", group, exc)
                break

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if self.closed:
            return
        limit = settings.FEDSITE_WS_MAX_FRAME_BYTES
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > limit:
            await self.send_json(
                {
                    "type": "error",
                    "code": "frame_too_large",
                    "message": f"Frames must be at most {limit} bytes. Found {size}; the socket is closed.",
                }
            )
            self.closed = True
            await self.close(code=CLOSE_MESSAGE_TOO_BIG)
            return
        if text_data is None:
            await self.send_json(
                {"type": "error", "code": "binary_frame", "message": "Send text frames of JSON, not binary."}
            )
            return
        try:
            content = json.loads(text_data)
        except ValueError as exc:
            await self.send_json(
                {
                    "type": "error",
                    "code": "invalid_json",
                    "message": f"The frame is not valid JSON ({exc.msg} at position {exc.pos}); "
                    'send {"action": "subscribe", "training_id": "..."}.',
                }
            )
            return
        await self.receive_json(content, **kwargs)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "message": "Send a JSON object with an 'action'."})
            return
        action = content.get("action")
        if action == "ping":
            await self.send_json({"type": "pong"})
            return
        if action not in ("subscribe", "unsubscribe"):
            await self.send_json(
                {"type": "error", "message": "Unknown action; use subscribe, unsubscribe or ping."}
            )
            return
        training_id = str(content.get("training_id", ""))
        try:
            training_id = str(uuid.UUID(training_id))
        except ValueError:
            await self.send_json(
                {"type": "error", "message": f"training_id {training_id!r} is not a valid id."}
            )
            return
        group = training_group(training_id)
        if action == "subscribe":
            if not await _training_exists(training_id):
                await self.send_json({"type": "error", "message": f"No training with id {training_id}."})
                return
            if not await self._layer_call("group_add", group):
                return
            self.groups_joined.add(group)
            await self.send_json({"type": "subscribed", "training_id": training_id})
        else:
            if not await self._layer_call("group_discard", group):
                return
            self.groups_joined.discard(group)
            await self.send_json({"type": "unsubscribed", "training_id": training_id})

    async def training_event(self, message: dict[str, Any]) -> None:
        if self.closed:  # a close frame went out: the ASGI server accepts nothing after it
            return
        await self.send_json(
            {"type": message["event"], "training_id": message["training_id"], **message["payload"]}
        )
