"""Error pages: the API's JSON error shape under ``/api/``, Django's HTML pages elsewhere.

docs/agent-protocol.md §2 promises one JSON shape for every error an API client can get, including the
ones Django answers before any view runs: an unrouted URL (404), a Host not in ALLOWED_HOSTS or another
suspicious request (400), a CSRF or permission refusal (403) and an unhandled exception (500).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

from fedsite.api import error_payload

API_PREFIXES = ("/api/",)


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIXES)


def bad_request(request: HttpRequest, exception: Exception, *args: Any, **kwargs: Any) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_payload(
                "bad_request",
                "The request was refused before it reached the API: check the Host header (it must be one "
                "of the server's DJANGO_ALLOWED_HOSTS) and the request's form.",
            ),
            status=400,
        )
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception, *args: Any, **kwargs: Any) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_payload("forbidden", str(exception) or "You do not have permission to do this."), status=403
        )
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception, *args: Any, **kwargs: Any) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_payload(
                "not_found",
                f"No API endpoint at {request.path!r}; the endpoints are listed at /api/schema/ "
                "(Swagger UI at /api/docs/).",
            ),
            status=404,
        )
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_payload(
                "server_error",
                "The server failed to answer this request; it has been logged. Retry later, and report it to "
                "the operator if it persists.",
            ),
            status=500,
        )
    return defaults.server_error(request)
