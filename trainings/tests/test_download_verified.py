"""The agent's model download: checked against the version's sha256, sent without Python copying it,
audited once per download; a corrupted blob is a 409 with a critical alert and is never served."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import httpx
import pytest
from django.db import connection

from monitoring.models import Alert, AuditLog
from versioning.blobs import blob_local_path
from versioning.models import ModelVersion


@pytest.fixture(autouse=True)
def _own_blob_store(settings: Any, tmp_path: Any) -> None:
    """Each test its own blob store: the corruption tests damage files on disk."""
    settings.MEDIA_ROOT = str(tmp_path / "media")


@pytest.fixture
def tasked(make_agent: Any, make_training: Any) -> tuple[Any, str, ModelVersion]:
    """An agent with a task in a running training, its token, and version 0 of that training."""
    (agent, token), _ = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    return agent, token, ModelVersion.objects.get(training=training, number=0)


def _corrupt_same_size(version: ModelVersion) -> None:
    path = blob_local_path(version.blob_name)
    assert path is not None
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))


def _stored_bytes(version: ModelVersion) -> bytes:
    path = blob_local_path(version.blob_name)
    assert path is not None
    with open(path, "rb") as handle:
        return handle.read()


def _body(response: Any) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


@pytest.mark.django_db
def test_download_serves_the_verified_bytes_and_audits_it(client: Any, tasked: Any) -> None:
    agent, token, version = tasked
    response = client.get(f"/api/v1/agent/models/{version.pk}", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200
    body = _body(response)
    assert body == _stored_bytes(version)
    assert hashlib.sha256(body).hexdigest() == version.blob_sha256
    assert response["ETag"] == f'"{version.blob_sha256}"'
    assert response["Content-Length"] == str(len(body))
    assert "x-fedsite-sendfile" not in {k.lower() for k in response.headers}
    rows = AuditLog.objects.filter(action="version.download", object_id=str(version.pk))
    assert rows.count() == 1
    row = rows.get()
    assert row.actor_type == AuditLog.ActorType.AGENT and row.actor == agent.agent_id
    task = agent.tasks.get()
    assert row.details == {"number": 0, "task_id": str(task.pk), "round": 1}


@pytest.mark.django_db
def test_a_not_modified_download_is_not_audited(client: Any, tasked: Any) -> None:
    _, token, version = tasked
    response = client.get(
        f"/api/v1/agent/models/{version.pk}",
        HTTP_AUTHORIZATION=f"Bearer {token}",
        HTTP_IF_NONE_MATCH=f'"{version.blob_sha256}"',
    )
    assert response.status_code == 304
    assert not AuditLog.objects.filter(action="version.download").exists()


@pytest.mark.django_db
def test_a_corrupted_blob_is_refused_409_with_a_critical_alert(client: Any, tasked: Any) -> None:
    _, token, version = tasked
    _corrupt_same_size(version)
    response = client.get(f"/api/v1/agent/models/{version.pk}", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "blob_corrupted"
    assert version.blob_sha256 in error["message"]
    alert = Alert.objects.get(training=version.training, kind=Alert.Kind.SYSTEM)
    assert alert.severity == Alert.Severity.CRITICAL and alert.details["version"] == 0
    assert not AuditLog.objects.filter(action="version.download").exists()


@pytest.mark.django_db
def test_a_missing_blob_file_is_refused_409_with_a_critical_alert_not_500(client: Any, tasked: Any) -> None:
    _, token, version = tasked
    served = client.get(f"/api/v1/agent/models/{version.pk}", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert served.status_code == 200  # verified once: this process remembers the file
    path = blob_local_path(version.blob_name)
    assert path is not None
    os.unlink(path)

    response = client.get(f"/api/v1/agent/models/{version.pk}", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "blob_corrupted" and "missing" in error["message"]
    assert version.blob_name in error["message"]  # names what to restore
    alert = Alert.objects.get(training=version.training, kind=Alert.Kind.SYSTEM)
    assert alert.severity == Alert.Severity.CRITICAL and "missing" in alert.details["actual"]
    assert AuditLog.objects.filter(action="version.download").count() == 1  # the first, served one


@pytest.mark.django_db
def test_a_blob_corrupted_after_it_was_served_is_refused(client: Any, tasked: Any) -> None:
    """The per-process 'already verified' memory notices the file changed (size, mtime or inode)."""
    _, token, version = tasked
    url, auth = f"/api/v1/agent/models/{version.pk}", {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    first = client.get(url, **auth)
    assert first.status_code == 200
    _body(first)
    path = blob_local_path(version.blob_name)
    assert path is not None
    before = os.stat(path).st_mtime_ns
    _corrupt_same_size(version)
    if os.stat(path).st_mtime_ns == before:  # a coarse clock: make the change visible as a real write would
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
    assert client.get(url, **auth).status_code == 409


@pytest.mark.django_db(transaction=True)
def test_through_the_asgi_application_the_file_is_sent_by_the_server_with_the_same_bytes(
    tasked: Any,
) -> None:
    """fedsite.asgi: the view names the file, BlobSendMiddleware sends it; bytes and headers are exact."""
    from fedsite.asgi import application

    _, token, version = tasked
    connection.close()

    async def download() -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(
                f"/api/v1/agent/models/{version.pk}", headers={"Authorization": f"Bearer {token}"}
            )

    response = asyncio.run(download())
    assert response.status_code == 200, response.content
    assert response.content == _stored_bytes(version)
    assert response.headers["etag"] == f'"{version.blob_sha256}"'
    assert response.headers["content-length"] == str(version.size_bytes)
    assert response.headers["content-type"] == "application/octet-stream"
    assert "x-fedsite-sendfile" not in response.headers
    assert AuditLog.objects.filter(action="version.download", object_id=str(version.pk)).count() == 1


def test_a_server_offering_path_send_gets_one_pathsend_message(tmp_path: Any) -> None:
    """The ASGI extension ``http.response.pathsend``: the file leaves as a path, not as body messages."""
    from fedsite.http_protocol import SENDFILE_HEADER, SENDFILE_SCOPE_KEY, BlobSendMiddleware

    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 1000)
    seen_scope: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen_scope.update(scope)
        headers = [(b"content-length", b"1000"), (SENDFILE_HEADER, str(blob).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def run(extensions: dict[str, Any]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "extensions": extensions}
        await BlobSendMiddleware(app)(scope, None, send)
        return sent

    with_pathsend = asyncio.run(run({"http.response.pathsend": {}}))
    assert seen_scope[SENDFILE_SCOPE_KEY] is True
    assert [m["type"] for m in with_pathsend] == ["http.response.start", "http.response.pathsend"]
    assert with_pathsend[1]["path"] == str(blob)
    assert all(k != SENDFILE_HEADER for k, _ in with_pathsend[0]["headers"])

    without = asyncio.run(run({}))
    assert [m["type"] for m in without] == ["http.response.start", "http.response.body", "http.response.body"]
    assert without[1]["body"] == b"x" * 1000 and without[1]["more_body"] is True
    assert without[2].get("more_body", False) is False


@pytest.mark.django_db
def test_a_pruned_version_is_410_not_500_and_is_not_audited(client: Any, tasked: Any) -> None:
    """An agent asking for an old version whose weights retention deleted gets a clear 410."""
    from django.utils import timezone

    _, token, version = tasked
    ModelVersion.objects.filter(pk=version.pk).update(blob_name="", blob_pruned_at=timezone.now())
    response = client.get(f"/api/v1/agent/models/{version.pk}", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 410, response.content
    error = response.json()["error"]
    assert error["code"] == "version_pruned" and "pruned" in error["message"]
    assert not AuditLog.objects.filter(action="version.download", object_id=str(version.pk)).exists()
