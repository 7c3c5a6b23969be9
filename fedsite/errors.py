"""Errors raised by services, each mapped to one HTTP status and one JSON error shape.

Services raise these; the API layer never decides a status code itself. The JSON shape is
``{"error": {"code": "...", "message": "...", "details": {...}}}`` everywhere (REST, agent protocol).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: a request that the service refuses, with a message that says what to do."""

    status_code = 400
    default_code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details or {}

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class ValidationFailed(ServiceError):
    status_code = 400
    default_code = "validation_error"


class AuthenticationFailed(ServiceError):
    status_code = 401
    default_code = "not_authenticated"


class Forbidden(ServiceError):
    status_code = 403
    default_code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    default_code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    default_code = "conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    default_code = "payload_too_large"


class ServiceUnavailable(ServiceError):
    status_code = 503
    default_code = "unavailable"


class TooManyRequests(ServiceError):
    """Refused until ``retry_after`` seconds have passed (sent as the ``Retry-After`` header)."""

    status_code = 429
    default_code = "throttled"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int,
        code: str | None = None,
        details: dict[str, Any] | None = None,
    ):
        super().__init__(message, code=code, details={"retry_after": retry_after, **(details or {})})
        self.retry_after = retry_after
