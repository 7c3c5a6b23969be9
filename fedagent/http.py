"""HTTP client for agent protocol v1 (``docs/agent-protocol.md``).

One method per endpoint. Every request goes through one retry loop (tenacity): connection errors and the
statuses 408, 429, 502, 503 and 504 are retried with exponential back-off and full jitter (AWS Architecture
Blog, "Exponential Backoff And Jitter", 2015), and a ``Retry-After`` header, when present, replaces the
computed wait. Other 4xx are never retried: they raise :class:`~fedagent.errors.AgentApiError` at once,
carrying the server's ``code`` and ``message``.

An upload can instead be retried until a point in time (``retry_until``: the task's deadline) rather than
for a fixed number of attempts, because the protocol says to keep an update's bytes until a 2xx: a
server that is restarting for ten seconds must not cost the agent its work. It is safe because uploads
are idempotent per task (the same body is answered 200 with the original receipt).

Invariants: the bearer token is only ever sent to the configured server's origin; response bodies are
read with a size cap; a back-off sleep ends early (raising :class:`~fedagent.errors.AgentStopped`) when
the ``stop_event`` given at construction is set.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from fedagent._version import __version__
from fedagent.errors import (
    AgentApiError,
    AgentConnectionError,
    AgentStopped,
    ProtocolError,
)
from fedagent.protocol import API_PREFIX

logger = logging.getLogger("fedagent.http")

#: Longest ``wait`` the server accepts on ``GET tasks/next``.
MAX_POLL_WAIT = 60
#: Cap on JSON response bodies; a larger one is a protocol error.
MAX_JSON_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    """A fully read HTTP response.

    Attributes
    ----------
    status : int
        The HTTP status (always below 400: errors raise instead).
    headers : httpx.Headers
        Response headers.
    body : bytes
        The body, read up to the request's size cap.
    """

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON, raising :class:`ProtocolError` if it is not."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ProtocolError(
                f"Expected a JSON body with HTTP {self.status}. Found {self.body[:200]!r}."
            ) from exc


@dataclass(frozen=True)
class UploadReceipt:
    """The server's answer to an accepted update.

    Attributes
    ----------
    task_id : str
        The task the update belongs to.
    status : str
        ``"accepted"``.
    sha256 : str
        SHA-256 of the ``update`` part as the server received it.
    replayed : bool
        True when the server had already stored this very update (HTTP 200 instead of 201).
    """

    task_id: str
    status: str
    sha256: str
    replayed: bool


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), None if absent or bad.

    Parameters
    ----------
    value : str or None
        The header's value.
    now : datetime, optional
        The current time, for HTTP-dates (defaults to now in UTC).

    Returns
    -------
    float or None
        Non-negative seconds, or None when the header is missing or unparseable.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _seconds_until(when: datetime) -> float:
    if when.tzinfo is None:  # the protocol sends offsets; a bare time is UTC
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def _error_from(status: int, headers: httpx.Headers, body: bytes, reason: str) -> AgentApiError:
    """Build the exception for an error response, reading the protocol's error shape when present."""
    retry_after = parse_retry_after(headers.get("Retry-After"))
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        details = error.get("details")
        return AgentApiError(
            status,
            error["code"],
            str(error.get("message") or reason),
            details if isinstance(details, dict) else None,
            retry_after=retry_after,
        )
    # Not our error shape (a proxy's HTML page, an empty 503): keep a short excerpt for the log.
    excerpt = body[:200].decode("utf-8", errors="replace").strip()
    return AgentApiError(
        status, f"http_{status}", excerpt or reason or f"HTTP {status}", retry_after=retry_after
    )


