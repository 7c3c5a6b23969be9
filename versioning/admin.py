"""Admin for global model versions: view-only, since a version is never modified after it is written."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from fedsite.errors import ServiceError
from monitoring.admin import TrainingNameColumn, ViewOnlyAdmin, pretty_json, short_hash
from versioning.models import Blob, ModelVersion, Rollback
from versioning.services import training_rollback, version_pin


@admin.register(ModelVersion)
class ModelVersionAdmin(TrainingNameColumn, ViewOnlyAdmin):
    list_display = [
        "training_name",
        "number",
        "origin",
        "accuracy",
        "size_bytes",
        "sha256",
        "pinned",
        "created_at",
    ]
    list_filter = ["origin", "pinned", ("blob_pruned_at", admin.EmptyFieldListFilter)]
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
        "pinned",
        "pinned_by",
        "pinned_at",
        "blob_pruned_at",
    ]
    exclude = ["metrics"]
    actions = ["rollback_to_this_version", "pin_versions", "unpin_versions"]

    @admin.action(description="Pin (never prune) the selected versions")
    def pin_versions(self, request: HttpRequest, queryset: Any) -> None:
        self._pin(request, queryset, pinned=True)

    @admin.action(description="Unpin the selected versions")
    def unpin_versions(self, request: HttpRequest, queryset: Any) -> None:
        self._pin(request, queryset, pinned=False)

    def _pin(self, request: HttpRequest, queryset: Any, *, pinned: bool) -> None:
        done, refused = 0, []
        for version in queryset.order_by("training", "number"):
            try:
                version_pin(version_id=version.pk, pinned=pinned, actor=request.user)
                done += 1
            except ServiceError as exc:
                refused.append(exc.message)
        word = "Pinned" if pinned else "Unpinned"
        if done:
            self.message_user(request, f"{word} {done} version(s).", messages.SUCCESS)
        for message in refused:
            self.message_user(request, message, messages.ERROR)

    @admin.display(description="pruned", boolean=True)
    def pruned(self, obj: ModelVersion) -> bool:
        return obj.blob_pruned_at is not None

    @admin.action(description="Roll its training back to this version")
    def rollback_to_this_version(self, request: HttpRequest, queryset: Any) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to roll back to.", messages.ERROR)
            return
        version = queryset.get()
        try:
            rollback = training_rollback(
                training_id=version.training_id, version=version.number, actor=request.user, reason="admin"
            )
        except ServiceError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        if rollback.status == Rollback.Status.APPLIED:
            text = f"Version {rollback.version.number} (a copy of version {version.number}) is now current."
        else:
            text = f"The training is running: its next round starts from version {version.number}."
        self.message_user(request, text, messages.SUCCESS)

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


@admin.register(Rollback)
class RollbackAdmin(TrainingNameColumn, ViewOnlyAdmin):
    list_display = ["training_name", "to_version", "made_version", "trigger", "status", "actor", "created_at"]
    list_filter = ["trigger", "status"]
    search_fields = ["training__name", "=training__id", "reason"]
    list_select_related = ["training", "target", "version"]

    @admin.display(description="to", ordering="target__number")
    def to_version(self, obj: Rollback) -> str:
        return f"v{obj.target.number}"

    @admin.display(description="made", ordering="version__number")
    def made_version(self, obj: Rollback) -> str:
        """The version the rollback wrote (its weights are the target's), once applied."""
        return f"v{obj.version.number}" if obj.version_id else ""


@admin.register(Blob)
class BlobAdmin(ViewOnlyAdmin):
    list_display = ["short_name", "size_bytes", "touched_at", "condemned"]
    list_filter = [("condemned_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "sha256"]

    @admin.display(description="name", ordering="name")
    def short_name(self, obj: Blob) -> str:
        """The name with its content hash shortened (the full name is on the blob's page)."""
        folder, _, file = obj.name.rpartition("/")
        stem, dot, suffix = file.partition(".")
        return (
            f"{folder}/{short_hash(stem, 16)}{dot}{suffix}"
            if folder
            else f"{short_hash(stem, 16)}{dot}{suffix}"
        )

    @admin.display(description="condemned", boolean=True, ordering="condemned_at")
    def condemned(self, obj: Blob) -> bool:
        return obj.condemned_at is not None
