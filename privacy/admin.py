"""Admin for privacy budgets and their ledger (read-only: the service writes them)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from privacy.models import PrivacyBudget, PrivacyLedgerEntry


class LedgerInline(admin.TabularInline):
    model = PrivacyLedgerEntry
    extra = 0
    can_delete = False
    fields = [
        "round_number",
        "mechanism",
        "noise_multiplier",
        "sampling_probability",
        "epsilon_after",
        "created_at",
    ]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(PrivacyBudget)
class PrivacyBudgetAdmin(admin.ModelAdmin):
    list_display = [
        "training",
        "mode",
        "level",
        "epsilon",
        "delta",
        "spent_epsilon",
        "noise_multiplier",
        "accountant",
        "created_at",
    ]
    list_filter = ["mode", "mechanism", "accountant", "level"]
    inlines = [LedgerInline]

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        return [f.name for f in PrivacyBudget._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(PrivacyLedgerEntry)
class PrivacyLedgerEntryAdmin(admin.ModelAdmin):
    list_display = ["budget", "round_number", "noise_multiplier", "sampling_probability", "epsilon_after"]
    list_filter = ["mechanism"]

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        return [f.name for f in PrivacyLedgerEntry._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
