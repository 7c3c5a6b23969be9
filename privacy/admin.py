"""Admin for privacy budgets and their ledger (read-only: the service writes them)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from monitoring.admin import TrainingNameColumn
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
class PrivacyBudgetAdmin(TrainingNameColumn, admin.ModelAdmin):
    list_display = ["training_name", "mode", "level", "epsilon", "delta", "spent_epsilon", "noise_multiplier"]
    list_filter = ["mode", "mechanism", "accountant", "level"]
    list_select_related = ["training"]
    search_fields = ["training__name", "=training__id"]
    inlines = [LedgerInline]

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        return [f.name for f in PrivacyBudget._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(PrivacyLedgerEntry)
class PrivacyLedgerEntryAdmin(admin.ModelAdmin):
    list_display = ["training", "round_number", "noise_multiplier", "sampling_probability", "epsilon_after"]
    list_filter = ["mechanism"]
    list_select_related = ["budget__training"]
    search_fields = ["budget__training__name", "=budget__training__id"]

    @admin.display(description="training", ordering="budget__training__name")
    def training(self, obj: PrivacyLedgerEntry) -> str:
        return obj.budget.training.name

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        return [f.name for f in PrivacyLedgerEntry._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
