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
        ROUND_EMPTY = "round_empty", "round released with no update"
        ROUND_DECLINED = "round_declined", "every agent of a round declined"
        SYSTEM = "system", "system"
        AGGREGATION_STALLED = "aggregation_stalled", "aggregation stalled"
        AGENTS_DROPPING = "agents_dropping", "agents dropping out"
        RESOURCE_EXHAUSTED = "resource_exhausted", "resource exhausted"
        PERFORMANCE_DEGRADED = "performance_degraded", "performance degraded"
        CONVERGENCE_STALLED = "convergence_stalled", "convergence stalled"
        UPDATE_ANOMALY = "update_anomaly", "anomalous updates"
        AGENT_QUARANTINED = "agent_quarantined", "agent quarantined"
        CLIENT_FAILURES = "client_failures", "agent failing its tasks"

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
    subject = models.CharField(
        max_length=200,
        default="",
        blank=True,
        help_text="What the alert is about (e.g. training:<id>/round:3, disk, queue:aggregation); "
        "at most one open alert exists per (kind, subject).",
    )
    count = models.PositiveIntegerField(default=1, help_text="How many times the condition was raised.")
    last_seen_at = models.DateTimeField(null=True, blank=True, help_text="When it was last raised.")
    resolution = models.TextField(blank=True, help_text="Why the alert resolved itself.")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "subject"],
                condition=models.Q(resolved_at__isnull=True),
                name="one_open_alert_per_kind_subject",
            ),
        ]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message[:60]}"


class UpdateStatistics(models.Model):
    """What the aggregation measured about one update, its robust z-scores and what the policy did.

    One row per aggregated update of a synchronous round (monitoring/anomalies.py); ``flagged`` rows are
    the anomalies. ``cosine`` is to the reference direction (the step that produced the round's base
    version), null in a round without one; ``contribution`` is the agent's running contribution estimate
    in this training after this round.
    """

    class Action(models.TextChoices):
        NONE = "none", "none"
        FLAGGED = "flagged", "flagged"
        EXCLUDED = "excluded", "excluded from the aggregate"

    update = models.OneToOneField(
        "trainings.ClientUpdate", on_delete=models.CASCADE, related_name="statistics"
    )
    training = models.ForeignKey(
        "trainings.Training", on_delete=models.CASCADE, related_name="update_statistics"
    )
    round_number = models.PositiveIntegerField()
    agent = models.ForeignKey("clients.Agent", on_delete=models.CASCADE, related_name="update_statistics")
    num_examples = models.PositiveIntegerField()
    update_norm = models.FloatField()
    cosine = models.FloatField(null=True, blank=True)
    train_loss = models.FloatField(null=True, blank=True)
    loss_jump = models.FloatField(null=True, blank=True)
    scores = models.JSONField(default=dict, blank=True, help_text="Robust z-score per statistic.")
    reasons = models.JSONField(default=list, blank=True, help_text="Statistics past their threshold.")
    flagged = models.BooleanField(default=False, db_index=True)
    action = models.CharField(max_length=16, choices=Action.choices, default=Action.NONE)
    contribution = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["training", "round_number", "agent"]
        indexes = [models.Index(fields=["training", "agent", "round_number"])]
        verbose_name_plural = "update statistics"

    def __str__(self) -> str:
        state = f" {self.action}" if self.flagged else ""
        return f"round {self.round_number} update of {self.agent_id}{state}"


class SystemHealthSample(models.Model):
    """One sample of the machine and of the process that took it (a bounded time series, see retention).

    System-wide figures (CPU, memory, disk, network) are the same whoever samples them; ``process_rss_bytes``
    and ``open_long_polls`` belong to the sampling process (``role``/``process``): a worker samples in the
    beat task, a web process on each ``GET /api/system/health``.
    """

    class Role(models.TextChoices):
        WEB = "web", "web"
        WORKER = "worker", "worker"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    role = models.CharField(max_length=8, choices=Role.choices)
    process = models.CharField(max_length=200, help_text="host:pid of the sampling process.")
    health_status = models.CharField(max_length=16)
    cpu_percent = models.FloatField()
    cpu_per_core = models.JSONField(default=list)
    cpu_interval_seconds = models.FloatField()
    memory_percent = models.FloatField()
    memory_available_bytes = models.BigIntegerField()
    disk_free_bytes = models.BigIntegerField()
    disk_total_bytes = models.BigIntegerField()
    disk_free_percent = models.FloatField()
    network_bytes_sent = models.BigIntegerField()
    network_bytes_received = models.BigIntegerField()
    process_rss_bytes = models.BigIntegerField()
    database_latency_ms = models.FloatField(null=True, blank=True)
    redis_latency_ms = models.FloatField(null=True, blank=True)
    workers_alive = models.IntegerField(null=True, blank=True)
    queue_depths = models.JSONField(default=dict, blank=True)
    open_long_polls = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.role} {self.process} at {self.created_at:%Y-%m-%d %H:%M:%S}: {self.health_status}"


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
