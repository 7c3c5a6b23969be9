"""``GET /api/trainings/{id}/privacy``: budget, accountant, spent and remaining epsilon, ledger."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from fedsite.errors import NotFound
from privacy.selectors import privacy_report
from trainings.selectors import training_get


@extend_schema(tags=["privacy"], responses={200: OpenApiTypes.OBJECT})
@api_view(["GET"])
@permission_classes([IsAdminUser])
def training_privacy(request: Request, training_id: str) -> Response:
    training = training_get(training_id)
    if training is None:
        raise NotFound(f"No training with id {training_id!r}.", code="training_not_found")
    return Response(privacy_report(training))
