"""Monitoring API: the seed's ``/api/system/health`` and ``/api/alerts``."""

from __future__ import annotations

import uuid

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from fedsite.errors import ValidationFailed
from monitoring.models import Alert
from monitoring.selectors import alerts_query, system_health


class AlertSerializer(serializers.ModelSerializer):
    class Meta:
        model = Alert
        fields = [
            "id",
            "training",
            "round_number",
            "severity",
            "kind",
            "message",
            "details",
            "created_at",
            "acknowledged_at",
            "acknowledged_by",
            "resolved_at",
        ]
        read_only_fields = fields


@extend_schema(tags=["seed"], responses={200: OpenApiTypes.OBJECT})
@api_view(["GET"])
@permission_classes([IsAdminUser])
def system_health_view(request: Request) -> Response:
    return Response(system_health())


@extend_schema(
    tags=["seed"],
    parameters=[
        OpenApiParameter("training_id", str, required=False),
        OpenApiParameter("severity", str, required=False, enum=Alert.Severity.values),
        OpenApiParameter("unacknowledged", bool, required=False),
        OpenApiParameter("limit", int, required=False),
    ],
    responses={200: inline_serializer("AlertList", {"alerts": AlertSerializer(many=True)})},
)
@api_view(["GET"])
@permission_classes([IsAdminUser])
def alerts_view(request: Request) -> Response:
    training_id = request.query_params.get("training_id")
    severity = request.query_params.get("severity")
    if training_id:
        try:
            training_id = str(uuid.UUID(training_id))
        except ValueError as exc:
            raise ValidationFailed(f"training_id {training_id!r} is not a valid id.") from exc
    if severity and severity not in Alert.Severity.values:
        raise ValidationFailed(f"severity must be one of {Alert.Severity.values}. Found {severity!r}.")
    try:
        limit = int(request.query_params.get("limit", 100))
    except ValueError as exc:
        raise ValidationFailed("limit must be an integer.") from exc
    if not 1 <= limit <= 1000:
        raise ValidationFailed("limit must be between 1 and 1000.")
    alerts = alerts_query(
        training_id=training_id,
        severity=severity,
        unacknowledged=request.query_params.get("unacknowledged") in ("1", "true"),
    )[:limit]
    return Response({"alerts": AlertSerializer(alerts, many=True).data})
