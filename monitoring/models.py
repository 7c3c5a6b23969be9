"""Metrics per round, alerts, and the audit log of who did what to which object."""

from __future__ import annotations

from django.db import models


class Metric(models.Model):
    training = models.ForeignKey("trainings.Training", on_delete=models.CASCADE, related_name="metrics")
    round_number = models.PositiveIntegerField()
    name = models.CharField(max_length=64)
    value = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["training", "round_number", "name"]
        indexes = [models.Index(fields=["training", "name", "round_number"])]
        constraints = [
            models.UniqueConstraint(
                fields=["training", "round_number", "name"], name="unique_metric_per_round"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name}={self.value:.4g} (round {self.round_number})"


class Alert(models.Model):
    class Severity(models.TextChoices):
        INFO = "info", "info"
        WARNING = "warning", "warning"
        CRITICAL = "critical", "critical"

    class Kind(models.TextChoices):
        ROUND_FAILED = "round_failed", "round failed"
        TOO_FEW_AGENTS = "too_few_agents", "too few agents"
        AGGREGATION_FAILED = "aggregation_failed", "aggregation failed"
        TRAINING_FAILED = "training_failed", "training failed"
        PRIVACY_BUDGET = "privacy_budget", "privacy budget"
        SYSTEM = "system", "system"
        AGGREGATION_STALLED = "aggregation_stalled", "aggregation stalled"
        AGENTS_DROPPING = "agents_dropping", "agents dropping out"
        ROUND_EMPTY = "round_empty", "round empty"
        ROUND_DECLINED = "round_declined", "round declined"

    training = models.ForeignKey(
        "trainings.Training", null=True, blank=True, on_delete=models.CASCADE, related_name="alerts"
    )
    round_number = models.PositiveIntegerField(null=True, blank=True)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.WARNING)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    message = models.TextField()
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True)
    resolved_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the condition ended by itself (e.g. a stalled round completed).",
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message[:60]}"


class AuditLog(models.Model):
    class ActorType(models.TextChoices):
        USER = "user", "user"
        AGENT = "agent", "agent"
        SYSTEM = "system", "system"

    actor_type = models.CharField(max_length=8, choices=ActorType.choices)
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64, db_index=True)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.actor_type}:{self.actor} {self.action} {self.object_type}:{self.object_id}"
