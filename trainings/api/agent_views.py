"""Agent protocol v1: long-poll for a task, download a model version, upload an update, give a task back.

The long-poll is an async view. Served by ``fedsite.asgi`` (its :class:`~fedsite.asgi.LongPollApp`:
no middleware, no per-request thread; ``scope[DIRECT_SCOPE_KEY]`` is set) a waiting poll holds no thread
and makes no query: it awaits a wake-up (trainings/wakeup.py), and one shared re-check per process
(:data:`shared_recheck`) catches lost ones. Its database work runs in batches shared with the polls
that start or wake at the same time (trainings/poll_batch.py), on the event loop's shared executor.
Through Django's own handler (the test client, another ASGI setup) the same view runs with
thread-sensitive database calls, one request at a time, as Django requires there. The rest are DRF views;
served by ``fedsite.asgi``, the model download and the raw upload skip them and Django's handler
(:class:`~fedsite.asgi.AgentTransferApp` calls :func:`direct_download`, and queues a raw upload's two steps
for the batches of trainings/upload_batch.py; both share the views' services and answers).

A model download is checked against the version's sha256 before it is served: the blob is hashed in one
pass the first time this process serves it, and again whenever its size, mtime or inode change
(:func:`versioning.blobs.blob_verified_path`); a mismatch is a 409 ``blob_corrupted`` with a critical
alert, never a served byte. The bytes then go out without passing through Python: named to
:class:`fedsite.http_protocol.BlobSendMiddleware` (a path-send where the server offers one). Every served
download is one row of the audit log (``version.download``, the agent and its task).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from clients.models import Agent
from clients.services import agent_authenticate
from fedsite.agent_auth import AgentTokenAuthentication, IsAgent
from fedsite.api import error_response
from fedsite.errors import (
    Forbidden,
    NotFound,
    ServiceError,
    ServiceUnavailable,
    ValidationFailed,
)
from fedsite.http_protocol import SENDFILE_CHUNK_BYTES, SENDFILE_HEADER, SENDFILE_SCOPE_KEY
from fedsite.parsers import StrictJSONParser
from fedsite.throttling import client_ip
from monitoring.health import open_long_polls
from trainings import services
from trainings.models import ClientUpdate
from trainings.poll_batch import POLL, START, Payload, poll_batcher, process_polls, release_connection
from trainings.services.tasks import agent_download_record, agent_download_task, tasks_agents_with_work
from trainings.wakeup import SharedRecheck, shutdown, wait_for_wakeup, wakeups_ready
from versioning.blobs import BlobHashMismatch, blob_verified_path
from versioning.models import ModelVersion
from versioning.services import version_require_blob

#: Re-check interval of a waiting poll while wake-ups are unreliable (the channel layer is away).
RECHECK_SECONDS = 2.0
#: Interval of the one re-check per process that catches lost wake-ups while polls wait.
SHARED_RECHECK_SECONDS = 5.0
#: How long a poll waits for this loop's wake-up listener to subscribe before trusting wake-ups.
LISTENER_READY_SECONDS = 0.5
#: Scope key set by ``fedsite.asgi.LongPollApp``: no thread of this request's own; its database
#: calls go to the event loop's shared executor.
DIRECT_SCOPE_KEY = "fedsite.direct_long_poll"

shared_recheck = SharedRecheck(SHARED_RECHECK_SECONDS)
#: Retry-After of the 503 that answers long-polls when the server shuts down (a restart takes seconds).
SHUTDOWN_RETRY_AFTER_SECONDS = 2


def _parse_wait(values: list[str]) -> float:
    """``wait`` from the query string: absent means 0; empty, repeated or out of range is a 400."""
    if not values:
        return 0.0
    if len(values) > 1:
        raise ValidationFailed(
            f"wait must be given once. Found it {len(values)} times: {values!r}.",
            details={"wait": "Repeated."},
        )
    raw = values[0]
    if not raw.strip():
        raise ValidationFailed(
            "wait must be a number of seconds; it is empty. Omit it or send e.g. wait=30.",
            details={"wait": "Empty."},
        )
    try:
        wait = float(raw)
    except ValueError as exc:
        raise ValidationFailed(f"wait must be a number of seconds. Found {raw!r}.") from exc
    if not 0 <= wait <= settings.FEDSITE_LONG_POLL_MAX:
        raise ValidationFailed(
            f"wait must be between 0 and {settings.FEDSITE_LONG_POLL_MAX} seconds. Found {raw}."
        )
    return wait


class _Polls:
    """This poll's database work: batched with the other polls of the event loop when served by
    ``fedsite.asgi.LongPollApp`` (:mod:`trainings.poll_batch`), else one request at a time on the
    request's thread, as Django requires there; either way :func:`trainings.poll_batch.process_polls`."""

    def __init__(self, request: HttpRequest) -> None:
        self.direct = bool(getattr(request, "scope", {}).get(DIRECT_SCOPE_KEY))

    async def _alone(self, item: tuple[str, Any]) -> tuple[Any, Payload]:
        (outcome,) = await sync_to_async(process_polls, thread_sensitive=True)([item])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def start(self, authorization: str | None, ip: str | None) -> tuple[Any, Payload]:
        if self.direct:
            return await poll_batcher.start(authorization, ip)
        return await self._alone((START, (authorization, ip)))

    async def poll(self, agent: Any) -> Payload:
        if self.direct:
            return await poll_batcher.poll(agent)
        return (await self._alone((POLL, agent)))[1]


