"""One JSON error shape for every API error: DRF's exception handler and plain Django views."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from fedsite.errors import ServiceError

logger = logging.getLogger("fedsite.api")


def error_payload(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(exc: ServiceError) -> JsonResponse:
    """A JsonResponse for plain (non-DRF) views."""
    response = JsonResponse(exc.as_dict(), status=exc.status_code)
    if getattr(exc, "retry_after", None) is not None:
        response["Retry-After"] = str(exc.retry_after)
    return response


def _flatten_drf_detail(detail: Any) -> str:
    if isinstance(detail, dict):
        parts = [f"{key}: {_flatten_drf_detail(value)}" for key, value in detail.items()]
        return "; ".join(parts)
    if isinstance(detail, list):
        return " ".join(_flatten_drf_detail(item) for item in detail)
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF exception handler: map service errors and DRF errors to the single error shape."""
    if isinstance(exc, ServiceError):
        response = Response(exc.as_dict(), status=exc.status_code)
        if exc.status_code == 503:
            response["Retry-After"] = "5"
        if getattr(exc, "retry_after", None) is not None:
            response["Retry-After"] = str(exc.retry_after)
        if exc.status_code == 401:  # a 401 names its scheme (RFC 9110), as DRF's own 401s do
            view, request = context.get("view"), context.get("request")
            challenge = (
                view.get_authenticate_header(request) if view is not None and request is not None else None
            )
            if challenge:
                response["WWW-Authenticate"] = challenge
        return response
    if isinstance(exc, DjangoValidationError):
        details = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        return Response(error_payload("validation_error", " ".join(exc.messages), details), status=400)
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied(str(exc) or "You do not have permission to do this.")
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, drf_exceptions.ValidationError):
        code, message, details = "validation_error", _flatten_drf_detail(exc.detail), exc.detail
    elif isinstance(exc, drf_exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else "error"
        message, details = _flatten_drf_detail(exc.detail), {}
    else:  # pragma: no cover - drf handles only APIException subclasses
        code, message, details = "error", str(exc), {}
    response.data = error_payload(
        code, message, details if isinstance(details, dict) else {"errors": details}
    )
    return response
