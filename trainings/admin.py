"""Admin for trainings, rounds, tasks and client updates.

Invariants: statuses move only through ``trainings.services`` (which lock, check the state machine and
audit). A training is added with a JSON configuration validated by ``TrainingConfiguration.from_dict``
and created by ``training_create`` / ``training_create_and_start``; it is stopped with an admin action
that calls ``training_stop``. Rounds, tasks and updates are written by the coordinator only: view-only.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from fedsite.errors import ServiceError, ValidationFailed
from monitoring.admin import (
    ActionsOnlyAdmin,
    ServiceAddMixin,
    TrainingNameColumn,
    ViewOnlyAdmin,
    ViewOnlyInline,
    pretty_json,
    short_hash,
)
from trainings import services
from trainings.configuration import TrainingConfiguration
from trainings.models import (
    AggregationOutbox,
    ClientUpdate,
    Round,
    SecAggMessage,
    SecAggSession,
    Task,
    Training,
)
from versioning.models import ModelVersion

EXAMPLE_CONFIGURATION = {
    "name": "digits-fedavg",
    "algorithm": "fedavg",
    "model_type": "mlp",
    "input_dim": 64,
    "num_classes": 10,
    "hidden_sizes": [64],
    "max_rounds": 20,
    "target_accuracy": 0.95,
    "min_clients_per_round": 2,
    "local_epochs": 1,
    "learning_rate": 0.05,
    "evaluation_dataset": "digits",
}


# ---------------------------------------------------------------------------------------------------
# Trainings
# ---------------------------------------------------------------------------------------------------
class TrainingCreateForm(forms.Form):
    configuration = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 18, "cols": 80, "style": "font-family: monospace"}),
        initial=json.dumps(EXAMPLE_CONFIGURATION, indent=2),
        help_text="A training configuration as JSON (the keys of POST /api/training/start).",
    )
    start_now = forms.BooleanField(
        required=False,
        initial=True,
        help_text="Start at once (open round 1). Unticked, the training is created pending.",
    )

    def clean_configuration(self) -> TrainingConfiguration:
        text = self.cleaned_data["configuration"]
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}.") from exc
        try:
            return TrainingConfiguration.from_dict(data)
        except ValidationFailed as exc:
            raise forms.ValidationError(exc.message) from exc


class RoundInline(ViewOnlyInline):
    model = Round
    fields = ["number", "status", "attempt", "deadline", "opened_at", "completed_at", "accuracy"]
    readonly_fields = fields
    ordering = ["-number"]

    @admin.display(description="accuracy")
    def accuracy(self, obj: Round) -> str:
        return _accuracy_text(obj.metrics)


class ModelVersionInline(ViewOnlyInline):
    model = ModelVersion
    fk_name = "training"
    fields = ["number", "origin", "sha256", "size_bytes", "created_at"]
    readonly_fields = fields
    ordering = ["-number"]

    @admin.display(description="sha256")
    def sha256(self, obj: ModelVersion) -> str:
        return short_hash(obj.blob_sha256)


def _accuracy_text(metrics: dict[str, Any] | None) -> str:
    metrics = metrics or {}
    value = metrics.get("accuracy", metrics.get("federated_accuracy"))
    return "" if value is None else f"{value:.4f}"


@admin.register(Training)
class TrainingAdmin(ServiceAddMixin, ActionsOnlyAdmin):
    add_form_class = TrainingCreateForm
    add_form_help = "The configuration is validated as a whole; every bad field is named."
    list_display = [
        "name",
        "status",
        "algorithm",
        "rounds",
        "best_accuracy_display",
        "created_at",
        "dashboard_link",
    ]
    list_filter = ["status", "algorithm"]
    search_fields = ["name", "=id"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "id",
        "name",
        "status",
        "algorithm",
        "current_round",
        "current_version",
        "best_accuracy",
        "stop_reason",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "dashboard_link",
        "config_pretty",
        "model_spec_pretty",
        "parameter_spec_pretty",
    ]
    fieldsets = [
        (None, {"fields": ["id", "name", "status", "algorithm", "dashboard_link", "stop_reason"]}),
        (
            "Progress",
            {
                "fields": [
                    "current_round",
                    "current_version",
                    "best_accuracy",
                    "created_by",
                    "created_at",
                    "started_at",
                    "finished_at",
                ]
            },
        ),
        ("Configuration", {"fields": ["config_pretty", "model_spec_pretty", "parameter_spec_pretty"]}),
    ]
    inlines = [RoundInline, ModelVersionInline]
    actions = ["stop_trainings"]

    @admin.display(description="round", ordering="current_round")
    def rounds(self, obj: Training) -> str:
        """The current round of at most ``max_rounds``."""
        maximum = (obj.config or {}).get("max_rounds")
        return f"{obj.current_round} / {maximum}" if maximum else str(obj.current_round)

    @admin.display(description="best accuracy", ordering="best_accuracy")
    def best_accuracy_display(self, obj: Training) -> str:
        return "" if obj.best_accuracy is None else f"{obj.best_accuracy:.4f}"

    @admin.display(description="dashboard")
    def dashboard_link(self, obj: Training) -> str:
        return format_html('<a href="{}">live</a>', reverse("dashboard-training", args=[obj.pk]))

    @admin.display(description="configuration")
    def config_pretty(self, obj: Training) -> str:
        return pretty_json(obj.config)

    @admin.display(description="model spec")
    def model_spec_pretty(self, obj: Training) -> str:
        return pretty_json(obj.model_spec)

    @admin.display(description="parameter spec")
    def parameter_spec_pretty(self, obj: Training) -> str:
        return pretty_json(obj.parameter_spec)

    def create_from_form(self, request: HttpRequest, form: forms.Form) -> Training:
        configuration = form.cleaned_data["configuration"]
        if form.cleaned_data["start_now"]:
            training = services.training_create_and_start(
                configuration=configuration, created_by=request.user
            )
            messages.success(request, f"Training {training.name!r} created and started (round 1 is open).")
        else:
            training = services.training_create(configuration=configuration, created_by=request.user)
            messages.success(request, f"Training {training.name!r} created; it is pending.")
        return training

    @admin.action(description="Stop selected trainings", permissions=["change"])
    def stop_trainings(self, request: HttpRequest, queryset: QuerySet[Training]) -> None:
        stopped, refused = 0, []
        for training in queryset:
            try:
                services.training_stop(training_id=training.pk, actor=request.user)
            except ServiceError as exc:
                refused.append(f"{training.name}: {exc.message}")
            else:
                stopped += 1
        if stopped:
            self.message_user(request, f"Stopped {stopped} training(s).", messages.SUCCESS)
        for text in refused:
            self.message_user(request, f"Not stopped: {text}", messages.WARNING)


# ---------------------------------------------------------------------------------------------------
# Rounds, tasks, updates (view-only)
# ---------------------------------------------------------------------------------------------------
class TaskInline(ViewOnlyInline):
    model = Task
    fields = [
        "agent",
        "kind",
        "status",
        "attempt",
        "deadline",
        "delivered_at",
        "completed_at",
        "failure_reason",
    ]
    readonly_fields = fields


@admin.register(Round)
class RoundAdmin(TrainingNameColumn, ViewOnlyAdmin):
    list_display = ["training_name", "number", "status", "attempt", "task_count", "accuracy", "completed_at"]
    list_filter = ["status"]
    search_fields = ["training__name", "=training__id"]
    list_select_related = ["training"]
    readonly_fields = [
        "training",
        "number",
        "status",
        "attempt",
        "base_version",
        "deadline",
        "opened_at",
        "closed_at",
        "completed_at",
        "error",
        "metrics_pretty",
        "created_at",
    ]
    exclude = ["metrics"]
    inlines = [TaskInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Round]:
        return super().get_queryset(request).annotate(task_total=Count("tasks"))

    @admin.display(description="tasks", ordering="task_total")
    def task_count(self, obj: Round) -> int:
        return obj.task_total  # type: ignore[attr-defined]

    @admin.display(description="accuracy")
    def accuracy(self, obj: Round) -> str:
        return _accuracy_text(obj.metrics)

    @admin.display(description="metrics")
    def metrics_pretty(self, obj: Round) -> str:
        return pretty_json(obj.metrics)


class InRoundColumns:
    """List columns for objects that belong to a round (tasks, updates): their training and round."""

    @admin.display(description="training", ordering="round__training__name")
    def training(self, obj: Task | ClientUpdate) -> str:
        return obj.round.training.name

    @admin.display(description="round", ordering="round__number")
    def round_number(self, obj: Task | ClientUpdate) -> int:
        return obj.round.number


@admin.register(Task)
class TaskAdmin(InRoundColumns, ViewOnlyAdmin):
    list_display = [
        "task",
        "training",
        "round_number",
        "agent",
        "status",
        "attempt",
        "deadline",
        "completed_at",
    ]
    list_filter = ["status", "kind"]
    search_fields = ["=id", "agent__agent_id", "round__training__name", "=round__training__id"]
    list_select_related = ["round__training", "agent"]
    readonly_fields = [
        "id",
        "round",
        "agent",
        "kind",
        "status",
        "attempt",
        "deadline",
        "delivered_at",
        "completed_at",
        "failure_reason",
        "config_pretty",
        "created_at",
    ]
    exclude = ["config"]

    @admin.display(description="task", ordering="created_at")
    def task(self, obj: Task) -> str:
        """What it is, without its UUID (the link opens it): "fit, attempt 2"."""
        return f"{obj.kind}, attempt {obj.attempt}" if obj.attempt > 1 else obj.kind

    @admin.display(description="config")
    def config_pretty(self, obj: Task) -> str:
        return pretty_json(obj.config)


@admin.register(ClientUpdate)
class ClientUpdateAdmin(InRoundColumns, ViewOnlyAdmin):
    list_display = [
        "created_at",
        "agent",
        "training",
        "round_number",
        "num_examples",
        "size_bytes",
        "update_norm",
        "sha256",
    ]
    search_fields = ["agent__agent_id", "blob_sha256", "round__training__name", "=round__training__id"]
    list_select_related = ["round__training", "agent"]
    readonly_fields = [
        "task",
        "round",
        "agent",
        "blob_name",
        "blob_sha256",
        "size_bytes",
        "num_examples",
        "update_norm",
        "metrics_pretty",
        "created_at",
    ]
    exclude = ["metrics"]

    @admin.display(description="sha256")
    def sha256(self, obj: ClientUpdate) -> str:
        return short_hash(obj.blob_sha256)

    @admin.display(description="metrics")
    def metrics_pretty(self, obj: ClientUpdate) -> str:
        return pretty_json(obj.metrics)


@admin.register(AggregationOutbox)
class AggregationOutboxAdmin(InRoundColumns, ViewOnlyAdmin):
    """The intent to aggregate each round: how often it was sent, refused and run (docs/operations.md 5.1)."""

    list_display = [
        "training",
        "round_number",
        "created_at",
        "sends",
        "send_failures",
        "runs",
        "heartbeat_at",
        "completed_at",
    ]
    list_filter = [("completed_at", admin.EmptyFieldListFilter)]
    search_fields = ["round__training__name", "=round__training__id"]
    list_select_related = ["round__training"]
    readonly_fields = [
        "round",
        "created_at",
        "sent_at",
        "sends",
        "send_failures",
        "last_error",
        "started_at",
        "runs",
        "heartbeat_at",
        "completed_at",
    ]


# ---------------------------------------------------------------------------------------------------
# Secure aggregation (public values only: the server never holds an unmasked update)
# ---------------------------------------------------------------------------------------------------
class SecAggMessageInline(ViewOnlyInline):
    model = SecAggMessage
    fields = ["phase", "party_id", "agent", "size_bytes", "created_at"]
    readonly_fields = fields
    ordering = ["phase", "party_id"]


@admin.register(SecAggSession)
class SecAggSessionAdmin(InRoundColumns, ViewOnlyAdmin):
    """One attempt of a secure-aggregation round: its phase, deadline and who sent what.

    See docs/secure-aggregation.md."""

    list_display = ["training", "round_number", "attempt", "phase", "parties_count", "deadline", "closed_at"]
    list_filter = ["phase"]
    search_fields = ["round__training__name", "=round__training__id"]
    list_select_related = ["round__training"]
    readonly_fields = [
        "round",
        "attempt",
        "phase",
        "parties_count",
        "deadline",
        "error",
        "created_at",
        "closed_at",
        "setup_pretty",
    ]
    exclude = ["setup", "parties"]
    inlines = [SecAggMessageInline]

    @admin.display(description="parties")
    def parties_count(self, obj: SecAggSession) -> int:
        return len(obj.parties or {})

    @admin.display(description="setup")
    def setup_pretty(self, obj: SecAggSession) -> str:
        return pretty_json(obj.setup)


@admin.register(SecAggMessage)
class SecAggMessageAdmin(ViewOnlyAdmin):
    """What an agent sent in one phase: public keys, encrypted share bundles, a masked input's blob."""

    list_display = ["training", "round_number", "phase", "party_id", "agent", "size_bytes", "created_at"]
    list_filter = ["phase"]
    search_fields = ["agent__agent_id", "session__round__training__name"]
    list_select_related = ["session__round__training", "agent"]
    readonly_fields = [
        "session",
        "agent",
        "party_id",
        "phase",
        "blob_name",
        "blob_sha256",
        "size_bytes",
        "created_at",
        "body_pretty",
    ]
    exclude = ["body"]

    @admin.display(description="training", ordering="session__round__training__name")
    def training(self, obj: SecAggMessage) -> str:
        return obj.session.round.training.name

    @admin.display(description="round", ordering="session__round__number")
    def round_number(self, obj: SecAggMessage) -> int:
        return obj.session.round.number

    @admin.display(description="body")
    def body_pretty(self, obj: SecAggMessage) -> str:
        return pretty_json(obj.body)
