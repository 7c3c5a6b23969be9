"""Admin for metrics, alerts and the audit log, and the admin helpers every app's admin shares.

Invariants: the admin never assigns a status or a secret itself. Rows the system writes (rounds, tasks,
updates, versions, metrics, the audit log) are view-only; operator verbs are admin actions that call
services, and services audit. Objects made by a service (agents, enrolment keys, trainings) are added
through ``ServiceAddMixin``, whose add view hands a plain form's data to that service.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, PermissionDenied, ValidationError
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from fedsite.errors import ServiceError
from monitoring.models import Alert, AuditLog, Metric, SystemHealthSample, UpdateStatistics
from monitoring.services import alert_acknowledge

# The admin's navigation sidebar takes 300 of 1280 px beside every changelist (and its filter column
# another 270): without it the lists fit a 1280 px screen. The index page still lists every model.
admin.site.enable_nav_sidebar = False


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------
def pretty_json(value: Any) -> str:
    """Indented JSON in a ``<pre>``, for read-only JSON columns."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return format_html('<pre style="margin:0;white-space:pre-wrap">{}</pre>', text)


def short_hash(value: str, length: int = 12) -> str:
    return f"{value[:length]}…" if value and len(value) > length else value


class TrainingNameColumn:
    """A ``training_name`` list column: the training's name (its ``__str__`` adds the status, which the
    row's own columns or the filter already say), sorted by name. The row needs ``training``."""

    @admin.display(description="training", ordering="training__name")
    def training_name(self, obj: Any) -> str:
        return obj.training.name if obj.training_id else "-"


