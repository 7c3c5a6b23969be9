"""Operator API: the seed's endpoints at their exact paths, and DRF resources under /api/v1/."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action, api_view, authentication_classes, permission_classes
from rest_framework.permissions import AllowAny, BasePermission, IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from fedsite.agent_auth import AgentTokenAuthentication
from fedsite.errors import NotFound, ValidationFailed
from fedsite.operator_auth import OperatorTokenAuthentication
from trainings import services
from trainings.api.serializers import RoundSerializer, TrainingConfigurationSerializer, TrainingSerializer
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, Training
from trainings.selectors import (
    training_get,
    training_has_participant,
    training_metrics_series,
    training_status,
)

STATUS_RESPONSE = inline_serializer(
    "TrainingStatus", {"training_id": serializers.UUIDField(), "status": serializers.CharField()}
)


class IsStaffOrAgent(BasePermission):
    """Operators, and agents (who poll a training's status to know when to exit).

    An agent sees only trainings it takes part in (see ``training_status_view``).
    """

    def has_permission(self, request: Request, view: Any) -> bool:
        from clients.models import Agent

        return bool(request.user and request.user.is_staff) or isinstance(request.auth, Agent)


def _training_or_404(training_id: Any) -> Training:
    training = training_get(training_id)
    if training is None:
        raise NotFound(f"No training with id {training_id!r}.", code="training_not_found")
    return training


def _start_from_body(request: Request) -> Training:
    if not isinstance(request.data, dict):
        raise ValidationFailed("The request body must be a JSON training configuration.")
    configuration = TrainingConfiguration.from_dict(dict(request.data))
    return services.training_create_and_start(configuration=configuration, created_by=request.user)


# --- the seed's endpoints ---------------------------------------------------------------------------
@extend_schema(
    tags=["seed"], responses={200: inline_serializer("Health", {"status": serializers.CharField()})}
)
@api_view(["GET"])
@authentication_classes([])
@permission_classes([AllowAny])
def health(request: Request) -> Response:
    """Liveness: the web process answers and reaches its database."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return Response({"status": "ok"})


@extend_schema(
    tags=["seed"],
    request=TrainingConfigurationSerializer,
    responses={
        201: inline_serializer(
            "TrainingStarted", {"training_id": serializers.UUIDField(), "status": serializers.CharField()}
        )
    },
)
@api_view(["POST"])
@permission_classes([IsAdminUser])
def training_start(request: Request) -> Response:
    training = _start_from_body(request)
    return Response(
        {"training_id": str(training.pk), "status": training.status}, status=status.HTTP_201_CREATED
    )


@extend_schema(tags=["seed"], responses={200: STATUS_RESPONSE})
@api_view(["GET"])
@authentication_classes([OperatorTokenAuthentication, SessionAuthentication, AgentTokenAuthentication])
@permission_classes([IsStaffOrAgent])
def training_status_view(request: Request, training_id: str) -> Response:
    training = _training_or_404(training_id)
    if not request.user.is_staff and not training_has_participant(training=training, agent=request.auth):
        # the same answer as an unknown id: an agent learns nothing about trainings it is not in
        raise NotFound(f"No training with id {training_id!r}.", code="training_not_found")
    return Response(training_status(training))


@extend_schema(tags=["seed"], request=None, responses={200: STATUS_RESPONSE})
@api_view(["POST"])
@permission_classes([IsAdminUser])
def training_stop(request: Request, training_id: str) -> Response:
    _training_or_404(training_id)
    training = services.training_stop(training_id=training_id, actor=request.user)
    return Response({"training_id": str(training.pk), "status": training.status})


@extend_schema(
    tags=["seed"],
    responses={
        200: inline_serializer(
            "TrainingMetrics", {"training_id": serializers.UUIDField(), "metrics": serializers.DictField()}
        )
    },
)
@api_view(["GET"])
@permission_classes([IsAdminUser])
def training_metrics(request: Request, training_id: str) -> Response:
    training = _training_or_404(training_id)
    return Response(
        {
            "training_id": str(training.pk),
            "status": training.status,
            "metrics": training_metrics_series(training),
        }
    )


# --- resources --------------------------------------------------------------------------------------
class TrainingViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Trainings. ``POST`` creates (``{"start": false}`` in the body leaves it pending)."""

    queryset = Training.objects.select_related("current_version").all()
    serializer_class = TrainingSerializer

    def get_queryset(self) -> Any:
        queryset = super().get_queryset()
        wanted = self.request.query_params.get("status")
        return queryset.filter(status=wanted) if wanted else queryset

    @extend_schema(request=TrainingConfigurationSerializer, responses={201: TrainingSerializer})
    def create(self, request: Request) -> Response:
        if not isinstance(request.data, dict):
            raise ValidationFailed("The request body must be a JSON training configuration.")
        body = dict(request.data)
        start = body.pop("start", True)
        if not isinstance(start, bool):
            raise ValidationFailed(
                f"start must be true or false. Found {start!r}.", details={"start": "Must be a boolean."}
            )
        configuration = TrainingConfiguration.from_dict(body)
        if start:
            training = services.training_create_and_start(
                configuration=configuration, created_by=request.user
            )
        else:
            training = services.training_create(configuration=configuration, created_by=request.user)
        return Response(TrainingSerializer(training).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: TrainingSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        training = services.training_start(training_id=self.get_object().pk, actor=request.user)
        return Response(TrainingSerializer(training).data)

    @extend_schema(request=None, responses={200: TrainingSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        training = services.training_stop(training_id=self.get_object().pk, actor=request.user)
        return Response(TrainingSerializer(training).data)

    @extend_schema(responses={200: STATUS_RESPONSE})
    @action(detail=True, methods=["get"], url_path="status")
    def status_document(self, request: Request, pk: str | None = None) -> Response:
        return Response(training_status(self.get_object()))

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str | None = None) -> Response:
        return Response(training_metrics_series(self.get_object()))

    @extend_schema(responses={200: RoundSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def rounds(self, request: Request, pk: str | None = None) -> Response:
        rounds = (
            Round.objects.filter(training=self.get_object()).select_related("base_version").order_by("number")
        )
        return Response(RoundSerializer(rounds, many=True).data)


class RoundViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Rounds of all trainings; filter with ``?training=<id>``."""

    queryset = Round.objects.select_related("base_version").order_by("training", "number")
    serializer_class = RoundSerializer

    def get_queryset(self) -> Any:
        queryset = super().get_queryset()
        training = self.request.query_params.get("training")
        if training:
            if training_get(training) is None:
                raise NotFound(f"No training with id {training!r}.", code="training_not_found")
            queryset = queryset.filter(training_id=training)
        return queryset
