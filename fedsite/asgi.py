"""ASGI entry point: HTTP (Django, behind the request limits) and WebSockets (Channels) on one server.

Django's requests run their sync code on kept threads (:class:`ReusedThreadASGIHandler`), not on a thread
started and joined per request.

The agent long-poll (``GET /api/v1/agent/tasks/next``) is routed to :class:`LongPollApp`: its async view
awaited directly, without Django's handler, its middleware chain or the per-request thread that
``asgiref.sync.ThreadSensitiveContext`` gives every Django request. Thousands of polls wait on one event
loop, each holding a future and a socket, no thread (trainings/wakeup.py); their database work runs in
batches on the event loop's executor (trainings/poll_batch.py). The view authenticates with the agent
token itself, sets no cookie and reads no session, so the middleware it skips (sessions, CSRF, messages,
authentication, clickjacking, security headers on a JSON response) has nothing to do for it; its
Prometheus request counters are kept (:func:`count_request`).
The model download (``GET /api/v1/agent/models/<id>``) and the raw update upload (``POST
/api/v1/agent/tasks/<id>/update``, ``application/octet-stream``) go to :class:`AgentTransferApp` the same
way: each agent fetches and sends a model every round, and through Django's handler, its middleware chain
and DRF each of those requests paid several milliseconds of plumbing around one or two queries. An
upload is checked (token, task, meta, declared length) BEFORE its body is read, then spooled as the body
arrives: each chunk hashed, counted against the task's limit and written once to the file that becomes
the blob. A model's bytes leave the application as one ``http.response.pathsend`` message when the server
offers the extension (fedsite/http_protocol.py), else in large chunks read here
(:class:`~fedsite.http_protocol.BlobSendMiddleware`). Everything else is Django's.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedsite.settings")
get_asgi_application()  # django.setup(); the HTTP handler used is ReusedThreadASGIHandler below

import asyncio  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

from asgiref.sync import ThreadSensitiveContext, sync_to_async  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, ASGIRequest  # noqa: E402
from django.core.handlers.base import BaseHandler  # noqa: E402
from django.core.handlers.exception import response_for_exception  # noqa: E402
from django.http import FileResponse, HttpResponseBase, JsonResponse  # noqa: E402
from django_prometheus.middleware import Metrics  # noqa: E402

from fedsite.errors import ServiceError  # noqa: E402
from fedsite.http_protocol import SENDFILE_SCOPE_KEY, BlobSendMiddleware  # noqa: E402
from fedsite.limits import RequestLimitsMiddleware  # noqa: E402
from fedsite.throttling import client_ip  # noqa: E402
from monitoring.routing import websocket_urlpatterns  # noqa: E402
from trainings.api.agent_views import (  # noqa: E402
    DIRECT_SCOPE_KEY,
    agent_error_response,
    direct_download,
    next_task_view,
    update_receipt,
)
from trainings.services.updates import update_too_large  # noqa: E402
from trainings.upload_batch import upload_batcher  # noqa: E402
from versioning.blobs import BlobSpoolWriter, BlobTooLarge  # noqa: E402

LONG_POLL_PATH = "/api/v1/agent/tasks/next"
#: The model download and the update upload (Django's URLs ``agent-model`` and ``agent-update``).
MODEL_DOWNLOAD_PATH = re.compile(r"\A/api/v1/agent/models/(?P<version_id>[^/]+)\Z")
UPDATE_UPLOAD_PATH = re.compile(r"\A/api/v1/agent/tasks/(?P<task_id>[^/]+)/update\Z")
#: One-thread executors kept for Django's requests (more are made, and dropped after, under a burst).
REQUEST_THREADS_KEPT = 16


class ReusedThreadASGIHandler(ASGIHandler):
    """Django's ASGI handler, running each request's middleware chain and view in ONE trip to a kept thread.

    Django gives every request a ``ThreadSensitiveContext``, which starts a new thread for the request's
    first sync call and joins it at the end: a thread start and stop per upload or download. Here the
    context runs on one of :data:`REQUEST_THREADS_KEPT` executors handed from request to request (one
    request at a time each, as Django requires; a WSGI server reuses its threads the same way); when all
    are busy, a request gets a new one, shut down after it.

    The middleware chain is loaded in its synchronous mode and called once in that thread, as a WSGI
    server would. In its asynchronous mode every ``MiddlewareMixin`` middleware (all of Django's own,
    Prometheus', django-axes') hands ``process_request`` and ``process_response`` to the request's thread
    and back, about twenty trips per request: a profile of 50 agents' rounds found a fifth of the
    server's GIL time in those hand-overs (``ThreadPoolExecutor.submit``, ``_restore_context``). The same
    middleware runs in the same order; an async view (none is routed here) would run through
    ``async_to_sync`` as under WSGI.
    """

    def __init__(self, kept: int = REQUEST_THREADS_KEPT) -> None:
        BaseHandler.__init__(self)
        self.load_middleware(is_async=False)
        self._kept = kept
        self._lock = threading.Lock()
        self._idle: list[ThreadPoolExecutor] = []

    def _take(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="django-request")

    def _give_back(self, executor: ThreadPoolExecutor) -> None:
        with self._lock:
            if len(self._idle) < self._kept:
                self._idle.append(executor)
                return
        executor.shutdown(wait=False)

    async def run_get_response(self, request: Any) -> Any:
        """The synchronous chain and view, in one trip to this request's thread (see the class docstring)."""
        response = await sync_to_async(self.get_response, thread_sensitive=True)(request)
        response._handler_class = self.__class__
        if isinstance(response, FileResponse):  # as ASGIHandler: the server chunks the body itself
            response.block_size = self.chunk_size
        return response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self._take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self._give_back(executor)


