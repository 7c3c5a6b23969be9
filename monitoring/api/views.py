"""Monitoring API: the seed's ``/api/system/health`` and ``/api/alerts``, health history, acknowledgements."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

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
from monitoring.anomalies import anomaly_policy
from monitoring.contributions import (
    AGENT_ORDERS,
    TRAINING_ORDERS,
    agents_leaderboard,
    statistics_to_dict,
    training_anomalies,
    training_leaderboard,
)
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


def _training_or_404(training_id: str) -> Any:
    from trainings.selectors import training_get  # (trainings imports this app)

    training = training_get(training_id)
    if training is None:
        raise NotFound(f"Training {training_id!r} not found.", code="training_not_found")
    return training


@extend_schema(
    tags=["monitoring"],
    parameters=[
        OpenApiParameter("round", int, required=False),
        OpenApiParameter(
            "all", bool, required=False, description="every update's statistics, not only flags"
        ),
    ],
    responses={200: OpenApiTypes.OBJECT},
)
@api_view(["GET"])
@permission_classes([IsAdminUser])
def training_anomalies_view(request: Request, training_id: str) -> Response:
    """Flagged updates of a training with their statistics, robust z-scores and the action taken."""
    training = _training_or_404(training_id)
    round_text = request.query_params.get("round")
    round_number = None
    if round_text is not None:
        try:
            round_number = int(round_text)
        except ValueError:
            round_number = -1
        if round_number < 1:
            raise ValidationFailed(
                f"round must be a positive integer. Found {round_text!r}.", details={"round": "Invalid."}
            )
    rows = training_anomalies(
        training=training,
        round_number=round_number,
        flagged_only=request.query_params.get("all") not in ("1", "true"),
    )
    policy = anomaly_policy((training.config or {}).get("anomaly"))
    return Response(
        {
            "training_id": str(training.pk),
            "policy": {
                "enabled": policy.enabled,
                "thresholds": dict(policy.thresholds),
                "action": policy.action,
                "quarantine_after": policy.quarantine_after,
            },
            "updates": [statistics_to_dict(row) for row in rows],
        }
    )


@extend_schema(
    tags=["monitoring"],
    parameters=[
        OpenApiParameter("order", str, required=False, description=f"one of {list(TRAINING_ORDERS)}")
    ],
    responses={200: OpenApiTypes.OBJECT},
)
@api_view(["GET"])
@permission_classes([IsAdminUser])
def training_leaderboard_view(request: Request, training_id: str) -> Response:
    """Agents of a training ranked by contribution (or ``?order=``), with participation and reliability."""
    training = _training_or_404(training_id)
    return Response(training_leaderboard(training=training, order=request.query_params.get("order")))


@extend_schema(
    tags=["monitoring"],
    parameters=[OpenApiParameter("order", str, required=False, description=f"one of {list(AGENT_ORDERS)}")],
    responses={200: OpenApiTypes.OBJECT},
)
@api_view(["GET"])
@permission_classes([IsAdminUser])
def agents_leaderboard_view(request: Request) -> Response:
    """Every agent ranked by mean contribution over its trainings (or ``?order=``)."""
    return Response(agents_leaderboard(order=request.query_params.get("order")))