def poll_duration(wait: float, draw: float | None = None) -> float:
    """How long a poll with nothing to do is held: ``wait`` shortened by up to ``FEDSITE_LONG_POLL_JITTER``
    of it, at random (``draw`` in [0, 1), for tests). Agents that connected in the same second then come
    back spread over that fraction of ``wait``, and spread further at every poll, instead of returning
    together every ``wait`` seconds: after a server restart thousands of them would otherwise keep
    arriving in one burst."""
    if draw is None:
        draw = random.random()
    return wait * (1.0 - float(settings.FEDSITE_LONG_POLL_JITTER) * draw)


def _shutting_down_response() -> HttpResponse:
    response = error_response(
        ServiceUnavailable(
            f"The server is restarting; poll again in {SHUTDOWN_RETRY_AFTER_SECONDS} seconds.",
            code="shutting_down",
        )
    )
    response["Retry-After"] = str(SHUTDOWN_RETRY_AFTER_SECONDS)
    return response


@csrf_exempt
async def next_task_view(request: HttpRequest) -> HttpResponse:
    """``GET /api/v1/agent/tasks/next?wait=<seconds>``: 200 with a task, or 204 after ``wait`` seconds (up
    to ``FEDSITE_LONG_POLL_JITTER`` of it sooner: :func:`poll_duration`).

    While the server shuts down a waiting poll is answered at once: its task if one exists, else 503 with
    ``Retry-After`` (never left to be cut off at the end of the graceful-shutdown period).
    """
    if request.method != "GET":
        return JsonResponse(
            {"error": {"code": "method_not_allowed", "message": "Use GET.", "details": {}}}, status=405
        )
    try:
        wait = _parse_wait(request.GET.getlist("wait"))
        if shutdown.is_set():
            return _shutting_down_response()
        polls = _Polls(request)
        looked = time.monotonic()  # a wake-up from now on is not lost, even before the poll waits
        agent, payload = await polls.start(request.headers.get("Authorization"), client_ip(request))
        deadline = time.monotonic() + poll_duration(wait)
        with open_long_polls.track():  # the gauge of /api/system/health and /metrics
            while True:
                if payload is not None:
                    return JsonResponse(payload)
                if shutdown.is_set():
                    return _shutting_down_response()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return HttpResponse(status=204)
                shared_recheck.ensure_running(tasks_agents_with_work)
                reliable = await wakeups_ready(min(remaining, LISTENER_READY_SECONDS))
                remaining = deadline - time.monotonic()
                # Wake-ups reach this loop: wait for one (or the deadline) with no query of our own.
                # Otherwise (broker away) re-check every RECHECK_SECONDS, as plain polling would.
                woken = await wait_for_wakeup(
                    agent.pk, remaining if reliable else min(remaining, RECHECK_SECONDS), since=looked
                )
                if woken and not shutdown.is_set():
                    looked = time.monotonic()
                    payload = await polls.poll(agent)
                    continue
                if shutdown.is_set() or (not reliable and time.monotonic() > deadline - 0.05):
                    payload = await polls.poll(agent)
                    if payload is not None:
                        return JsonResponse(payload)
                    return _shutting_down_response() if shutdown.is_set() else HttpResponse(status=204)
                if time.monotonic() >= deadline - 0.05:
                    return HttpResponse(status=204)
    except ServiceError as exc:
        return agent_error_response(exc)
    except asyncio.CancelledError:
        raise


