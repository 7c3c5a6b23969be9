"""Throttling of failed authentication per client IP, and the lockout answer of django-axes.

Invariants:

- Only failures are counted (a wrong or malformed agent token, operator token, metrics token or enrolment
  key). A request with a valid credential never adds to a counter, so busy agents are never throttled.
- Counters are per scope and per client IP, in the Django cache (Redis on the real stack, shared by every
  ASGI process; locmem embedded), as DRF's sliding windows (``SimpleRateThrottle``'s timestamp history).
  One IP's failures never affect another IP.
- Once an IP has ``N`` failures within the period of its scope's rate (``FEDSITE_AUTH_FAILURE_RATES``),
  every attempt of that scope from it is refused with 429 and ``Retry-After`` *before* the credential is
  checked: a guess that happens to be right is refused too, so refusals tell an attacker nothing.
- A failure is always checked against the shared counter before it is answered (429 once over the limit,
  in every process). A success is checked too, except when this process let the same credential through
  from the same IP within the credential cache's TTL (``clients.services``: an agent token, at most
  ``FEDSITE_AGENT_TOKEN_CACHE_SECONDS``) and has seen no failure of that scope from that IP since the
  window began (:func:`auth_failure_suspected`). A right guess is never such a repeat, so a throttled IP
  still learns nothing from a refusal; what it may keep doing for that TTL is use a credential this
  process already accepted from it, which tells it nothing new.
- The counters fail open: when the cache is unreachable (Redis down) a warning is logged and nothing is
  throttled, so agents keep authenticating against the database.
- The client IP is the socket's address unless ``FEDSITE_NUM_PROXIES`` trusted proxies add
  ``X-Forwarded-For`` (DRF's rule, also used for django-axes), so a client cannot choose its own IP.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Iterable
from typing import Any

from axes.backends import AxesStandaloneBackend
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.html import format_html
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

from fedsite.errors import TooManyRequests

logger = logging.getLogger("fedsite.throttling")

WHAT = {
    "agent_token": "failed agent-token authentications",
    "operator_token": "failed operator-token authentications",
    "enrollment": "failed enrolments",
    "metrics_token": "failed /metrics authentications",
}


def client_ip(request: Any) -> str:
    """The client's IP as DRF sees it (``REMOTE_ADDR``, or X-Forwarded-For behind trusted proxies).

    A request with no address (a unix socket with no proxy header) is counted in one shared bucket.
    """
    return login_client_ip(request) or "unknown"


def login_client_ip(request: Any) -> str | None:
    """``AXES_CLIENT_IP_CALLABLE``: the same rule, None when unknown (axes stores it as an IP field)."""
    return BaseThrottle().get_ident(request) or None


class FailedAuthenticationThrottle(SimpleRateThrottle):
    """DRF's sliding-window throttle, counting failures instead of requests (see the module docstring)."""

    cache_format = "fedsite:auth-failures:%(namespace)s:%(scope)s:%(ident)s"

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__()

    def get_rate(self) -> str:  # read at each use, so a changed setting applies at once
        return settings.FEDSITE_AUTH_FAILURE_RATES[self.scope]

    def key_for(self, ident: str) -> str:
        return self.cache_format % {
            "namespace": settings.FEDSITE_AUTH_FAILURE_NAMESPACE,
            "scope": self.scope,
            "ident": ident,
        }

    def _load(self, ident: str) -> None:
        self.key = self.key_for(ident)
        self.now = self.timer()
        self.history = [t for t in self.cache.get(self.key, []) if t > self.now - self.duration]

    def retry_after(self, ident: str) -> int | None:
        """Seconds until the next attempt is allowed, or None when it is allowed now."""
        return self.retry_after_many([ident]).get(ident)

    def retry_after_many(self, idents: Collection[str]) -> dict[str, int]:
        """:meth:`retry_after` of several IPs in one cache round trip: only those that must wait."""
        keys = {ident: self.key_for(ident) for ident in idents}
        stored = self.cache.get_many(list(keys.values())) if keys else {}
        now = self.timer()
        waits = {}
        for ident, key in keys.items():
            history = [t for t in stored.get(key, []) if t > now - self.duration]
            if len(history) >= self.num_requests:
                # The attempt is allowed again once the N-th newest failure leaves the window.
                waits[ident] = max(1, math.ceil(history[self.num_requests - 1] + self.duration - now))
        return waits

    def record_failure(self, ident: str) -> None:
        self._load(ident)
        self.history.insert(0, self.now)
        self.cache.set(self.key, self.history[: max(self.num_requests, 1) * 2], self.duration)


