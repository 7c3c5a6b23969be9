"""The model download and the raw update upload served by ``fedsite.asgi.AgentTransferApp``: outside
Django's handler and DRF, with the same answers as the DRF views, an upload admitted before its body is
read, and nothing left behind by an upload that is refused or abandoned."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgiref.testing import ApplicationCommunicator
from django.db import connection

from fedsite.tests.asgi_scope import http_scope
from flcore.parameters import ParameterSpec, to_bytes
from monitoring.models import AuditLog
from trainings import services
from trainings.models import ClientUpdate
from versioning.models import ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)
META = json.dumps({"num_examples": 5})


@pytest.fixture(autouse=True)
def _own_stores(settings: Any, tmp_path: Path) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "spool")
    (tmp_path / "spool").mkdir()


def _spool_files(settings: Any) -> list[str]:
    return sorted(p.name for p in Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir())


def _update_bytes(training: Any, value: float) -> bytes:
    spec = ParameterSpec.from_json(training.parameter_spec)
    return to_bytes({t.name: np.full(t.shape, value, dtype=np.float32) for t in spec.tensors})


def _asgi(requests: list[dict[str, Any]], *, together: bool = False) -> list[httpx.Response]:
    """Send each request (httpx.request keyword arguments) to the ASGI application, in order (or all at
    once, ``together``), and check that none of them went through Django's handler (its
    ``request_started`` signal)."""
    from django.core.signals import request_started

    from fedsite.asgi import application

    connection.close()  # the application's threads use connections of their own
    signals: list[Any] = []

    def started(**kwargs: Any) -> None:
        signals.append(kwargs)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            if together:
                return list(await asyncio.gather(*(client.request(**request) for request in requests)))
            return [await client.request(**request) for request in requests]

    request_started.connect(started, weak=False)
    try:
        responses = asyncio.run(run())
    finally:
        request_started.disconnect(started)
    assert signals == [], "a request went through Django's handler"
    return responses


def _drf(client: Any, request: dict[str, Any]) -> Any:
    """The same request through Django's test client: Django's handler, the middleware and the DRF view."""
    headers = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in request.get("headers", {}).items()}
    content_type = headers.pop("HTTP_CONTENT_TYPE", None)
    if request["method"] == "GET":
        return client.get(request["url"], **headers)
    return client.post(request["url"], data=request.get("content", b""), content_type=content_type, **headers)


@pytest.fixture
def federation(make_agent: Any, make_training: Any) -> dict[str, Any]:
    (agent, token), (other, other_token) = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    return {
        "agent": agent,
        "token": token,
        "other_token": other_token,
        "training": training,
        "task": services.task_next_for_agent(agent=agent),
        "other_task": services.task_next_for_agent(agent=other),
        "version": ModelVersion.objects.get(training=training, number=0),
    }


def test_downloads_and_uploads_skip_djangos_handler_and_count_in_the_metrics(
    federation: dict[str, Any],
) -> None:
    from django_prometheus.middleware import Metrics

    version, task, token = federation["version"], federation["task"], federation["token"]
    body = _update_bytes(federation["training"], 0.25)
    auth = {"Authorization": f"Bearer {token}"}
    counted = Metrics.get_instance().responses_by_status_view_method
    before = {
        view: counted.labels(status=status, view=view, method=method)._value.get()
        for view, status, method in (("agent-model", "200", "GET"), ("agent-update", "201", "POST"))
    }
    download, upload = _asgi(
        [
            {"method": "GET", "url": f"/api/v1/agent/models/{version.pk}", "headers": auth},
            {
                "method": "POST",
                "url": f"/api/v1/agent/tasks/{task.pk}/update",
                "content": body,
                "headers": {**auth, "Content-Type": "application/octet-stream", "X-Update-Meta": META},
            },
        ]
    )

    # (_asgi checked that neither went through Django's handler)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == version.blob_sha256
    assert download.headers["etag"] == f'"{version.blob_sha256}"'
    assert download.headers["x-model-version"] == "0"
    assert download.headers["content-length"] == str(version.size_bytes)
    assert upload.status_code == 201, upload.text
    assert upload.json() == {
        "task_id": str(task.pk),
        "status": "accepted",
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    assert ClientUpdate.objects.get(task=task).blob_sha256 == upload.json()["sha256"]
    assert AuditLog.objects.filter(action="version.download", object_id=str(version.pk)).count() == 1
    assert (
        counted.labels(status="200", view="agent-model", method="GET")._value.get()
        == before["agent-model"] + 1
    )
    assert (
        counted.labels(status="201", view="agent-update", method="POST")._value.get()
        == before["agent-update"] + 1
    )


def test_every_answer_is_the_one_the_drf_views_give(client: Any, federation: dict[str, Any]) -> None:
    """Refusals and conditional answers, side by side with Django's handler and DRF (which the test
    client drives): the same status, error code and protocol headers, and nothing stored by either."""
    version, task, other_task = federation["version"], federation["task"], federation["other_task"]
    auth = {"Authorization": f"Bearer {federation['token']}"}
    raw = {**auth, "Content-Type": "application/octet-stream", "X-Update-Meta": META}
    good = _update_bytes(federation["training"], 0.5)
    nan = bytearray(good)
    nan[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    limit = services.update_max_bytes(federation["training"])
    model_url, upload_url = f"/api/v1/agent/models/{version.pk}", f"/api/v1/agent/tasks/{task.pk}/update"
    cases = {
        "not modified": {
            "method": "GET",
            "url": model_url,
            "headers": {**auth, "If-None-Match": f'"{version.blob_sha256}"'},
        },
        "no token": {"method": "GET", "url": model_url, "headers": {}},
        "unknown token": {
            "method": "GET",
            "url": model_url,
            "headers": {"Authorization": "Bearer fsa_unknown"},
        },
        "operator token": {"method": "GET", "url": model_url, "headers": {"Authorization": "Bearer fso_x"}},
        "unknown version": {
            "method": "GET",
            "url": "/api/v1/agent/models/0b7c5a3e-3a1d-4c6e-9a57-8d3c1f2e4b5a",
            "headers": auth,
        },
        "malformed version": {"method": "GET", "url": "/api/v1/agent/models/not-a-uuid", "headers": auth},
        "upload, no token": {
            "method": "POST",
            "url": upload_url,
            "content": good,
            "headers": {**raw, "Authorization": ""},
        },
        "upload, no meta": {
            "method": "POST",
            "url": upload_url,
            "content": good,
            "headers": {k: v for k, v in raw.items() if k != "X-Update-Meta"},
        },
        "upload, bad meta": {
            "method": "POST",
            "url": upload_url,
            "content": good,
            "headers": {**raw, "X-Update-Meta": '{"num_examples": 0}'},
        },
        "upload, not JSON meta": {
            "method": "POST",
            "url": upload_url,
            "content": good,
            "headers": {**raw, "X-Update-Meta": "{"},
        },
        "upload, another agent's task": {
            "method": "POST",
            "url": f"/api/v1/agent/tasks/{other_task.pk}/update",
            "content": good,
            "headers": raw,
        },
        "upload, unknown task": {
            "method": "POST",
            "url": "/api/v1/agent/tasks/0b7c5a3e-3a1d-4c6e-9a57-8d3c1f2e4b5a/update",
            "content": good,
            "headers": raw,
        },
        "upload, over the limit": {
            "method": "POST",
            "url": upload_url,
            "content": b"x" * (limit + 1),
            "headers": raw,
        },
        "upload, garbage": {
            "method": "POST",
            "url": upload_url,
            "content": b"\x00" * len(good),
            "headers": raw,
        },
        "upload, not finite": {"method": "POST", "url": upload_url, "content": bytes(nan), "headers": raw},
    }
    direct = dict(zip(cases, _asgi(list(cases.values())), strict=True))
    for name, request in cases.items():
        through_drf = _drf(client, request)
        ours = direct[name]
        assert ours.status_code == through_drf.status_code, (name, ours.text, through_drf.content)
        if ours.status_code >= 400:
            assert ours.json()["error"]["code"] == through_drf.json()["error"]["code"], (name, ours.text)
            assert ours.json()["error"]["message"], name
        for header in ("ETag", "WWW-Authenticate", "Retry-After"):
            assert ours.headers.get(header) == through_drf.headers.get(header), (name, header)
    assert direct["not modified"].status_code == 304
    assert direct["unknown token"].status_code == 401
    assert direct["upload, another agent's task"].json()["error"]["code"] == "not_your_task"
    assert direct["upload, over the limit"].json()["error"]["code"] == "update_too_large"
    assert direct["upload, not finite"].json()["error"]["code"].startswith("bad_update_")
    assert not ClientUpdate.objects.exists()
    assert not AuditLog.objects.filter(action="version.download").exists()


def test_an_upload_is_refused_before_its_body_is_read(settings: Any, federation: dict[str, Any]) -> None:
    """A stranger's token, another agent's task or a declared length over the task's limit is answered
    while not one byte of the body has been sent, with ``Connection: close``; no spool file is made."""
    from fedsite.asgi import application

    task, other_task = federation["task"], federation["other_task"]
    limit = services.update_max_bytes(federation["training"])

    def scope(task_id: Any, token: str, length: int) -> dict[str, Any]:
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(length).encode()),
            (b"authorization", f"Bearer {token}".encode()),
            (b"x-update-meta", META.encode()),
        ]
        return http_scope("POST", f"/api/v1/agent/tasks/{task_id}/update", headers)

    async def answer_without_a_body(request_scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], Any]:
        communicator = ApplicationCommunicator(application, request_scope)
        start = await communicator.receive_output(10)  # no http.request message was sent
        body = await communicator.receive_output(10)
        await communicator.wait(10)
        return start["status"], dict(start["headers"]), json.loads(body["body"])

    connection.close()
    cases = {
        "stranger": (scope(task.pk, "fsa_unknown", 1000), 401, "invalid_token"),
        "another agent's task": (scope(other_task.pk, federation["token"], 1000), 403, "not_your_task"),
        "declared over the limit": (scope(task.pk, federation["token"], limit + 1), 413, "update_too_large"),
    }
    bodies = {}
    for name, (request_scope, status, code) in cases.items():
        got_status, headers, bodies[name] = asyncio.run(answer_without_a_body(request_scope))
        assert (got_status, bodies[name]["error"]["code"]) == (status, code), (name, bodies[name])
        assert headers[b"connection"] == b"close", name
    assert bodies["declared over the limit"]["error"]["details"] == {"max_update_bytes": limit}
    assert _spool_files(settings) == []
    assert not ClientUpdate.objects.exists()


def test_an_upload_is_cut_off_at_its_tasks_limit_and_an_abandoned_one_leaves_nothing(
    settings: Any, federation: dict[str, Any]
) -> None:
    from fedsite.asgi import AgentRouter, AgentTransferApp

    task, token = federation["task"], federation["token"]
    limit = services.update_max_bytes(federation["training"])
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"transfer-encoding", b"chunked"),
        (b"authorization", f"Bearer {token}".encode()),
        (b"x-update-meta", META.encode()),
    ]
    scope = http_scope("POST", f"/api/v1/agent/tasks/{task.pk}/update", headers)

    async def never(*args: Any) -> None:
        raise AssertionError("not for Django")

    app = AgentRouter(never, never, AgentTransferApp())
    chunk = b"x" * (limit // 3 + 1)

    async def too_long() -> tuple[dict[str, Any], list[str]]:
        communicator = ApplicationCommunicator(app, scope)
        spooled: list[str] = []
        for _ in range(4):  # the fourth chunk is never asked for: the third passes the limit
            await communicator.send_input({"type": "http.request", "body": chunk, "more_body": True})
            await asyncio.sleep(0.05)
            spooled.append(",".join(_spool_files(settings)))
        start = await communicator.receive_output(10)
        body = await communicator.receive_output(10)
        await communicator.wait(10)
        return {"status": start["status"], "json": json.loads(body["body"])}, spooled

    async def abandoned() -> list[str]:
        communicator = ApplicationCommunicator(app, scope)
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": True})
        await asyncio.sleep(0.1)
        during = _spool_files(settings)
        await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(10)
        assert await communicator.receive_nothing(0.1)
        return during

    connection.close()
    refused, spooled = asyncio.run(too_long())
    assert refused["status"] == 413 and refused["json"]["error"]["code"] == "update_too_large", refused
    assert spooled[0] != "", "the body is spooled as it arrives"
    assert asyncio.run(abandoned()) != []
    assert _spool_files(settings) == []
    assert not ClientUpdate.objects.exists()


def test_a_model_in_a_remote_blob_store_is_streamed_verified(
    settings: Any, client: Any, make_agent: Any, make_training: Any
) -> None:
    """A storage with no local path (like an object store): the bytes are copied out, hashed on
    the way and streamed, the same through both paths."""
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "fedsite.tests.remote_storage.NoLocalPathStorage"},
    }
    from django.core.files.storage import default_storage

    from versioning.blobs import blob_local_path

    (_, token), _ = make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2)
    version = ModelVersion.objects.get(training=training, number=0)
    assert blob_local_path(version.blob_name) is None
    with default_storage.open(version.blob_name, "rb") as handle:
        stored = handle.read()
    url, auth = f"/api/v1/agent/models/{version.pk}", {"Authorization": f"Bearer {token}"}

    (direct,) = _asgi([{"method": "GET", "url": url, "headers": auth}])
    through_drf = _drf(client, {"method": "GET", "url": url, "headers": auth})

    assert direct.status_code == through_drf.status_code == 200, direct.text
    assert direct.content == b"".join(through_drf.streaming_content) == stored
    assert hashlib.sha256(direct.content).hexdigest() == version.blob_sha256
    assert direct.headers["content-length"] == str(len(stored))
    assert AuditLog.objects.filter(action="version.download", object_id=str(version.pk)).count() == 2


def test_uploads_that_arrive_together_share_batches(make_agent: Any, make_training: Any) -> None:
    from trainings.upload_batch import upload_batcher

    agents = [make_agent() for _ in range(6)]
    training = make_training(min_clients_per_round=6, max_clients_per_round=6)
    tasks = [services.task_next_for_agent(agent=agent) for agent, _ in agents]
    batches, requests = upload_batcher.batches, upload_batcher.requests
    uploads = [
        {
            "method": "POST",
            "url": f"/api/v1/agent/tasks/{task.pk}/update",
            "content": _update_bytes(training, 0.1 * (n + 1)),
            "headers": {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
                "X-Update-Meta": META,
            },
        }
        for n, ((_, token), task) in enumerate(zip(agents, tasks, strict=True))
    ]

    responses = _asgi(uploads, together=True)

    assert [r.status_code for r in responses] == [201] * 6, [r.text for r in responses]
    assert ClientUpdate.objects.filter(round__training=training).count() == 6
    assert upload_batcher.requests - requests == 12  # each upload's admission and acceptance
    assert upload_batcher.batches - batches <= 4, upload_batcher.batches - batches  # (2 here: one of each)
