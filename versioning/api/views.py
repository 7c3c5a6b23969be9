"""Operator API for model versions: list, inspect, download (safetensors), export (zip with a model
card), pin and unpin, compare two versions, roll a training back. Views only parse and call services."""

from __future__ import annotations

from typing import Any

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action, api_view
from rest_framework.request import Request
from rest_framework.response import Response

from fedsite.errors import NotFound, ValidationFailed
from versioning.models import ModelVersion
from versioning.services import (
    training_rollback,
    version_compare,
    version_export,
    version_open_verified,
    version_pin,
)


class ModelVersionSerializer(serializers.ModelSerializer):
    parent_number = serializers.IntegerField(source="parent.number", read_only=True, default=None)

    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "training",
            "number",
            "origin",
            "parent_number",
            "blob_sha256",
            "size_bytes",
            "num_parameters",
            "metrics",
            "created_at",
            "pinned",
            "pinned_by",
            "pinned_at",
            "blob_pruned_at",
        ]
        read_only_fields = fields


class ModelVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Global model versions; filter with ``?training=<id>``."""

    queryset = ModelVersion.objects.select_related("parent").order_by("training", "number")
    serializer_class = ModelVersionSerializer

    def get_queryset(self) -> Any:
        queryset = super().get_queryset()
        training = self.request.query_params.get("training")
        if training:
            try:
                queryset = queryset.filter(training_id=training)
                queryset.exists()
            except Exception as exc:  # not a UUID
                raise NotFound(f"No training with id {training!r}.", code="training_not_found") from exc
        return queryset

    @extend_schema(request=None, responses={200: ModelVersionSerializer})
    @action(detail=True, methods=["post"])
    def pin(self, request: Request, pk: str | None = None) -> Response:
        """Keep this version's blobs whatever the retention policy says (410 if already pruned)."""
        version = version_pin(version_id=self.get_object().pk, pinned=True, actor=request.user)
        return Response(self.get_serializer(version).data)

    @extend_schema(request=None, responses={200: ModelVersionSerializer})
    @action(detail=True, methods=["post"])
    def unpin(self, request: Request, pk: str | None = None) -> Response:
        """Let the retention policy decide about this version again."""
        version = version_pin(version_id=self.get_object().pk, pinned=False, actor=request.user)
        return Response(self.get_serializer(version).data)

    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    @action(detail=True, methods=["get"])
    def download(self, request: Request, pk: str | None = None) -> FileResponse:
        """The weights as safetensors, checked against their sha256 (409 ``blob_corrupted`` if not; 410
        ``version_pruned`` if retention deleted them)."""
        version = self.get_object()
        response = FileResponse(
            version_open_verified(version=version, actor=request.user),
            content_type="application/octet-stream",
            as_attachment=True,
            filename=f"{version.training_id}-v{version.number}.safetensors",
        )
        response["ETag"] = f'"{version.blob_sha256}"'
        return response

    @extend_schema(responses={(200, "application/zip"): bytes})
    @action(detail=True, methods=["get"])
    def export(self, request: Request, pk: str | None = None) -> FileResponse:
        """A zip of ``weights.safetensors`` and ``model_card.json`` (409 ``blob_corrupted`` if the blob
        does not match its sha256; 410 ``version_pruned`` if retention deleted it)."""
        version = self.get_object()
        response = FileResponse(
            version_export(version=version, actor=request.user),
            content_type="application/zip",
            as_attachment=True,
            filename=f"{version.training_id}-v{version.number}.zip",
        )
        response["ETag"] = f'"{version.blob_sha256}"'
        return response


@extend_schema(
    tags=["versions"],
    parameters=[
        OpenApiParameter("a", int, required=True, description="The first version number."),
        OpenApiParameter("b", int, required=True, description="The second version number."),
    ],
    responses={200: OpenApiTypes.OBJECT},
)
@api_view(["GET"])
def training_versions_compare(request: Request, training_id: str) -> Response:
    """Per-tensor L2 distance, relative change, cosine similarity, max |difference|, metric deltas."""
    missing = [name for name in ("a", "b") if name not in request.query_params]
    if missing:
        raise ValidationFailed(
            f"Pass both version numbers as ?a=<n>&b=<m>; missing: {', '.join(missing)}.",
            details={name: "Required." for name in missing},
        )
    return Response(
        version_compare(
            training_id=training_id,
            a=request.query_params["a"],
            b=request.query_params["b"],
            actor=request.user,
        )
    )


ROLLBACK_REQUEST = inline_serializer(
    "RollbackRequest",
    {"version": serializers.IntegerField(), "reason": serializers.CharField(required=False)},
)
ROLLBACK_RESPONSE = inline_serializer(
    "RollbackResult",
    {
        "training_id": serializers.UUIDField(),
        "target_version": serializers.IntegerField(),
        "status": serializers.CharField(),
        "version": serializers.IntegerField(allow_null=True),
    },
)


@extend_schema(tags=["versions"], request=ROLLBACK_REQUEST, responses={200: ROLLBACK_RESPONSE})
@api_view(["POST"])
def training_rollback_view(request: Request, training_id: str) -> Response:
    """Roll a training back to a version: now if it is finished, at the next round if it is running."""
    body = request.data
    if not isinstance(body, dict) or "version" not in body:
        raise ValidationFailed(
            'Send a JSON object {"version": <number>} naming the version to roll back to.',
            details={"version": "Required."},
        )
    unknown = sorted(set(body) - {"version", "reason"})
    if unknown:
        raise ValidationFailed(
            f"Unknown fields {unknown}; send only version and reason.",
            details=dict.fromkeys(unknown, "Unknown field."),
        )
    rollback = training_rollback(
        training_id=training_id, version=body["version"], actor=request.user, reason=body.get("reason", "")
    )
    return Response(
        {
            "training_id": str(rollback.training_id),
            "target_version": rollback.target.number,
            "status": rollback.status,
            "version": rollback.version.number if rollback.version_id else None,
        }
    )