class _LocalFailures:
    """When this process last counted a failure of each (scope, IP), keyed as the shared counters are
    (with ``FEDSITE_AUTH_FAILURE_NAMESPACE``): the cheap check of :func:`auth_failure_suspected`.
    Bounded: past ``LOCAL_FAILURES_MAX_ENTRIES`` the older half goes."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def note(self, scope: str, ident: str) -> None:
        key = (settings.FEDSITE_AUTH_FAILURE_NAMESPACE, scope, ident)
        with self._lock:
            if len(self._seen) >= LOCAL_FAILURES_MAX_ENTRIES:
                keep = sorted(self._seen.items(), key=lambda item: item[1])[len(self._seen) // 2 :]
                self._seen = dict(keep)
            self._seen[key] = time.monotonic()

    def since(self, scope: str, ident: str) -> float | None:
        key = (settings.FEDSITE_AUTH_FAILURE_NAMESPACE, scope, ident)
        with self._lock:
            return self._seen.get(key)


LOCAL_FAILURES_MAX_ENTRIES = 100_000
local_failures = _LocalFailures()


def auth_failure_suspected(*, scope: str, client_ip: str | None) -> bool:
    """Whether this process counted a failure of ``scope`` from ``client_ip`` within the scope's window.

    No cache round trip: callers that skip :func:`auth_failure_guard` for a credential they already
    accepted from this IP must still consult it when this is true (see the module docstring).
    """
    if client_ip is None:
        return False
    last = local_failures.since(scope, client_ip)
    if last is None:
        return False
    return time.monotonic() - last <= FailedAuthenticationThrottle(scope).duration


def auth_failure_guard(*, scope: str, client_ip: str | None) -> None:
    """Raise 429 if ``client_ip`` is over the failure limit of ``scope``; no-op when the IP is unknown."""
    refused = auth_failure_guard_many(scope=scope, client_ips=[client_ip])
    if client_ip in refused:
        raise refused[client_ip]


def auth_failure_guard_many(*, scope: str, client_ips: Iterable[str | None]) -> dict[str, TooManyRequests]:
    """:func:`auth_failure_guard` for several IPs in one cache round trip (the long-polls that start
    together): the 429 of each IP over the limit; unknown IPs are never refused."""
    idents = {ip for ip in client_ips if ip is not None}
    if not idents:
        return {}
    throttle = FailedAuthenticationThrottle(scope)
    try:
        waits = throttle.retry_after_many(idents)
    except Exception as exc:  # the cache (Redis) is away: fail open, the credential check still runs
        logger.warning("auth_failure_counter_unavailable scope=%s error=%r", scope, exc)
        return {}
    return {
        ip: TooManyRequests(
            f"Too many {WHAT[scope]} from this address ({throttle.num_requests} per {throttle.duration} s); "
            f"retry after {wait} seconds with a valid credential.",
            retry_after=wait,
        )
        for ip, wait in waits.items()
    }


def auth_failure_record(*, scope: str, client_ip: str | None) -> None:
    """Count one failed authentication of ``scope`` from ``client_ip`` (no-op when the IP is unknown)."""
    if client_ip is None:
        return
    local_failures.note(scope, client_ip)
    try:
        FailedAuthenticationThrottle(scope).record_failure(client_ip)
    except Exception as exc:  # the cache (Redis) is away: the failure is answered, just not counted
        logger.warning("auth_failure_counter_unavailable scope=%s error=%r", scope, exc)


def login_lockout_response(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """django-axes' answer to a locked-out login: 429 with Retry-After.

    The project's JSON error shape under ``/api/``, a short HTML page elsewhere (the admin login form).
    """
    cooloff = settings.AXES_COOLOFF_TIME
    seconds = math.ceil(cooloff.total_seconds()) if cooloff else None
    message = (
        f"Too many failed logins for this account from this address; try again in {seconds} seconds."
        if seconds
        else "Too many failed logins for this account from this address; ask an administrator to unlock it."
    )
    status = settings.AXES_HTTP_RESPONSE_CODE
    if request.path.startswith("/api/"):
        details = {"retry_after": seconds} if seconds else {}
        body = {"error": {"code": "login_locked_out", "message": message, "details": details}}
        response: HttpResponse = JsonResponse(body, status=status)
    else:
        page = format_html(
            "<!doctype html><title>Login locked</title><h1>Login locked</h1><p>{}</p>", message
        )
        response = HttpResponse(page, status=status)
    if seconds:
        response["Retry-After"] = str(seconds)
    return response


class LoginLockoutBackend(AxesStandaloneBackend):
    """django-axes' backend, skipped for logins that come with no request.

    Every login over HTTP (the admin's form, DRF) passes its request and is counted and locked out by axes.
    ``authenticate()`` without one (the test client's ``login()``, a shell) has no client address to count
    and is not network-facing, so it goes straight to the next backend instead of raising.
    """

    def authenticate(self, request: HttpRequest | None, *args: Any, **kwargs: Any) -> None:
        if request is None:
            return None
        return super().authenticate(request, *args, **kwargs)
