"""OpenAPI post-processing: the one error shape on every operation.

Every endpoint can refuse a request the same few ways (a bad body, no or wrong credentials, another
agent's object, a missing object, a conflict, a body over its limit, throttling, a server that is
shutting down), always with ``{"error": {"code", "message", "details"}}`` (fedsite/api.py). The schema
says so, so generated clients and schema fuzzing (tests/test_schema_fuzz.py) see every status the
server can answer.
"""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "description": "machine-readable, e.g. validation_error"},
                "message": {"type": "string", "description": "what went wrong and what to do"},
                "details": {
                    "type": "object",
                    "description": "per-field messages for validation errors; extra facts otherwise",
                },
            },
        }
    },
}

ERROR_RESPONSES = {
    "400": "Malformed or invalid request; `details` names the field",
    "401": "Missing or invalid credentials",
    "403": "Authenticated, but not allowed to do this",
    "404": "No such object (or not visible to these credentials)",
    "405": "Method not allowed on this path",
    "408": "The request body did not arrive in time",
    "409": "Conflicts with the current state (e.g. the task is closed)",
    "413": "The body is larger than this endpoint accepts",
    "415": "Unsupported content type",
    "429": "Too many failed attempts or requests; retry after `Retry-After` seconds",
    "503": "Temporarily unavailable (e.g. shutting down); retry after `Retry-After` seconds",
}

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def add_error_responses(result: dict[str, Any], generator: Any, request: Any, public: Any) -> dict[str, Any]:
    """drf-spectacular post-processing hook: document the error shape on every operation."""
    components = result.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    reference = {"$ref": "#/components/schemas/Error"}
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            if method not in HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_RESPONSES.items():
                response = responses.setdefault(status, {"description": description})
                response.setdefault("content", {"application/json": {"schema": reference}})
    return result
