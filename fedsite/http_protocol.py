"""uvicorn's h11 protocol with a deadline on request headers (uvicorn has none of its own).

A connection that has not sent a complete request line and headers within ``header_timeout`` seconds of
opening, or of the end of its previous response, is closed. Idle keep-alive connections are closed by
uvicorn's ``timeout_keep_alive``; header size is bounded by ``h11_max_incomplete_event_size``; bodies are
bounded by :mod:`fedsite.limits`. Together no client holds a connection or memory for long without
sending a whole request.
"""

from __future__ import annotations

import asyncio
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
