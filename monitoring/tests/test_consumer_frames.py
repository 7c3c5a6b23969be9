"""The dashboard consumer against hostile frames and a channel layer whose Redis is away: an error frame
or a clean close, never an exception out of the application."""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import Client

from fedsite.asgi import application
from monitoring.tests.communicator import WebsocketCommunicator
from monitoring.tests.factories import make_training

pytestmark = pytest.mark.django_db(transaction=True)


def _session_for(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def _communicator(session_key: str) -> WebsocketCommunicator:
    headers = [
        (b"origin", b"http://testserver"),
        (b"host", b"testserver"),
        (b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_key}".encode()),
    ]
    return WebsocketCommunicator(application, f"/ws/frames-{uuid.uuid4().hex[:12]}", headers=headers)


async def _connected(session: str) -> WebsocketCommunicator:
    communicator = _communicator(session)
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    assert (await communicator.receive_json_from(timeout=5))["type"] == "connected"
    return communicator


async def _send_text(communicator: WebsocketCommunicator, text: str) -> None:
    await communicator.send_input({"type": "websocket.receive", "text": text})


async def _finish(communicator: WebsocketCommunicator) -> None:
    """Disconnect and wait for the application to end; re-raises anything it raised."""
    await communicator.disconnect(timeout=5)
    assert communicator.future.done()
    assert communicator.future.exception() is None


def test_non_json_frame_gets_an_error_frame_and_the_socket_stays_usable(admin_user: Any) -> None:
    session = _session_for(admin_user)

    async def run() -> list[dict[str, Any]]:
        communicator = await _connected(session)
        frames = []
        await _send_text(communicator, "this is {not json")
        frames.append(await communicator.receive_json_from(timeout=5))
        await _send_text(communicator, "[1, 2, 3]")
        frames.append(await communicator.receive_json_from(timeout=5))
        await communicator.send_input({"type": "websocket.receive", "bytes": b"\x00\x01binary"})
        frames.append(await communicator.receive_json_from(timeout=5))
        await communicator.send_json_to({"action": "ping"})
        frames.append(await communicator.receive_json_from(timeout=5))
        await _finish(communicator)
        return frames

    not_json, array, binary, pong = async_to_sync(run)()

    assert not_json["type"] == "error"
    assert not_json["code"] == "invalid_json"
    assert "subscribe" in not_json["message"]
    assert array["type"] == "error"
    assert binary == {"type": "error", "code": "binary_frame", "message": binary["message"]}
    assert pong == {"type": "pong"}


def test_a_two_megabyte_frame_gets_an_error_frame_and_close_1009(admin_user: Any) -> None:
    session = _session_for(admin_user)
    frame = json.dumps({"action": "subscribe", "training_id": "x" * (2 * 1024 * 1024)})

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        communicator = await _connected(session)
        await _send_text(communicator, frame)
        error = await communicator.receive_json_from(timeout=5)
        close = await communicator.receive_output(timeout=5)
        await _finish(communicator)
        return error, close

    error, close = async_to_sync(run)()

    assert error["type"] == "error"
    assert error["code"] == "frame_too_large"
    assert str(settings.FEDSITE_WS_MAX_FRAME_BYTES) in error["message"]
    assert close == {"type": "websocket.close", "code": 1009}


def test_a_frame_just_under_the_limit_is_handled_normally(admin_user: Any) -> None:
    session = _session_for(admin_user)
    padding = "p" * (settings.FEDSITE_WS_MAX_FRAME_BYTES - 100)
    frame = json.dumps({"action": "ping", "padding": padding})
    assert len(frame) <= settings.FEDSITE_WS_MAX_FRAME_BYTES

    async def run() -> dict[str, Any]:
        communicator = await _connected(session)
        await _send_text(communicator, frame)
        reply = await communicator.receive_json_from(timeout=5)
        await _finish(communicator)
        return reply

    assert async_to_sync(run)() == {"type": "pong"}


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def redis_away(settings: Any) -> None:
    """A real channels_redis layer whose Redis is on a port nothing listens on."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{_closed_port()}/0"]},
        }
    }


async def _outputs_until_close(communicator: WebsocketCommunicator) -> list[dict[str, Any]]:
    outputs = []
    while True:
        output = await communicator.receive_output(timeout=5)  # raises what the application raised
        outputs.append(output)
        if output["type"] == "websocket.close":
            return outputs


@pytest.mark.parametrize("subscribe", [False, True], ids=["idle", "subscribing"])
def test_with_redis_away_the_socket_is_closed_with_1011_and_a_reason(
    admin_user: Any, redis_away: None, subscribe: bool
) -> None:
    training = make_training("away")
    session = _session_for(admin_user)

    async def run() -> list[dict[str, Any]]:
        communicator = _communicator(session)
        await communicator.send_input({"type": "websocket.connect"})
        if subscribe:
            await communicator.send_json_to({"action": "subscribe", "training_id": str(training.pk)})
        outputs = await _outputs_until_close(communicator)
        await _finish(communicator)
        return outputs

    outputs = async_to_sync(run)()

    assert outputs[0]["type"] == "websocket.accept"
    close = outputs[-1]
    assert close["code"] == 1011
    assert "Redis" in close["reason"]
    assert not any('"subscribed"' in output.get("text", "") for output in outputs)
