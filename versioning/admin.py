"""Admin for global model versions: view-only, since a version is never modified after it is written."""

from __future__ import annotations

from django.contrib import admin

from monitoring.admin import ViewOnlyAdmin, pretty_json, short_hash
from versioning.models import ModelVersion


@admin.register(ModelVersion)
class ModelVersionAdmin(ViewOnlyAdmin):
    list_display = [
        "training",
        "number",
        "origin",
        "accuracy",
        "num_parameters",
        "size_bytes",
        "sha256",
        "created_at",
    ]
    list_filter = ["origin"]
    search_fields = ["training__name", "=training__id", "blob_sha256"]
    list_select_related = ["training"]
    readonly_fields = [
        "id",
        "training",
        "number",
        "origin",
        "parent",
        "blob_name",
        "blob_sha256",
        "size_bytes",
        "num_parameters",
        "metrics_pretty",
        "created_at",
    ]
    exclude = ["metrics"]

    @admin.display(description="accuracy")
    def accuracy(self, obj: ModelVersion) -> str:
        metrics = obj.metrics or {}
        value = metrics.get("accuracy", metrics.get("federated_accuracy"))
        return "" if value is None else f"{value:.4f}"

    @admin.display(description="sha256")
    def sha256(self, obj: ModelVersion) -> str:
        return short_hash(obj.blob_sha256)

    @admin.display(description="metrics")
    def metrics_pretty(self, obj: ModelVersion) -> str:
        return pretty_json(obj.metrics)
