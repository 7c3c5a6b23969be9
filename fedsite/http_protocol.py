"""uvicorn's h11 protocol with a deadline on request headers (uvicorn has none of its own).

A connection that has not sent a complete request line and headers within ``header_timeout`` seconds of
opening, or of the end of its previous response, is closed. Idle keep-alive connections are closed by
uvicorn's ``timeout_keep_alive``; header size is bounded by ``h11_max_incomplete_event_size``; bodies are
bounded by :mod:`fedsite.limits`. Together no client holds a connection or memory for long without
sending a whole request.

:class:`BlobSendMiddleware` (ASGI) sends a file named by the application as a response body without the
application reading it (model downloads).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections slow to send their request headers."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        # IDLE: h11 is still waiting for (the rest of) a request line and its headers.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("Closing a connection that sent no complete request headers in time.")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_header_deadline()  # the transport now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)


# ----------------------------------------------------------------------------------------------------------
# Files sent by the server, not through the application's body messages
# ----------------------------------------------------------------------------------------------------------
#: Response header (internal, never sent) naming a file to send as the body instead of the app's body.
SENDFILE_HEADER = b"x-fedsite-sendfile"
#: Scope key telling the application that :class:`BlobSendMiddleware` is in front of it.
SENDFILE_SCOPE_KEY = "fedsite.sendfile"
#: ASGI extension a server offers for sending a file by path (``http.response.pathsend``).
PATHSEND_EXTENSION = "http.response.pathsend"
SENDFILE_CHUNK_BYTES = 4 * 1024 * 1024


class BlobSendMiddleware:
    """ASGI middleware sending the file named by :data:`SENDFILE_HEADER` as the response body.

    The application answers with the headers (Content-Length included) and an empty body; this sends
    the file: as one ``http.response.pathsend`` message when the server offers that extension, else read
    in :data:`SENDFILE_CHUNK_BYTES` chunks on the event loop (page-cache reads of a few milliseconds) and
    passed to the server as they are, with the server's flow control between chunks. The application sees
    ``scope[SENDFILE_SCOPE_KEY]`` and sets the header only then; under any other server it streams the
    file itself. The file must not change while it is sent (blobs are immutable and content-addressed).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pathsend = PATHSEND_EXTENSION in (scope.get("extensions") or {})
        completed = False

        async def send_file_instead(message: dict[str, Any]) -> None:
            nonlocal completed
            if completed:
                return  # the app's (empty) closing body message after a pathsend
            if message["type"] != "http.response.start":
                await send(message)
                return
            headers = list(message.get("headers", []))
            path = next((bytes(v) for k, v in headers if k.lower() == SENDFILE_HEADER), None)
            if path is None:
                await send(message)
                return
            await send({**message, "headers": [(k, v) for k, v in headers if k.lower() != SENDFILE_HEADER]})
            if pathsend:
                await send({"type": PATHSEND_EXTENSION, "path": os.fsdecode(path)})
                completed = True
                return
            with open(path, "rb", buffering=0) as handle:
                while chunk := handle.read(SENDFILE_CHUNK_BYTES):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await self.app({**scope, SENDFILE_SCOPE_KEY: True}, receive, send_file_instead)
