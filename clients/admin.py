"""Admin for agents and enrolment keys.

Invariants: tokens and keys are created by ``clients.services`` and shown in clear exactly once, as a
message after creation; only their sha256 is stored and shown. An agent's status changes only through
``agent_set_status`` (which audits); everything an agent reports is read-only.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.widgets import AdminSplitDateTime
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from clients.models import Agent, EnrollmentKey, agent_id_validator
from clients.selectors import agent_is_online
from clients.services import MAX_CAPABILITIES_BYTES, agent_create, agent_set_status, enrollment_key_create
from monitoring.admin import ActionsOnlyAdmin, ServiceAddMixin, pretty_json
from monitoring.services import audit_record


# ---------------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------------
class AgentAddForm(forms.Form):
    agent_id = forms.CharField(
        max_length=64,
        validators=[agent_id_validator],
        help_text="The agent's public name: 1 to 64 letters, digits, '_', '.' or '-'.",
    )
    capabilities = forms.JSONField(
        required=False,
        initial=dict,
        widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
        help_text='Optional JSON object, e.g. {"gpu": false}. The agent may report its own later.',
    )

    def clean_agent_id(self) -> str:
        agent_id = self.cleaned_data["agent_id"]
        if Agent.objects.filter(agent_id=agent_id).exists():
            raise forms.ValidationError(f"An agent named {agent_id!r} already exists.")
        return agent_id

    def clean_capabilities(self) -> dict[str, Any]:
        capabilities = self.cleaned_data.get("capabilities")
        if capabilities in (None, ""):
            return {}
        if not isinstance(capabilities, dict):
            raise forms.ValidationError("Capabilities must be a JSON object.")
        if len(json.dumps(capabilities)) > MAX_CAPABILITIES_BYTES:
            raise forms.ValidationError(
                f"Capabilities must be at most {MAX_CAPABILITIES_BYTES} bytes of JSON."
            )
        return capabilities


class OnlineFilter(admin.SimpleListFilter):
    title = "online"
    parameter_name = "online"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "online"), ("no", "offline")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Agent]) -> QuerySet[Agent]:
        cutoff = timezone.now() - timedelta(seconds=settings.FEDSITE_AGENT_TIMEOUT)
        if self.value() == "yes":
            return queryset.filter(last_seen_at__gte=cutoff)
        if self.value() == "no":
            return queryset.exclude(last_seen_at__gte=cutoff)
        return queryset


@admin.register(Agent)
class AgentAdmin(ServiceAddMixin, ActionsOnlyAdmin):
    add_form_class = AgentAddForm
    add_form_help = (
        "The agent's token is shown once, on the next page; only its hash is stored. "
        "Agents can also enrol themselves with an enrolment key."
    )
    list_display = [
        "agent_id",
        "status",
        "is_online",
        "reliability_display",
        "task_outcomes",
        "last_seen_at",
        "enrolled_via",
    ]
    list_filter = ["status", OnlineFilter, "state", "enrolled_via"]
    search_fields = ["agent_id", "token_prefix", "=id"]
    readonly_fields = [
        "id",
        "agent_id",
        "status",
        "state",
        "is_online",
        "reliability_display",
        "last_seen_at",
        "tasks_completed",
        "tasks_failed",
        "tasks_expired",
        "enrolled_via",
        "token_prefix",
        "token_hash",
        "capabilities_pretty",
        "created_at",
    ]
    fieldsets = [
        (None, {"fields": ["id", "agent_id", "status", "state", "is_online", "last_seen_at", "created_at"]}),
        (
            "Reliability",
            {"fields": ["reliability_display", "tasks_completed", "tasks_failed", "tasks_expired"]},
        ),
        ("Credentials", {"fields": ["enrolled_via", "token_prefix", "token_hash"]}),
        ("Capabilities", {"fields": ["capabilities_pretty"]}),
    ]
    actions = ["activate", "quarantine", "disable"]

    @admin.display(description="online", boolean=True)
    def is_online(self, obj: Agent) -> bool:
        return agent_is_online(obj)

    @admin.display(description="reliability")
    def reliability_display(self, obj: Agent) -> str:
        return f"{obj.reliability:.2f}"

    @admin.display(description="completed / failed / expired", ordering="tasks_completed")
    def task_outcomes(self, obj: Agent) -> str:
        return f"{obj.tasks_completed} / {obj.tasks_failed} / {obj.tasks_expired}"

    @admin.display(description="capabilities")
    def capabilities_pretty(self, obj: Agent) -> str:
        return pretty_json(obj.capabilities)

    def create_from_form(self, request: HttpRequest, form: forms.Form) -> Agent:
        agent, token = agent_create(
            agent_id=form.cleaned_data["agent_id"],
            capabilities=form.cleaned_data["capabilities"],
            actor=request.user.get_username(),
        )
        messages.success(
            request,
            f"Agent {agent.agent_id} created. Its token is {token} - copy it now: it is stored only as a "
            "hash and will not be shown again.",
        )
        return agent

    def _set_status(self, request: HttpRequest, queryset: QuerySet[Agent], status: str) -> None:
        changed = 0
        for agent in queryset:
            if agent.status == status:
                continue
            agent_set_status(agent=agent, status=status, actor=request.user.get_username())
            changed += 1
        self.message_user(request, f"{changed} agent(s) are now {status}.", messages.SUCCESS)

    @admin.action(description="Activate selected agents", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        self._set_status(request, queryset, Agent.Status.ACTIVE)

    @admin.action(description="Quarantine selected agents (no new tasks)", permissions=["change"])
    def quarantine(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        self._set_status(request, queryset, Agent.Status.QUARANTINED)

    @admin.action(description="Disable selected agents (token refused)", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        self._set_status(request, queryset, Agent.Status.DISABLED)


# ---------------------------------------------------------------------------------------------------
# Enrolment keys
# ---------------------------------------------------------------------------------------------------
class EnrollmentKeyAddForm(forms.Form):
    label = forms.CharField(max_length=100, help_text="What the key is for, e.g. 'hospital pilot'.")
    max_uses = forms.IntegerField(required=False, min_value=1, help_text="Empty means unlimited.")
    expires_at = forms.SplitDateTimeField(
        required=False, widget=AdminSplitDateTime, help_text="Empty means it never expires."
    )

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return expires_at


class EnrollmentKeyChangeForm(forms.ModelForm):
    class Meta:
        model = EnrollmentKey
        fields = ["label", "max_uses", "expires_at", "revoked"]


@admin.register(EnrollmentKey)
class EnrollmentKeyAdmin(ServiceAddMixin, admin.ModelAdmin):
    add_form_class = EnrollmentKeyAddForm
    add_form_help = "The key's secret is shown once, on the next page; only its hash is stored."
    form = EnrollmentKeyChangeForm
    list_display = [
        "label",
        "key_prefix",
        "uses",
        "max_uses",
        "expires_at",
        "revoked",
        "is_usable",
        "created_by",
        "created_at",
    ]
    list_filter = ["revoked"]
    search_fields = ["label", "key_prefix"]
    list_select_related = ["created_by"]
    readonly_fields = ["key_prefix", "key_hash", "uses", "created_by", "created_at"]
    fields = [
        "label",
        "max_uses",
        "expires_at",
        "revoked",
        "key_prefix",
        "key_hash",
        "uses",
        "created_by",
        "created_at",
    ]

    def has_delete_permission(self, request: HttpRequest, obj: EnrollmentKey | None = None) -> bool:
        return False  # revoke instead, so the audit trail keeps the key

    @admin.display(description="usable", boolean=True)
    def is_usable(self, obj: EnrollmentKey) -> bool:
        return not (
            obj.revoked
            or (obj.expires_at is not None and obj.expires_at <= timezone.now())
            or (obj.max_uses is not None and obj.uses >= obj.max_uses)
        )

    def create_from_form(self, request: HttpRequest, form: forms.Form) -> EnrollmentKey:
        key, secret = enrollment_key_create(
            label=form.cleaned_data["label"],
            max_uses=form.cleaned_data["max_uses"],
            expires_at=form.cleaned_data["expires_at"],
            created_by=request.user,
        )
        messages.success(
            request,
            f"Enrolment key {key.label!r} created. Its secret is {secret} - copy it now: it is stored only "
            "as a hash and will not be shown again.",
        )
        return key

    def save_model(
        self, request: HttpRequest, obj: EnrollmentKey, form: forms.ModelForm, change: bool
    ) -> None:
        # Only label, limits and revocation are editable; each change is audited with the fields it touched.
        super().save_model(request, obj, form, change)
        if change and form.changed_data:
            audit_record(
                actor=request.user,
                action="enrollment_key.revoke"
                if "revoked" in form.changed_data and obj.revoked
                else "enrollment_key.update",
                obj=obj,
                details={name: str(form.cleaned_data[name]) for name in form.changed_data},
            )