class AgentHttpClient:
    """Talk to one fedsite server as one agent.

    Parameters
    ----------
    server : str
        The server's root URL, e.g. ``"http://localhost:8000"`` (agent endpoints live under
        ``{server}/api/v1/agent/``).
    token : str, optional
        The agent's bearer token; may be set later through :attr:`token` (e.g. after enrolling).
    timeout : float
        Seconds for connecting and for each read; a long-poll adds its ``wait`` on top.
    max_attempts : int
        Attempts per request, the first included; 1 disables retries.
    backoff_base : float
        Multiplier of the exponential back-off, in seconds: attempt ``n`` waits a uniform random time in
        ``[0, min(backoff_max, backoff_base * 2**n)]``.
    backoff_max : float
        Cap of one computed back-off wait, in seconds.
    max_retry_after : float
        Cap on a server-sent ``Retry-After``, in seconds, so a bad header cannot stall the agent forever.
    stop_event : threading.Event, optional
        When set, back-off sleeps end at once with :class:`AgentStopped`.
    transport : httpx.BaseTransport, optional
        For tests (e.g. ``httpx.MockTransport``).
    log : logging.Logger or logging.LoggerAdapter, optional
        Where retries are logged (the agent passes one that carries its ``agent_id``).
    """

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 300.0,
        stop_event: threading.Event | None = None,
        transport: httpx.BaseTransport | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        parts = urlsplit(server)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(
                f"server must be an http(s) URL such as http://localhost:8000. Found {server!r}."
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1. Found {max_attempts}.")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive. Found {timeout}.")
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.stop_event = stop_event
        self._log = log or logger
        self._origin = (parts.scheme, parts.netloc)
        self._jitter = wait_random_exponential(multiplier=backoff_base, max=backoff_max)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            headers={"User-Agent": f"fedagent/{__version__}"},
            transport=transport,
            follow_redirects=False,
        )

    # -- plumbing -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> AgentHttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        """Resolve ``path`` against the server.

        ``"tasks/next"`` is an agent endpoint (under ``/api/v1/agent/``); ``"/api/..."`` is relative to the
        server's root (how the server writes ``model.url`` and ``upload_url``); an absolute URL must point
        at the same origin as the server, so that the token never leaks to another host.
        """
        if path.startswith(("http://", "https://")):
            parts = urlsplit(path)
            if (parts.scheme, parts.netloc) != self._origin:
                raise ProtocolError(f"Refusing to send the agent token to another origin: {path!r}.")
            return path
        if path.startswith("/"):
            return self.server + path
        return self.server + API_PREFIX + path

    def _sleep(self, seconds: float) -> None:
        if self.stop_event is None:
            time.sleep(seconds)
        elif self.stop_event.wait(seconds):
            raise AgentStopped("Stopped while waiting to retry.")

    def _wait(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, AgentApiError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        return float(self._jitter(retry_state))

    def _log_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        self._log.warning(
            "request failed (%s); retrying in %.2fs (attempt %d)",
            exc,
            wait,
            retry_state.attempt_number + 1,
        )

    def _send_once(
        self,
        method: str,
        url: str,
        *,
        auth: bool,
        headers: dict[str, str] | None,
        max_body_bytes: int,
        timeout: float | None,
        **kwargs: Any,
    ) -> Reply:
        all_headers = dict(headers or {})
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        request = self._client.build_request(
            method,
            url,
            headers=all_headers,
            timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            **kwargs,
        )
        response = self._client.send(request, stream=True)
        try:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
                raise ProtocolError(
                    f"{method} {url} answered {declared} bytes; the limit is {max_body_bytes}."
                )
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_body_bytes:
                    raise ProtocolError(f"{method} {url} answered more than {max_body_bytes} bytes.")
                chunks.append(chunk)
            body = b"".join(chunks)
        finally:
            response.close()
        if response.status_code >= 400:
            raise _error_from(response.status_code, response.headers, body, response.reason_phrase)
        return Reply(status=response.status_code, headers=response.headers, body=body)

    def request(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        max_body_bytes: int = MAX_JSON_BYTES,
        timeout: float | None = None,
        retry_read_errors: bool = True,
        retry_until: datetime | None = None,
        **kwargs: Any,
    ) -> Reply:
        """Send one request with retries and return the reply of the first non-retryable answer.

        Parameters
        ----------
        method : str
            HTTP method.
        path : str
            Endpoint, resolved by :meth:`url`.
        auth : bool
            Send the bearer token.
        headers : dict, optional
            Extra request headers.
        max_body_bytes : int
            Cap on the response body.
        timeout : float, optional
            Overrides the client's timeout for this request.
        retry_read_errors : bool
            Also retry when the request may have reached the server (read timeout, connection reset). Set
            False for requests that are not idempotent (enroll): then only failures to connect are retried.
        retry_until : datetime, optional
            Keep retrying until this time (UTC when naive), not only ``max_attempts`` times: no retry
            starts after it once ``max_attempts`` attempts were made, and back-off waits (``Retry-After``
            included) are cut so that one last attempt happens at it. Only for idempotent requests.
        **kwargs
            Passed to ``httpx.Client.build_request`` (``json``, ``params``, ``files``, ``data``).

        Returns
        -------
        Reply
            Status below 400.

        Raises
        ------
        AgentApiError
            The server answered 4xx/5xx (after retries for 429/502/503/504).
        AgentConnectionError
            The server could not be reached after all attempts.
        AgentStopped
            The ``stop_event`` was set during a back-off sleep.
        """
        url = self.url(path)

        def should_retry(exc: BaseException) -> bool:
            if isinstance(exc, AgentApiError):
                return exc.retryable
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
                return True
            return retry_read_errors and isinstance(exc, httpx.TransportError)

        by_attempts = stop_after_attempt(self.max_attempts)
        stop: Callable[[RetryCallState], bool] = by_attempts
        wait: Callable[[RetryCallState], float] = self._wait
        if retry_until is not None:
            until = retry_until

            def wait(retry_state: RetryCallState) -> float:
                computed = self._wait(retry_state)
                remaining = _seconds_until(until)
                return min(computed, remaining) if remaining > 0 else computed

            def stop(retry_state: RetryCallState) -> bool:
                # Never fewer attempts than without a deadline (a clock behind the server's must not cost
                # the retries), then on until the deadline.
                return _seconds_until(until) <= 0 and by_attempts(retry_state)

        retrying = Retrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(should_retry),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._send_once(
                        method,
                        url,
                        auth=auth,
                        headers=headers,
                        max_body_bytes=max_body_bytes,
                        timeout=timeout,
                        **kwargs,
                    )
        except httpx.TransportError as exc:
            tried = (
                f"until {retry_until.isoformat()}"
                if retry_until is not None
                else f"after {self.max_attempts} attempt(s)"
            )
            raise AgentConnectionError(
                f"Could not reach {url} {tried}: {exc!r}. "
                "Check that the server is running and the URL is right."
            ) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    # -- endpoints ------------------------------------------------------------------------------------

    def enroll(
        self, enrollment_key: str, agent_id: str, capabilities: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST enroll``: register ``agent_id`` and return ``{"agent_id", "token", "heartbeat_interval"}``.

        Only failures to connect are retried: a retried enrolment that had in fact succeeded would get 409.
        """
        body: dict[str, Any] = {"enrollment_key": enrollment_key, "agent_id": agent_id}
        if capabilities is not None:
            body["capabilities"] = capabilities
        reply = self.request("POST", "enroll", auth=False, json=body, retry_read_errors=False)
        payload = reply.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("token"), str):
            raise ProtocolError(f"enroll answered without a token: {payload!r}.")
        return payload

    def heartbeat(self, state: str, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        """``POST heartbeat`` with ``state`` ``"idle"`` or ``"training"``; returns the server's JSON."""
        if state not in {"idle", "training"}:
            raise ValueError(f"state must be 'idle' or 'training'. Found {state!r}.")
        body: dict[str, Any] = {"state": state}
        if capabilities is not None:
            body["capabilities"] = capabilities
        payload = self.request("POST", "heartbeat", json=body).json()
        if not isinstance(payload, dict):
            raise ProtocolError(f"heartbeat answered {payload!r}, not an object.")
        return payload

    def next_task(self, wait: float = 30) -> dict[str, Any] | None:
        """``GET tasks/next?wait=``: the task JSON, or None when the server answered 204 (no task)."""
        wait_seconds = max(0, min(MAX_POLL_WAIT, int(wait)))
        reply = self.request(
            "GET",
            "tasks/next",
            params={"wait": wait_seconds},
            timeout=self.timeout + wait_seconds,
        )
        if reply.status == 204:
            return None
        payload = reply.json()
        if not isinstance(payload, dict):
            raise ProtocolError(f"tasks/next answered {payload!r}, not an object.")
        return payload

    def download_model(
        self,
        url: str,
        *,
        etag: str | None = None,
        max_bytes: int,
        retry_until: datetime | None = None,
    ) -> bytes | None:
        """``GET models/<version_id>``: the safetensors body, or None on 304 (``etag`` still current).

        Parameters
        ----------
        url : str
            ``task.model.url``.
        etag : str, optional
            SHA-256 of a cached copy; sent as ``If-None-Match``.
        max_bytes : int
            Cap on the body.
        retry_until : datetime, optional
            The task's deadline: a download is idempotent, so it is retried until then (a server that
            restarts for longer than the back-off of ``max_attempts`` must not cost the agent its task).
        """
        headers = {"If-None-Match": f'"{etag}"'} if etag else None
        reply = self.request("GET", url, headers=headers, max_body_bytes=max_bytes, retry_until=retry_until)
        if reply.status == 304:
            if etag is None:
                raise ProtocolError("The server answered 304 Not Modified to an unconditional request.")
            return None
        return reply.body

    def upload_update(
        self,
        upload_url: str,
        update: bytes,
        meta: dict[str, Any],
        *,
        deadline: datetime | None = None,
    ) -> UploadReceipt:
        """``POST tasks/<task_id>/update``: the safetensors bytes as the body, the meta JSON in a header.

        The raw ``application/octet-stream`` form of the protocol (the multipart form is equivalent):
        it spares the server a multipart parse and copies of a model-sized body. Safe to retry: the server
        answers 200 with the same receipt to an identical update.

        Parameters
        ----------
        upload_url, update, meta
            ``task.upload_url``, the safetensors bytes, ``{"num_examples", "metrics"}``.
        deadline : datetime, optional
            The task's deadline: retry (connection errors, 408/429/502/503/504, honouring ``Retry-After``)
            until then instead of ``max_attempts`` times. After it the server refuses the update anyway.
        """
        reply = self.request(
            "POST",
            upload_url,
            retry_until=deadline,
            content=update,
            headers={
                "Content-Type": "application/octet-stream",
                "X-Update-Meta": json.dumps(meta, allow_nan=False, separators=(",", ":")),
            },
        )
        payload = reply.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("sha256"), str):
            raise ProtocolError(f"update answered {payload!r}, without a sha256.")
        return UploadReceipt(
            task_id=str(payload.get("task_id", "")),
            status=str(payload.get("status", "")),
            sha256=payload["sha256"],
            replayed=reply.status == 200,
        )

    def register_identity_key(self, public_key: str, proof: str) -> dict[str, Any]:
        """``POST identity-key``: register this agent's Ed25519 identity key (base64), once."""
        payload = self.request("POST", "identity-key", json={"public_key": public_key, "proof": proof}).json()
        if not isinstance(payload, dict):
            raise ProtocolError(f"identity-key answered {payload!r}, not an object.")
        return payload

    def submit_secagg(
        self,
        upload_url: str,
        body: bytes,
        *,
        binary: bool,
        meta: dict[str, Any] | None = None,
        deadline: datetime | None = None,
    ) -> dict[str, Any]:
        """``POST tasks/<task_id>/secagg``: a phase's answer (JSON, or the masked input's safetensors).

        Safe to retry until ``deadline``: the same bytes again are answered 200 with the same receipt.
        """
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if meta is not None:
            headers["X-SecAgg-Meta"] = json.dumps(meta, allow_nan=False, separators=(",", ":"))
        payload = self.request("POST", upload_url, retry_until=deadline, content=body, headers=headers).json()
        if not isinstance(payload, dict):
            raise ProtocolError(f"secagg answered {payload!r}, not an object.")
        return payload

    def fail_task(self, task_id: str, reason: str, *, timeout: float | None = None) -> None:
        """``POST tasks/<task_id>/fail``: give the task back, saying why (at most 1000 characters)."""
        self.request(
            "POST", f"tasks/{quote(task_id, safe='')}/fail", json={"reason": reason[:1000]}, timeout=timeout
        )

    def training_status(self, training_id: str) -> dict[str, Any]:
        """``GET /api/training/<id>/status``: the status JSON (only trainings this agent takes part in)."""
        payload = self.request("GET", f"/api/training/{quote(training_id, safe='')}/status").json()
        if not isinstance(payload, dict):
            raise ProtocolError(f"training status answered {payload!r}, not an object.")
        return payload