class ViewOnlyAdmin(admin.ModelAdmin):
    """Rows only the system writes: listed and viewed, never added, changed or deleted here."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False


class ActionsOnlyAdmin(admin.ModelAdmin):
    """Objects an operator changes only through admin actions (which call services).

    Change permission is granted on the changelist, so the actions are offered, and refused on a single
    object, so its page is view-only and no form can assign a field directly.
    """

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False


class ViewOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return False


class ServiceAddMixin:
    """Replace the admin's add view with a plain form whose cleaned data go to a service.

    Subclasses set ``add_form_class`` and implement ``create_from_form``, which calls the service and
    returns the new object; a ``ServiceError`` it raises is shown on the form.
    """

    add_form_class: type[forms.Form]
    add_form_template = "monitoring/admin_service_add.html"
    add_form_help = ""

    def create_from_form(self, request: HttpRequest, form: forms.Form) -> models.Model:
        """Call the service that creates the object (each admin using the mixin defines this)."""
        raise ImproperlyConfigured(
            f"{type(self).__name__} uses ServiceAddMixin but does not define create_from_form()."
        )

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        model_admin: Any = self
        if not model_admin.has_add_permission(request):
            raise PermissionDenied
        opts = model_admin.model._meta
        form = self.add_form_class(request.POST) if request.method == "POST" else self.add_form_class()
        if request.method == "POST" and form.is_valid():
            try:
                obj = self.create_from_form(request, form)
            except ServiceError as exc:
                form.add_error(None, exc.message)
            else:
                model_admin.log_addition(request, obj, [{"added": {}}])
                url = reverse(
                    f"admin:{opts.app_label}_{opts.model_name}_change",
                    args=[obj.pk],
                    current_app=model_admin.admin_site.name,
                )
                return HttpResponseRedirect(url)
        context = {
            **model_admin.admin_site.each_context(request),
            "title": f"Add {opts.verbose_name}",
            "subtitle": None,
            "opts": opts,
            "form": form,
            "help": self.add_form_help,
            "media": model_admin.media + form.media,
            **(extra_context or {}),
        }
        return TemplateResponse(request, self.add_form_template, context)


# ---------------------------------------------------------------------------------------------------
# Monitoring models
# ---------------------------------------------------------------------------------------------------
@admin.register(Metric)
class MetricAdmin(TrainingNameColumn, ViewOnlyAdmin):
    list_display = ["training_name", "round_number", "name", "value", "created_at"]
    list_filter = ["name"]
    search_fields = ["name", "training__name", "=training__id"]
    list_select_related = ["training"]
    readonly_fields = ["training", "round_number", "name", "value", "created_at"]


class AcknowledgedFilter(admin.SimpleListFilter):
    title = "acknowledged"
    parameter_name = "acknowledged"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("no", "open"), ("yes", "acknowledged")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Alert]) -> QuerySet[Alert]:
        if self.value() == "no":
            return queryset.filter(acknowledged_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(acknowledged_at__isnull=False)
        return queryset


@admin.register(Alert)
class AlertAdmin(TrainingNameColumn, ActionsOnlyAdmin):
    list_display = ["created_at", "severity", "kind", "training_name", "short_message", "count", "state"]
    list_filter = [AcknowledgedFilter, "severity", "kind"]
    search_fields = ["message", "training__name", "=training__id"]
    list_select_related = ["training"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "training",
        "round_number",
        "severity",
        "kind",
        "message",
        "details_pretty",
        "created_at",
        "acknowledged_at",
        "acknowledged_by",
        "resolved_at",
        "resolution",
        "subject",
        "count",
        "last_seen_at",
    ]
    exclude = ["details"]
    actions = ["acknowledge"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="message")
    def short_message(self, obj: Alert) -> str:
        return obj.message if len(obj.message) <= 80 else obj.message[:79] + "…"

    @admin.display(description="state")
    def state(self, obj: Alert) -> str:
        if obj.acknowledged_at is not None:
            return f"acknowledged by {obj.acknowledged_by}"
        return "resolved" if obj.resolved_at is not None else "open"

    @admin.display(description="details")
    def details_pretty(self, obj: Alert) -> str:
        return pretty_json(obj.details)

    @admin.action(description="Acknowledge selected alerts", permissions=["change"])
    def acknowledge(self, request: HttpRequest, queryset: QuerySet[Alert]) -> None:
        done = sum(alert_acknowledge(alert=alert, actor=request.user) for alert in queryset)
        skipped = queryset.count() - done
        self.message_user(request, f"Acknowledged {done} alert(s).", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} alert(s) were already acknowledged.", messages.INFO)


@admin.register(SystemHealthSample)
class SystemHealthSampleAdmin(ViewOnlyAdmin):
    list_display = [
        "created_at",
        "role",
        "process",
        "health_status",
        "cpu",
        "memory",
        "disk_free",
        "workers_alive",
    ]
    list_filter = ["role", "health_status"]
    search_fields = ["process"]
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in SystemHealthSample._meta.fields]

    @admin.display(description="CPU %", ordering="cpu_percent")
    def cpu(self, obj: SystemHealthSample) -> str:
        return f"{obj.cpu_percent:.0f}"

    @admin.display(description="memory %", ordering="memory_percent")
    def memory(self, obj: SystemHealthSample) -> str:
        return f"{obj.memory_percent:.0f}"

    @admin.display(description="disk free %", ordering="disk_free_percent")
    def disk_free(self, obj: SystemHealthSample) -> str:
        return f"{obj.disk_free_percent:.0f}"


@admin.register(AuditLog)
class AuditLogAdmin(ViewOnlyAdmin):
    list_display = ["created_at", "actor", "action", "object_name"]
    list_filter = ["actor_type", "object_type", "action"]
    search_fields = ["actor", "action", "=object_id"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "created_at",
        "actor_type",
        "actor",
        "action",
        "object_type",
        "object_id",
        "details_pretty",
    ]
    exclude = ["details"]

    @admin.display(description="details")
    def details_pretty(self, obj: AuditLog) -> str:
        return pretty_json(obj.details)

    @admin.display(description="object", ordering="object_type")
    def object_name(self, obj: AuditLog) -> str:
        """The object's name where it has one (a training, an agent, a user), else its type and a short
        id: one primary-key lookup per row of the page."""
        from django.apps import apps

        name_fields = {"trainings.training": "name", "clients.agent": "agent_id", "auth.user": "username"}
        field = name_fields.get(obj.object_type)
        if field and obj.object_id:
            try:
                model = apps.get_model(obj.object_type)
                name = model.objects.filter(pk=obj.object_id).values_list(field, flat=True).first()
            except (LookupError, ValueError, TypeError, ValidationError):  # not a key of that table
                name = None
            if name is not None:
                return f"{obj.object_type.rsplit('.', 1)[1]} {name}"
        return f"{obj.object_type} {short_hash(obj.object_id, 8)}".strip()


@admin.register(UpdateStatistics)
class UpdateStatisticsAdmin(TrainingNameColumn, ViewOnlyAdmin):
    """What the aggregation measured about each update; flagged ones are the anomalies."""

    list_display = [
        "training_name",
        "round_number",
        "agent",
        "flagged",
        "action",
        "norm",
        "cosine_display",
        "contribution_display",
    ]
    list_filter = ["flagged", "action"]
    search_fields = ["agent__agent_id", "=training__id", "training__name"]
    list_select_related = ["training", "agent"]
    fields = [
        "training",
        "round_number",
        "agent",
        "update",
        "num_examples",
        "update_norm",
        "cosine",
        "train_loss",
        "loss_jump",
        "scores_pretty",
        "reasons",
        "flagged",
        "action",
        "contribution",
        "created_at",
    ]
    readonly_fields = fields

    @admin.display(description="update norm", ordering="update_norm")
    def norm(self, obj: UpdateStatistics) -> str:
        return f"{obj.update_norm:.4g}"

    @admin.display(description="cosine", ordering="cosine")
    def cosine_display(self, obj: UpdateStatistics) -> str:
        return "-" if obj.cosine is None else f"{obj.cosine:.3f}"

    @admin.display(description="contribution", ordering="contribution")
    def contribution_display(self, obj: UpdateStatistics) -> str:
        return "-" if obj.contribution is None else f"{obj.contribution:.3f}"

    @admin.display(description="robust z-scores")
    def scores_pretty(self, obj: UpdateStatistics) -> str:
        return pretty_json(obj.scores)
