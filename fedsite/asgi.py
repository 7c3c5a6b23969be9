"""ASGI entry point: HTTP (Django, behind the request limits) and WebSockets (Channels) on one server.

Django's requests run their sync code on kept threads (:class:`ReusedThreadASGIHandler`), not on a thread
started and joined per request.

The agent long-poll (``GET /api/v1/agent/tasks/next``) is routed to :class:`LongPollApp`: its async view
awaited directly, without Django's handler, its middleware chain or the per-request thread that
``asgiref.sync.ThreadSensitiveContext`` gives every Django request. Thousands of polls wait on one event
loop, each holding a future and a socket, no thread (trainings/wakeup.py); their database work runs in
batches on the event loop's executor (trainings/poll_batch.py). The view authenticates with the agent
token itself, sets no cookie and reads no session, so the middleware it skips (sessions, CSRF, messages,
authentication, clickjacking, security headers on a JSON response, Prometheus' request counters) has
nothing to do for it.
A raw update upload (``POST /api/v1/agent/tasks/<id>/update``, ``application/octet-stream``) is spooled by
:class:`RawUploadSpooler` as its body arrives: each chunk is hashed, counted and written once to the file
that becomes the blob, instead of Django's buffering of the whole body, then a copy of it into a file
hashed in a second pass. Django's handler then sees an empty body and the view takes the spooled file.
Model downloads whose blob is sent from a file (``trainings.api.agent_views.BlobFileResponse``) leave the
application as one ``http.response.pathsend`` message when the server offers the extension
(fedsite/http_protocol.py), else in large chunks read here (:class:`BlobSendMiddleware`).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedsite.settings")
get_asgi_application()  # django.setup(); the HTTP handler used is ReusedThreadASGIHandler below

import asyncio  # noqa: E402
import io  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

from asgiref.sync import ThreadSensitiveContext, sync_to_async  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, ASGIRequest  # noqa: E402
from django.core.handlers.base import BaseHandler  # noqa: E402
from django.core.handlers.exception import response_for_exception  # noqa: E402
from django.http import FileResponse  # noqa: E402

from fedsite.http_protocol import BlobSendMiddleware  # noqa: E402
from fedsite.limits import (  # noqa: E402
    UPDATE_UPLOAD_PATH,
    RequestLimitsMiddleware,
    body_limit_for,
    send_error,
)
from monitoring.routing import websocket_urlpatterns  # noqa: E402
from trainings.api.agent_views import DIRECT_SCOPE_KEY, SPOOLED_BODY_SCOPE_KEY, next_task_view  # noqa: E402
from versioning.blobs import BlobSpoolWriter, BlobTooLarge  # noqa: E402

LONG_POLL_PATH = "/api/v1/agent/tasks/next"
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
        while True:  # a GET's body, if any, is read and ignored (RequestLimitsMiddleware bounds it)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body", False):
                break
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
            response = await sync_to_async(response_for_exception, thread_sensitive=False)(request, exc)
        finally:
            watcher.cancel()
        headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
        body = response.content
        if not response.has_header("Content-Length"):
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _cancel_on_disconnect(receive: Any, task: asyncio.Task[Any], gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    task.cancel()


class AgentLongPollRouter:
    """Send ``GET`` long-polls to :class:`LongPollApp` and every other HTTP request to Django."""

    def __init__(self, django_app: Any, long_poll_app: Any) -> None:
        self.django_app = django_app
        self.long_poll_app = long_poll_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path") == LONG_POLL_PATH:
            await self.long_poll_app(scope, receive, send)
        else:
            await self.django_app(scope, receive, send)


def _is_raw_upload(scope: dict[str, Any]) -> bool:
    if scope["type"] != "http" or scope.get("method") != "POST":
        return False
    if not UPDATE_UPLOAD_PATH.match(scope.get("path", "")):
        return False
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/octet-stream"
    return False


async def _spool_body(receive: Any, writer: BlobSpoolWriter) -> bool:
    """Write the request's body chunks to ``writer``; return False if the request ended before its body."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        writer.write(message.get("body", b""))
        if not message.get("more_body", False):
            return True


class RawUploadSpooler:
    """Spool a raw update upload's body to its blob file as it arrives, then hand Django an empty body.

    Behind :class:`~fedsite.limits.RequestLimitsMiddleware`: a declared length over the upload limit was
    answered 413 before one byte was read, and a longer body is cut off there (its ``receive`` then says
    ``http.disconnect``: the file is removed and nothing is stored). Each chunk is hashed and written once
    (``versioning.blobs.BlobSpoolWriter``); the view's service holds the size to the task's own limit and
    validates the file, which becomes the blob when the update is accepted. The file is removed after the
    response whatever happened (a no-op once it was moved into the store). Every other request passes
    through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not _is_raw_upload(scope):
            await self.app(scope, receive, send)
            return
        writer = BlobSpoolWriter(max_bytes=body_limit_for(scope["path"]).max_bytes)
        try:
            complete = await _spool_body(receive, writer)
        except BlobTooLarge:
            writer.discard()
            await send_error(
                send,
                413,
                "payload_too_large",
                f"The request body is larger than {writer.max_bytes} bytes, the most this endpoint accepts.",
                {"max_bytes": writer.max_bytes},
            )
            return
        except BaseException:
            writer.discard()
            raise
        if not complete:  # the client left, or the limits middleware answered 408 / 413 already
            writer.discard()
            return
        spooled = writer.finish()
        delivered = False

        async def empty_body_then_passthrough() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()  # Django listening for a disconnect

        try:
            await self.app({**scope, SPOOLED_BODY_SCOPE_KEY: spooled}, empty_body_then_passthrough, send)
        finally:
            writer.discard()  # not accepted, or already moved into the store


application = ProtocolTypeRouter(
    {
        # Per-endpoint body limits and read deadlines before Django reads a byte (fedsite/limits.py).
        "http": RequestLimitsMiddleware(
            BlobSendMiddleware(
                AgentLongPollRouter(RawUploadSpooler(ReusedThreadASGIHandler()), LongPollApp())
            )
        ),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
