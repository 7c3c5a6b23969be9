"""Monitoring API: the seed's ``/api/system/health`` and ``/api/alerts``, health history, acknowledgements."""

from __future__ import annotations

import datetime
import uuid

from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from fedsite.errors import NotFound, ValidationFailed
from monitoring.health import health_read
from monitoring.models import Alert, SystemHealthSample
from monitoring.selectors import alerts_query, health_history, health_sample_to_dict, system_health
from monitoring.services import alert_acknowledge, alerts_acknowledge, health_sample_record


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
            "resolution",
            "subject",
            "count",
            "last_seen_at",
        ]
        read_only_fields = fields


@extend_schema(tags=["seed"], responses={200: OpenApiTypes.OBJECT})
@api_view(["GET"])
@permission_classes([IsAdminUser])
def system_health_view(request: Request) -> Response:
    """Measure now; the reading is also stored as this web process's sample (its RSS and long-polls)."""
    reading = health_read(role=SystemHealthSample.Role.WEB)
    health_sample_record(reading=reading)
    return Response(system_health(reading=reading))


@extend_schema(
    tags=["monitoring"],
    parameters=[
        OpenApiParameter("since", OpenApiTypes.DATETIME, required=False),
        OpenApiParameter("limit", int, required=False),
    ],
    responses={200: OpenApiTypes.OBJECT},
)
@api_view(["GET"])
@permission_classes([IsAdminUser])
def system_health_history_view(request: Request) -> Response:
    since_text = request.query_params.get("since")
    since = None
    if since_text:
        try:
            since = parse_datetime(since_text)
        except ValueError:
            since = None
        if since is None:
            raise ValidationFailed(
                f"since must be an ISO 8601 date and time such as 2026-12-01T09:00:00Z. Found {since_text!r}."
            )
        try:
            if timezone.is_naive(since):
                since = timezone.make_aware(since, datetime.UTC)
            since = since.astimezone(datetime.UTC)
        except (OverflowError, ValueError) as exc:
            raise ValidationFailed(f"since is out of the range of dates. Found {since_text!r}.") from exc
    limit = _limit(request, default=1000, maximum=10000)
    samples = health_history(since=since, limit=limit)
    return Response(
        {
            "since": since.isoformat() if since else None,
            "retention_hours": settings.FEDSITE_HEALTH_RETENTION_HOURS,
            "samples": [health_sample_to_dict(sample) for sample in samples],
        }
    )


def _limit(request: Request, *, default: int, maximum: int) -> int:
    text = request.query_params.get("limit", str(default))
    try:
        limit = int(text)
    except ValueError as exc:
        raise ValidationFailed(f"limit must be an integer between 1 and {maximum}. Found {text!r}.") from exc
    if not 1 <= limit <= maximum:
        raise ValidationFailed(f"limit must be between 1 and {maximum}. Found {limit}.")
    return limit


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
    limit = _limit(request, default=100, maximum=1000)
    alerts = alerts_query(
        training_id=training_id,
        severity=severity,
        unacknowledged=request.query_params.get("unacknowledged") in ("1", "true"),
        open_only=request.query_params.get("open") in ("1", "true"),
    )[:limit]
    return Response({"alerts": AlertSerializer(alerts, many=True).data})


@extend_schema(
    tags=["monitoring"], operation_id="alert_acknowledge", request=None, responses={200: AlertSerializer}
)
@api_view(["POST"])
@permission_classes([IsAdminUser])
def alert_acknowledge_view(request: Request, alert_id: int) -> Response:
    """Acknowledge one alert (idempotent: a second call leaves who and when unchanged)."""
    alert = Alert.objects.filter(pk=alert_id).first()
    if alert is None:
        raise NotFound(f"No alert with id {alert_id}.", code="alert_not_found")
    alert_acknowledge(alert=alert, actor=request.user)
    alert.refresh_from_db()
    return Response(AlertSerializer(alert).data)


MAX_BULK_ACKNOWLEDGE = 1000


@extend_schema(
    tags=["monitoring"],
    operation_id="alerts_acknowledge_bulk",
    request=inline_serializer("AlertIds", {"ids": serializers.ListField(child=serializers.IntegerField())}),
    responses={200: OpenApiTypes.OBJECT},
)
@api_view(["POST"])
@permission_classes([IsAdminUser])
def alerts_acknowledge_view(request: Request) -> Response:
    """Acknowledge several alerts: ``{"ids": [1, 2, 3]}``; all exist or nothing changes (404)."""
    data = request.data
    ids = data.get("ids") if isinstance(data, dict) else None
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(pk, int) and not isinstance(pk, bool) and pk > 0 for pk in ids)
    ):
        raise ValidationFailed(
            'ids must be a non-empty list of alert ids (positive integers), e.g. {"ids": [1, 2]}.',
            details={"field": "ids"},
        )
    if len(ids) > MAX_BULK_ACKNOWLEDGE:
        raise ValidationFailed(
            f"ids may hold at most {MAX_BULK_ACKNOWLEDGE} alert ids. Found {len(ids)}; send them in batches.",
            details={"field": "ids"},
        )
    return Response(alerts_acknowledge(alert_ids=ids, actor=request.user))
