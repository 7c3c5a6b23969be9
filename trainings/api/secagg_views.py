"""Agent protocol v1, secure aggregation: ``POST /api/v1/agent/tasks/<task_id>/secagg``.

One endpoint answers every phase's task (docs/agent-protocol.md, "Secure aggregation"): the body is the
UTF-8 JSON of AdvertiseKeys, ShareKeys or UnmaskResponse (``application/json``), or the MaskedInput
safetensors (``application/octet-stream``, with the agent's federated evaluation of the round's model in
the optional ``X-SecAgg-Meta`` header). The body is read by the service, never whole beyond the task's
limit; the view parses nothing itself.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fedsite.agent_auth import AgentTokenAuthentication, IsAgent
from fedsite.errors import ValidationFailed
from trainings.services import secagg_submit

CONTENT_TYPES = {"application/json", "application/octet-stream"}

SECAGG_RESPONSE = inline_serializer(
    "SecAggAnswerAccepted",
    {
        "task_id": serializers.UUIDField(),
        "phase": serializers.CharField(),
        "party_id": serializers.IntegerField(),
        "sha256": serializers.CharField(),
    },
)


class _RawBodyParser(BaseParser):
    """Accepts both content types without reading the body (the service reads it, within its limit)."""

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):  # type: ignore[no-untyped-def]
        return {}


class SecAggSubmitView(APIView):
    """An agent's answer to its ``secagg_*`` task."""

    authentication_classes = [AgentTokenAuthentication]
    permission_classes = [IsAgent]
    parser_classes = [_RawBodyParser]

    @extend_schema(
        tags=["agent protocol"],
        request={"application/json": dict, "application/octet-stream": bytes},
        parameters=[
            OpenApiParameter(
                "X-SecAgg-Meta",
                str,
                OpenApiParameter.HEADER,
                required=False,
                description='masked input only: JSON {"metrics": {"eval_accuracy", "eval_loss", '
                '"eval_num_examples"}}',
            )
        ],
        responses={201: SECAGG_RESPONSE, 200: SECAGG_RESPONSE},
    )
    def post(self, request: Request, task_id: str) -> Response:
        content_type = (request.content_type or "").split(";")[0].strip()
        if content_type not in CONTENT_TYPES:
            raise ValidationFailed(
                f"Send the answer as application/json (keys, shares, unmask response) or "
                f"application/octet-stream (masked input). Found {content_type or 'no content type'!r}.",
                code="bad_content_type",
            )
        declared = request.headers.get("Content-Length")
        if declared is not None and not declared.strip().isdigit():
            raise ValidationFailed(f"Content-Length must be a non-negative integer. Found {declared!r}.")
        row, created = secagg_submit(
            agent=request.auth,
            task_id=task_id,
            body=request._request,
            declared_bytes=int(declared) if declared is not None else None,
            meta=request.headers.get("X-SecAgg-Meta"),
        )
        return Response(
            {"task_id": task_id, "phase": row.phase, "party_id": row.party_id, "sha256": row.blob_sha256},
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )
