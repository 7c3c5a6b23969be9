"""Per-endpoint request-body limits and body-read deadlines, as ASGI middleware in front of Django.

Invariants, whatever a client sends:

- a body whose ``Content-Length`` exceeds its endpoint's limit is answered 413 before one byte of it is
  read; a body without ``Content-Length`` (chunked) is counted as it arrives and cut off at the limit;
- a body that is not complete within its endpoint's deadline, or that stalls longer than
  ``FEDSITE_BODY_IDLE_TIMEOUT`` between two chunks, is answered 408;
- every refusal has the API's JSON error shape and ``Connection: close``, so the rest of the body is
  never read;
- an HTTP/1.x request with neither ``Content-Length`` (or 0) nor ``Transfer-Encoding`` has no body by the
  protocol, and passes through untouched (most GETs: polls, downloads, pages); HTTP/2 requests are
  always counted.

Only the update upload and the secure-aggregation answer take ``FEDSITE_MAX_UPDATE_BYTES`` (the tighter
per-task limit is applied by the view); the rest of the API takes ``FEDSITE_MAX_JSON_BODY_BYTES`` and
everything else (admin and dashboard forms) ``FEDSITE_MAX_FORM_BODY_BYTES``. Once a request's body is
complete, ``receive`` is passed through untouched, so Django's wait for a client disconnect during a
long-poll has no deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings

# the update upload, and a secure-aggregation answer (a masked input is model-sized)
UPLOAD_PATH = re.compile(r"\A/api/v1/agent/tasks/[^/]+/(update|secagg)/?\Z")
# Room for the multipart boundaries, part headers and the ``meta`` part around the update itself.
MULTIPART_OVERHEAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes an endpoint reads, and the seconds its whole body may take to arrive."""

    max_bytes: int
    timeout: float


def body_limit_for(path: str) -> BodyLimit:
    """The body limit of the endpoint at ``path``."""
    if UPLOAD_PATH.match(path):
        return BodyLimit(
            settings.FEDSITE_MAX_UPDATE_BYTES + MULTIPART_OVERHEAD_BYTES, settings.FEDSITE_UPLOAD_TIMEOUT
        )
    if path.startswith("/api/"):
        return BodyLimit(settings.FEDSITE_MAX_JSON_BODY_BYTES, settings.FEDSITE_BODY_TIMEOUT)
    return BodyLimit(settings.FEDSITE_MAX_FORM_BODY_BYTES, settings.FEDSITE_BODY_TIMEOUT)


def _error_body(code: str, message: str, details: dict[str, Any]) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()


async def send_error(send: Any, status: int, code: str, message: str, details: dict[str, Any]) -> None:
    """Answer with the API's JSON error shape and close the connection (the body is left unread)."""
    body = _error_body(code, message, details)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: dict[str, Any]) -> int | str | None:
    """The Content-Length header as an int, None when absent, or the raw text when it is malformed."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else text
    return None


def _has_no_body(scope: dict[str, Any]) -> bool:
    """Whether an HTTP/1.x request declares no body: no ``Transfer-Encoding`` (the caller checked
    ``Content-Length``). HTTP/2 and later frame bodies without either header: never assumed empty."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False
    return not any(name == b"transfer-encoding" for name, _ in scope.get("headers", []))


class _GuardedBody:
    """``receive`` and ``send`` of one request, with the body counted and read under a deadline."""

    def __init__(self, receive: Any, send: Any, limit: BodyLimit) -> None:
        self._receive = receive
        self._send = send
        self.limit = limit
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._deadline = loop.time() + limit.timeout
        self._idle = settings.FEDSITE_BODY_IDLE_TIMEOUT
        self.received = 0
        self.body_complete = False
        self.refused = False
        self.response_started = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.refused:
            return  # the refusal is the response; the application may still try to answer after it
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _refuse(self, status: int, code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
        if not self.response_started and not self.refused:
            self.refused = True
            await send_error(self._send, status, code, message, details)
        self.refused = True
        return {"type": "http.disconnect"}

    async def receive(self) -> dict[str, Any]:
        if self.refused:
            return {"type": "http.disconnect"}
        if self.body_complete:
            return await self._receive()  # e.g. Django listening for a disconnect: no deadline
        remaining = min(self._deadline - self._loop.time(), self._idle)
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):  # (no task per chunk, as wait_for would make)
                message = await self._receive()
        except TimeoutError:
            return await self._refuse(
                408,
                "request_timeout",
                f"The request body did not arrive in time (at most {self.limit.timeout:g} s in all and "
                f"{self._idle:g} s between two chunks); {self.received} bytes were received. Send it again "
                "faster.",
                {"received_bytes": self.received},
            )
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.max_bytes:
                return await self._refuse(
                    413,
                    "payload_too_large",
                    f"The request body is larger than {self.limit.max_bytes} bytes, the most this endpoint "
                    "accepts.",
                    {"max_bytes": self.limit.max_bytes},
                )
            if not message.get("more_body", False):
                self.body_complete = True
        return message


class RequestLimitsMiddleware:
    """ASGI middleware applying :func:`body_limit_for` to every HTTP request (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit_for(scope.get("path", ""))
        declared = _declared_length(scope)
        if isinstance(declared, str):
            await send_error(
                send,
                400,
                "bad_request",
                f"Content-Length must be a non-negative integer. Found {declared!r}.",
                {"content_length": declared},
            )
            return
        if declared is not None and declared > limit.max_bytes:
            await send_error(
                send,
                413,
                "payload_too_large",
                f"The request body is {declared} bytes; this endpoint accepts at most {limit.max_bytes}.",
                {"max_bytes": limit.max_bytes, "content_length": declared},
            )
            return
        if declared in (None, 0) and _has_no_body(scope):
            # HTTP/1.x with neither Content-Length (or 0) nor Transfer-Encoding: the body is empty by the
            # protocol (RFC 9112, 6.3); the server has it already, so there is nothing to count or time.
            await self.app(scope, receive, send)
            return
        guarded = _GuardedBody(receive, send, limit)
        await self.app(scope, guarded.receive, guarded.send)
