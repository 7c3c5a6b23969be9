"""Operator API for model versions: list, inspect, download (safetensors)."""

from __future__ import annotations

from typing import Any

from django.core.files.storage import default_storage
from django.http import FileResponse
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request

from fedsite.errors import NotFound
from monitoring.services import audit_record
from versioning.models import ModelVersion


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

    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    @action(detail=True, methods=["get"])
    def download(self, request: Request, pk: str | None = None) -> FileResponse:
        version = self.get_object()
        audit_record(actor=request.user, action="version.download", obj=version)
        response = FileResponse(
            default_storage.open(version.blob_name, "rb"),
            content_type="application/octet-stream",
            as_attachment=True,
            filename=f"{version.training_id}-v{version.number}.safetensors",
        )
        response["ETag"] = f'"{version.blob_sha256}"'
        return response
