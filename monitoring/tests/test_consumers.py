"""The dashboard WebSocket consumer over the real ASGI stack (session auth, origin check, Redis layer)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.test import Client

from fedsite.asgi import application
from monitoring.events import event_send
from monitoring.tests.communicator import WebsocketCommunicator
from monitoring.tests.factories import make_training

pytestmark = pytest.mark.django_db(transaction=True)


def _headers(session_key: str | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    if session_key:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_key}".encode()))
    return headers


def _session_for(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def _communicator(session_key: str | None = None) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application, f"/ws/dashboard-{uuid.uuid4().hex[:12]}", headers=_headers(session_key)
    )


@pytest.mark.skipif(settings.EMBEDDED, reason="the embedded mode uses the in-memory channel layer by design")
def test_channel_layer_is_the_real_redis_layer():
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"


def test_anonymous_connection_is_refused_with_4401():
    async def run() -> tuple[bool, Any]:
        communicator = _communicator()
        result = await communicator.connect()
        await communicator.disconnect()
        return result

    connected, code = async_to_sync(run)()

    assert connected is False
    assert code == 4401


def test_logged_in_non_staff_user_is_refused(django_user_model):
    user = django_user_model.objects.create_user(username="viewer", password="x-very-long-pass")
    session = _session_for(user)

    async def run() -> tuple[bool, Any]:
        communicator = _communicator(session)
        result = await communicator.connect()
        await communicator.disconnect()
        return result

    connected, code = async_to_sync(run)()

    assert (connected, code) == (False, 4401)


def test_staff_subscribes_and_receives_a_round_completed_event(admin_user):
    training = make_training("ws")
    session = _session_for(admin_user)

    async def run() -> tuple[dict, dict, dict]:
        communicator = _communicator(session)
        connected, _ = await communicator.connect()
        assert connected
        hello = await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"action": "subscribe", "training_id": str(training.pk)})
        subscribed = await communicator.receive_json_from(timeout=5)
        await sync_to_async(event_send)(
            training_id=training.pk,
            event="round_completed",
            payload={"round": 3, "version": 3, "metrics": {"accuracy": 0.75}},
        )
        event = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return hello, subscribed, event

    hello, subscribed, event = async_to_sync(run)()

    assert hello["type"] == "connected"
    assert subscribed == {"type": "subscribed", "training_id": str(training.pk)}
    assert event == {
        "type": "round_completed",
        "training_id": str(training.pk),
        "round": 3,
        "version": 3,
        "metrics": {"accuracy": 0.75},
    }


def test_events_of_other_trainings_do_not_reach_the_subscriber(admin_user):
    watched, other = make_training("watched"), make_training("other")
    session = _session_for(admin_user)

    async def run() -> dict:
        communicator = _communicator(session)
        await communicator.connect()
        await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"action": "subscribe", "training_id": str(watched.pk)})
        await communicator.receive_json_from(timeout=5)
        await sync_to_async(event_send)(training_id=other.pk, event="alert", payload={"alert": {"id": 1}})
        await sync_to_async(event_send)(
            training_id=watched.pk,
            event="metric_update",
            payload={"round": 1, "metric": {"name": "loss", "value": 0.5, "round": 1}},
        )
        first = await communicator.receive_json_from(timeout=5)
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()
        return first

    first = async_to_sync(run)()

    assert first["type"] == "metric_update"
    assert first["training_id"] == str(watched.pk)
    assert first["metric"] == {"name": "loss", "value": 0.5, "round": 1}


@pytest.mark.parametrize(
    ("training_id", "expected"),
    [
        ("not-a-uuid", "is not a valid id"),
        (str(uuid.UUID(int=1)), "No training with id"),
    ],
)
def test_subscribe_to_unknown_or_invalid_training_gets_an_error(admin_user, training_id, expected):
    session = _session_for(admin_user)

    async def run() -> dict:
        communicator = _communicator(session)
        await communicator.connect()
        await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"action": "subscribe", "training_id": training_id})
        reply = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return reply

    reply = async_to_sync(run)()

    assert reply["type"] == "error"
    assert expected in reply["message"]


def test_a_system_alert_reaches_every_staff_socket_without_a_subscription(admin_user: Any) -> None:
    """Alerts of no training (resource exhaustion, say) go to every dashboard; a training's stay with its
    subscribers."""
    from django.db import transaction

    from monitoring.models import Alert
    from monitoring.services import alert_raise

    training = make_training("not subscribed")
    session = _session_for(admin_user)

    def raise_both() -> None:
        with transaction.atomic():
            alert_raise(kind=Alert.Kind.TOO_FEW_AGENTS, message="a training's alert", training=training)
            alert_raise(
                kind=Alert.Kind.RESOURCE_EXHAUSTED,
                message="disk almost full",
                severity=Alert.Severity.CRITICAL,
                subject="system:disk",
            )

    async def run() -> tuple[dict[str, Any], bool]:
        communicator = _communicator(session)
        connected, _ = await communicator.connect()
        assert connected
        assert (await communicator.receive_json_from(timeout=5))["type"] == "connected"
        await sync_to_async(raise_both)()
        event = await communicator.receive_json_from(timeout=5)
        nothing_more = await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()
        return event, nothing_more

    event, nothing_more = async_to_sync(run)()

    assert event["type"] == "alert" and event["training_id"] is None
    assert event["action"] == "raised"
    assert event["alert"]["message"] == "disk almost full" and event["alert"]["severity"] == "critical"
    assert nothing_more, "the training's alert must not reach a socket that did not subscribe to it"
