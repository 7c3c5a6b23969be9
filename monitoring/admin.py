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
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from fedsite.errors import ServiceError
from monitoring.models import Alert, AuditLog, Metric, SystemHealthSample, UpdateStatistics
from monitoring.services import alert_acknowledge


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------
def pretty_json(value: Any) -> str:
    """Indented JSON in a ``<pre>``, for read-only JSON columns."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return format_html('<pre style="margin:0;white-space:pre-wrap">{}</pre>', text)


def short_hash(value: str, length: int = 12) -> str:
    return f"{value[:length]}…" if value and len(value) > length else value


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
class MetricAdmin(ViewOnlyAdmin):
    list_display = ["training", "round_number", "name", "value", "created_at"]
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
class AlertAdmin(ActionsOnlyAdmin):
    list_display = [
        "created_at",
        "severity",
        "kind",
        "training",
        "round_number",
        "short_message",
        "count",
        "is_acknowledged",
        "acknowledged_by",
        "resolved_at",
    ]
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
        return obj.message if len(obj.message) <= 100 else obj.message[:99] + "…"

    @admin.display(description="acknowledged", boolean=True)
    def is_acknowledged(self, obj: Alert) -> bool:
        return obj.acknowledged_at is not None

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
        "cpu_percent",
        "memory_percent",
        "disk_free_percent",
        "process_rss_bytes",
        "workers_alive",
        "open_long_polls",
    ]
    list_filter = ["role", "health_status"]
    search_fields = ["process"]
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in SystemHealthSample._meta.fields]


@admin.register(AuditLog)
class AuditLogAdmin(ViewOnlyAdmin):
    list_display = ["created_at", "actor_type", "actor", "action", "object_type", "object_id"]
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


@admin.register(UpdateStatistics)
class UpdateStatisticsAdmin(ViewOnlyAdmin):
    """What the aggregation measured about each update; flagged ones are the anomalies."""

    list_display = [
        "training",
        "round_number",
        "agent",
        "flagged",
        "action",
        "update_norm",
        "cosine",
        "train_loss",
        "loss_jump",
        "contribution",
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

    @admin.display(description="robust z-scores")
    def scores_pretty(self, obj: UpdateStatistics) -> str:
        return pretty_json(obj.scores)
