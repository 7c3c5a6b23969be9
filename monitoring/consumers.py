"""WebSocket consumer for ``/ws/<client_id>``: authenticate, join training groups, relay events.

Protocol (the seed's): the browser sends ``{"action": "subscribe", "training_id": "..."}`` (and
``unsubscribe``, ``ping``); the server sends ``{"type": "metric_update" | "round_completed" |
"training_completed" | "alert" | ..., "training_id": "...", ...}``. Only staff users (session login) may
subscribe. The consumer holds no logic beyond that.
"""

from __future__ import annotations

import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from monitoring.events import training_group


@database_sync_to_async
def _training_exists(training_id: str) -> bool:
    from trainings.models import Training

    return Training.objects.filter(pk=training_id).exists()


class TrainingEventsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_staff", False):
            await self.close(code=4401)
            return
        self.client_id = self.scope["url_route"]["kwargs"].get("client_id", "")
        self.groups_joined: set[str] = set()
        await self.accept()
        await self.send_json({"type": "connected", "client_id": self.client_id})

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", set()):
            await self.channel_layer.group_discard(group, self.channel_name)

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
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.add(group)
            await self.send_json({"type": "subscribed", "training_id": training_id})
        else:
            await self.channel_layer.group_discard(group, self.channel_name)
            self.groups_joined.discard(group)
            await self.send_json({"type": "unsubscribed", "training_id": training_id})

    async def training_event(self, message: dict[str, Any]) -> None:
        await self.send_json(
            {"type": message["event"], "training_id": message["training_id"], **message["payload"]}
        )