def agent_error_response(exc: ServiceError) -> HttpResponse:
    """A service error as the agent protocol answers it outside DRF: the error JSON, ``Retry-After`` on a
    429 or 503, ``WWW-Authenticate`` on a 401 (as ``fedsite.api.exception_handler`` and DRF do)."""
    response = error_response(exc)
    if exc.status_code == 401:
        response["WWW-Authenticate"] = 'Bearer realm="fedsite-agent"'
    if exc.status_code == 503 and not response.has_header("Retry-After"):
        response["Retry-After"] = "5"
    return response


class ModelDownloadView(APIView):
    """``GET /api/v1/agent/models/<version_id>``: the version's safetensors bytes, ETag = sha256."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]

    @extend_schema(
        tags=["agent protocol"],
        responses={(200, "application/octet-stream"): bytes, 304: None},
        parameters=[OpenApiParameter("If-None-Match", str, OpenApiParameter.HEADER, required=False)],
    )
    def get(self, request: Request, version_id: str) -> HttpResponse:
        return model_download(
            agent=request.auth,
            version_id=version_id,
            if_none_match=request.headers.get("If-None-Match", ""),
            sendfile=bool(getattr(request._request, "scope", {}).get(SENDFILE_SCOPE_KEY)),
        )


def model_download(
    *, agent: Agent, version_id: str, if_none_match: str, sendfile: bool
) -> HttpResponse | StreamingHttpResponse:
    """The answer to an authenticated agent's model download: 404 ``version_not_found``, 403
    ``not_your_model``, 304 for a matching ``If-None-Match``, 410 ``version_pruned``, 409 ``blob_corrupted``,
    or the verified bytes (audited). With ``sendfile`` (``fedsite.http_protocol.BlobSendMiddleware`` is in
    front) a local blob is named in a header for the server to send, not read here."""
    try:
        version = ModelVersion.objects.get(pk=version_id)
    except (ModelVersion.DoesNotExist, ValueError, DjangoValidationError) as exc:
        raise NotFound(f"No model version {version_id!r}.", code="version_not_found") from exc
    task = agent_download_task(agent=agent, version=version)
    if task is None:
        raise Forbidden(
            "This agent has no task in the training of this model version.", code="not_your_model"
        )
    etag = f'"{version.blob_sha256}"'
    if if_none_match.strip() == etag:
        response = HttpResponse(status=304)
        response["ETag"] = etag
        return response
    version_require_blob(version)  # 410 version_pruned: retention deleted its weights
    response = _verified_blob_response(agent, version, sendfile)
    agent_download_record(agent=agent, version=version, task=task)
    response["ETag"] = etag
    response["X-Model-Version"] = str(version.number)
    return response


def _verified_blob_response(
    agent: Agent, version: ModelVersion, sendfile: bool
) -> HttpResponse | StreamingHttpResponse:
    """The version's bytes, checked against its sha256 (409 ``blob_corrupted`` and an alert if not)."""
    from versioning.services import _corrupted, version_open_verified

    try:
        local = blob_verified_path(version.blob_name, version.blob_sha256)
    except BlobHashMismatch as exc:
        raise _corrupted(version, exc.actual, blob="weights", expected=version.blob_sha256) from exc
    if local is None:  # not on local disk: copied to a temporary file, hashed in the same pass
        verified = version_open_verified(version=version, actor=agent, audit=False)  # audited below
        remote = FileResponse(verified, content_type="application/octet-stream")
        remote["Content-Length"] = str(version.size_bytes)
        return remote
    path, size = local
    if sendfile:  # fedsite.asgi sends the file
        response: HttpResponse | StreamingHttpResponse = HttpResponse(content_type="application/octet-stream")
        response[SENDFILE_HEADER.decode()] = path
    else:
        response = _LargeBlockFileResponse(open(path, "rb"), content_type="application/octet-stream")  # noqa: SIM115 (the response closes it)
    response["Content-Length"] = str(size)
    return response