class LongPollApp:
    """The agent long-poll as a plain ASGI application: its view, and none of Django's handler around it.

    Thousands of waiting agents each start a poll every ``wait`` seconds. Through Django's handler each
    start paid for URL resolution, the ``request_started`` and ``request_finished`` signals (two trips to
    a thread: their receivers close the calling thread's database connections and caches, which a poll
    never uses; its database work runs in batches on the event loop's executor, trainings.poll_batch)
    and the handler's own tasks: with the database work batched, that plumbing was most of a poll's CPU
    (bench/poll_start.py; docs/benchmarks.md section 3d). Here the request is Django's own
    :class:`~django.core.handlers.asgi.ASGIRequest` (the same ``GET``, headers and ``META`` for the
    client's IP), the view is awaited directly, and its response (never streaming, never a cookie) goes
    out as two ASGI messages with its ``Content-Length``. As Django's handler does, a client that
    disconnects cancels the view, and an unexpected exception becomes Django's 500 response (logged,
    ``got_request_exception`` sent).
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not await _read_whole_body(receive):
            return
        started = time.perf_counter()
        request = ASGIRequest({**scope, DIRECT_SCOPE_KEY: True}, io.BytesIO())
        this = asyncio.current_task()
        assert this is not None
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, this, gone))
        try:
            response = await next_task_view(request)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            this.uncancel()  # the client left: nothing to answer (as Django's handler does)
            return
        except Exception as exc:
            response = await _in_thread(response_for_exception)(request, exc)
        finally:
            watcher.cancel()
        await send_response(send, response)
        count_request("agent-next-task", "GET", response.status_code, started)


async def _cancel_on_disconnect(receive: Any, task: asyncio.Task[Any], gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    task.cancel()


async def send_response(send: Any, response: HttpResponseBase) -> None:
    """Send a Django response as ASGI messages, with its ``Content-Length`` (a streaming one, which only a
    model from a remote blob store is here, in its chunks, read on a worker thread)."""
    headers = [(name.lower().encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
    if not response.streaming:
        body = response.content  # type: ignore[attr-defined]
        if not response.has_header("Content-Length"):
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    chunks = iter(response.streaming_content)  # type: ignore[attr-defined]
    try:
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        while (chunk := await _in_thread(next)(chunks, None)) is not None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await _in_thread(response.close)()


def count_request(view: str, method: str, status: int, started: float) -> None:
    """Count a request served outside Django's handler in django-prometheus' request metrics, as its
    middleware would have (``view`` is the URL's name): /metrics shows agent traffic either way."""
    metrics = Metrics.get_instance()
    code = str(status)
    metrics.requests_total.inc()
    metrics.responses_total.inc()
    metrics.requests_by_method.labels(method=method).inc()
    metrics.requests_by_transport.labels(transport="http").inc()
    metrics.requests_by_view_transport_method.labels(view=view, transport="http", method=method).inc()
    metrics.responses_by_status.labels(status=code).inc()
    metrics.responses_by_status_view_method.labels(status=code, view=view, method=method).inc()
    metrics.requests_latency_by_view_method.labels(view=view, method=method).observe(
        time.perf_counter() - started
    )


def _in_thread(function: Any) -> Any:
    """``function`` run on the event loop's shared executor (a request of :class:`AgentTransferApp` has no
    thread of its own; each of its calls hands its database connection back when it ends)."""
    return sync_to_async(function, thread_sensitive=False)


async def _read_whole_body(receive: Any) -> bool:
    """Read and drop a GET's body, if any (RequestLimitsMiddleware bounds it); False if the client left."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if not message.get("more_body", False):
            return True


async def _spool_body(receive: Any, writer: BlobSpoolWriter) -> bool:
    """Write the request's body chunks to ``writer``; return False if the request ended before its body."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        writer.write(message.get("body", b""))
        if not message.get("more_body", False):
            return True


class AgentTransferApp:
    """The model download and the raw update upload, served without Django's handler or DRF.

    Each agent downloads the round's model and uploads its update every round; through Django's handler
    each of those requests went through the middleware chain (ten middleware, none of which has anything
    to do for a token-authenticated binary transfer: sessions, CSRF, messages, user authentication,
    clickjacking and security headers are for browsers), URL resolution, DRF's request wrapping,
    content negotiation and exception handling, around one or two queries. Here the request is Django's
    own :class:`~django.core.handlers.asgi.ASGIRequest`, its work is one call on a worker thread for the
    download (``trainings.api.agent_views.direct_download``) and, for the upload, two steps queued for the
    batches it shares with the other uploads of the moment (``trainings.upload_batch``: admitted, then
    accepted); the same services, checks, errors and audit rows as the DRF views. The response goes out as
    ASGI messages. django-prometheus' request metrics are kept (:func:`count_request`); an unexpected error is
    Django's 500 response (logged, ``got_request_exception`` sent).

    A raw upload is admitted before one byte of its body is read: a wrong token (401, counted by the
    throttle), another agent's task (403), bad meta (400) or a declared length over the task's limit
    (413) is answered at once, with ``Connection: close``. Then the body is spooled as it arrives
    (``versioning.blobs.BlobSpoolWriter``: one hash and one write of each chunk) and cut off at the task's
    limit (413); a client that leaves half-way leaves nothing. The spooled body is validated and stored
    with the other uploads of its batch, and answered once their transaction commits. The spool file is
    removed after the response whatever happened (a no-op once it became the blob).
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, route: re.Match[str]) -> None:
        started = time.perf_counter()
        if scope["method"] == "GET":
            view, status = "agent-model", await self._download(scope, receive, send, route["version_id"])
        else:
            view, status = "agent-update", await self._upload(scope, receive, send, route["task_id"])
        if status is not None:  # (None: the client left before its answer)
            count_request(view, scope["method"], status, started)

    async def _download(self, scope: dict[str, Any], receive: Any, send: Any, version_id: str) -> int | None:
        if not await _read_whole_body(receive):
            return None
        request = ASGIRequest(scope, io.BytesIO())
        sendfile = bool(scope.get(SENDFILE_SCOPE_KEY))
        response = await self._call(request, direct_download, request, version_id, sendfile=sendfile)
        await send_response(send, response)
        return response.status_code

    async def _call(self, request: ASGIRequest, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await _in_thread(function)(*args, **kwargs)
        except Exception as exc:
            return await _in_thread(response_for_exception)(request, exc)

    async def _upload(self, scope: dict[str, Any], receive: Any, send: Any, task_id: str) -> int | None:
        request = ASGIRequest(scope, io.BytesIO())
        admission = await self._batched(
            request,
            upload_batcher.admit,
            request.headers.get("Authorization"),
            client_ip(request),
            task_id,
            request.headers,
        )
        if isinstance(admission, HttpResponseBase):  # refused before the body: it is left unread
            admission["Connection"] = "close"
            await send_response(send, admission)
            return admission.status_code
        writer = BlobSpoolWriter(max_bytes=admission.max_bytes)
        try:
            try:
                complete = await _spool_body(receive, writer)
            except BlobTooLarge:
                response: HttpResponseBase = agent_error_response(
                    update_too_large(f"more than {writer.max_bytes}", writer.max_bytes)
                )
                response["Connection"] = "close"
                await send_response(send, response)
                return response.status_code
            if not complete:  # the client left, or RequestLimitsMiddleware answered 408 / 413 already
                return None
            accepted = await self._batched(request, upload_batcher.accept, admission, writer.finish())
            if isinstance(accepted, tuple):
                update, created = accepted
                accepted = JsonResponse(update_receipt(update), status=201 if created else 200)
            await send_response(send, accepted)
            return accepted.status_code
        finally:
            writer.discard()  # not accepted, or already moved into the store

    async def _batched(self, request: ASGIRequest, step: Any, *args: Any) -> Any:
        """A step of an upload through the batches (trainings/upload_batch.py): its result, or the error
        response (the agent protocol's for a service error, Django's 500 for anything else)."""
        try:
            return await step(*args)
        except ServiceError as exc:
            return agent_error_response(exc)
        except Exception as exc:
            return await _in_thread(response_for_exception)(request, exc)


def _is_raw_upload(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/octet-stream"
    return False


class AgentRouter:
    """Send the agent protocol's long-poll to :class:`LongPollApp`, its model downloads and raw update
    uploads to :class:`AgentTransferApp`, and every other HTTP request to Django."""

    def __init__(self, django_app: Any, long_poll_app: Any, transfer_app: Any) -> None:
        self.django_app = django_app
        self.long_poll_app = long_poll_app
        self.transfer_app = transfer_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            method, path = scope.get("method"), scope.get("path", "")
            if method == "GET":
                if path == LONG_POLL_PATH:
                    await self.long_poll_app(scope, receive, send)
                    return
                if route := MODEL_DOWNLOAD_PATH.match(path):
                    await self.transfer_app(scope, receive, send, route)
                    return
            elif method == "POST" and (route := UPDATE_UPLOAD_PATH.match(path)) and _is_raw_upload(scope):
                await self.transfer_app(scope, receive, send, route)
                return
        await self.django_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        # Per-endpoint body limits and read deadlines before Django reads a byte (fedsite/limits.py).
        "http": RequestLimitsMiddleware(
            BlobSendMiddleware(AgentRouter(ReusedThreadASGIHandler(), LongPollApp(), AgentTransferApp()))
        ),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