class _LargeBlockFileResponse(FileResponse):
    """A FileResponse read in large blocks (Django's 4 KiB make a thousand messages of a 4 MiB model)."""

    block_size = SENDFILE_CHUNK_BYTES


def raw_upload_headers(headers: Mapping[str, str]) -> tuple[str, int | None]:
    """``(meta, declared length)`` of a raw (``application/octet-stream``) update upload: the JSON meta of
    its ``X-Update-Meta`` header and its ``Content-Length``, or a 400 saying what is missing."""
    meta = headers.get("X-Update-Meta")
    if meta is None:
        raise ValidationFailed(
            "A raw (application/octet-stream) update needs its JSON meta in the X-Update-Meta header.",
            details={"meta": "Required."},
        )
    declared = headers.get("Content-Length")
    if declared is not None and not declared.strip().isdigit():
        raise ValidationFailed(
            f"Content-Length must be a non-negative integer. Found {declared!r}.",
            details={"content_length": "Not an integer."},
        )
    return meta, int(declared) if declared is not None else None


def update_receipt(update: ClientUpdate) -> dict[str, str]:
    """The JSON body of an accepted upload (201 when it was stored now, 200 when it already was)."""
    return {"task_id": str(update.task_id), "status": "accepted", "sha256": update.blob_sha256}


# ----------------------------------------------------------------------------------------------------------
# The model download as fedsite.asgi.AgentTransferApp serves it: no middleware chain, no DRF; one trip to a
# worker thread, which hands its database connection back after it (the raw upload: trainings/upload_batch).
# ----------------------------------------------------------------------------------------------------------
def _authenticated(request: HttpRequest) -> Agent:
    return agent_authenticate(
        authorization=request.headers.get("Authorization"), client_ip=client_ip(request)
    )


def direct_download(request: HttpRequest, version_id: str, *, sendfile: bool) -> HttpResponse:
    """``GET /api/v1/agent/models/<version_id>``: as :class:`ModelDownloadView` answers it."""
    try:
        return model_download(
            agent=_authenticated(request),
            version_id=version_id,
            if_none_match=request.headers.get("If-None-Match", ""),
            sendfile=sendfile,
        )
    except ServiceError as exc:
        return agent_error_response(exc)
    finally:
        release_connection()


UPDATE_RESPONSE = inline_serializer(
    "UpdateAccepted",
    {
        "task_id": serializers.UUIDField(),
        "status": serializers.CharField(),
        "sha256": serializers.CharField(),
    },
)
UPDATE_REQUEST = inline_serializer(
    "UpdateUpload",
    {
        "update": serializers.FileField(help_text="safetensors: trained minus downloaded parameters, F32"),
        "meta": serializers.CharField(help_text='JSON: {"num_examples": int, "metrics": {...}}'),
    },
)


class UpdateUploadView(APIView):
    """``POST /api/v1/agent/tasks/<task_id>/update``.

    Two equivalent forms: multipart (part ``update``: safetensors, part ``meta``: JSON), or the raw
    safetensors bytes as an ``application/octet-stream`` body with the JSON meta in the ``X-Update-Meta``
    header. The raw form skips the multipart parser and its copies of a model-sized body.
    """

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]
    parser_classes = [MultiPartParser]

    def _raw_upload(self, request: Request, task_id: str) -> Response:
        # Served by fedsite.asgi, a raw upload never reaches this view (fedsite.asgi.AgentTransferApp
        # spools it as it arrives); here (the test client, another ASGI setup) the HttpRequest itself is
        # the stream the service reads in chunks.
        meta, declared = raw_upload_headers(request.headers)
        update, created = services.update_submit(
            agent=request.auth, task_id=task_id, body=request._request, meta=meta, declared_bytes=declared
        )
        return Response(
            update_receipt(update), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )

    @extend_schema(
        tags=["agent protocol"],
        request={"multipart/form-data": UPDATE_REQUEST, "application/octet-stream": bytes},
        parameters=[
            OpenApiParameter(
                "X-Update-Meta",
                str,
                OpenApiParameter.HEADER,
                required=False,
                description="JSON meta, required with an application/octet-stream body",
            )
        ],
        responses={201: UPDATE_RESPONSE, 200: UPDATE_RESPONSE},
    )
    def post(self, request: Request, task_id: str) -> Response:
        if request.content_type == "application/octet-stream":
            return self._raw_upload(request, task_id)
        upload = request.FILES.get("update")
        if upload is None:
            raise ValidationFailed(
                "The multipart body needs a file part named 'update' (safetensors).",
                details={"update": "Required."},
            )
        meta = request.data.get("meta")
        if meta is None:
            raise ValidationFailed(
                "The multipart body needs a part named 'meta' (JSON).", details={"meta": "Required."}
            )
        update, created = services.update_submit(
            agent=request.auth, task_id=task_id, body=upload, meta=meta, declared_bytes=upload.size
        )
        return Response(
            update_receipt(update), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class TaskFailView(APIView):
    """``POST /api/v1/agent/tasks/<task_id>/fail``: give the task back with a reason."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]
    parser_classes = [StrictJSONParser]

    @extend_schema(
        tags=["agent protocol"],
        request=inline_serializer("TaskFail", {"reason": serializers.CharField()}),
        responses={
            200: inline_serializer(
                "TaskFailed", {"task_id": serializers.UUIDField(), "status": serializers.CharField()}
            )
        },
    )
    def post(self, request: Request, task_id: str) -> Response:
        body = request.data if isinstance(request.data, dict) else {}
        task = services.task_fail(agent=request.auth, task_id=task_id, reason=body.get("reason"))
        return Response({"task_id": str(task.pk), "status": task.status})


NEXT_TASK_OPENAPI: dict[str, Any] = {
    "get": {
        "operationId": "agent_next_task",
        "summary": "Long-poll for the agent's next task",
        "description": "Returns 200 with a task as soon as one exists, or 204 with no body after `wait` "
        "seconds. Counts as a heartbeat. See docs/agent-protocol.md for the task JSON.",
        "tags": ["agent protocol"],
        "security": [{"agentToken": []}],
        "parameters": [
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "schema": {"type": "number", "minimum": 0, "maximum": 60},
            }
        ],
        "responses": {
            "200": {
                "description": "A task",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Task"}}},
            },
            "204": {"description": "No task within `wait` seconds"},
            "400": {"description": "`wait` empty, repeated, not a number or out of range"},
            "401": {"description": "Missing or invalid agent token"},
            "503": {
                "description": "The server is shutting down (`shutting_down`); poll again after Retry-After"
            },
        },
    }
}


TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A task of the agent protocol (docs/agent-protocol.md §3.3); "
    "built by trainings.selectors.task_payload",
    "required": [
        "task_id",
        "kind",
        "training_id",
        "round",
        "deadline",
        "model",
        "config",
        "upload_url",
        "max_update_bytes",
    ],
    "properties": {
        "task_id": {"type": "string", "format": "uuid"},
        "kind": {"type": "string", "description": "fit"},
        "training_id": {"type": "string", "format": "uuid"},
        "round": {"type": "integer", "minimum": 1},
        "deadline": {"type": "string", "format": "date-time"},
        "model": {
            "type": "object",
            "required": ["version_id", "number", "sha256", "url", "spec", "parameters"],
            "properties": {
                "version_id": {"type": "string", "format": "uuid"},
                "number": {"type": "integer", "minimum": 0},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "url": {"type": "string"},
                "spec": {"type": "object", "nullable": True, "description": "zoo model spec, null if custom"},
                "parameters": {
                    "type": "array",
                    "description": "name, shape and dtype of every tensor",
                    "items": {"type": "object"},
                },
            },
        },
        "config": {
            "type": "object",
            "description": "local training: local_epochs, batch_size, learning_rate, seed, proximal_mu, "
            "max_steps, local_dp...",
        },
        "upload_url": {"type": "string"},
        "max_update_bytes": {"type": "integer", "minimum": 1},
    },
}


def add_next_task_path(result: dict[str, Any], generator: Any, request: Any, public: Any) -> dict[str, Any]:
    """drf-spectacular post-processing hook: document the async long-poll view."""
    result.setdefault("paths", {})["/api/v1/agent/tasks/next"] = NEXT_TASK_OPENAPI
    result.setdefault("components", {}).setdefault("schemas", {})["Task"] = TASK_SCHEMA
    schemes = result.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["agentToken"] = {"type": "http", "scheme": "bearer", "description": "Agent token (fsa_...)"}
    return result
