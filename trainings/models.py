"""Trainings, their rounds, the tasks handed to agents, and the updates agents send back.

Invariants:
- ``Training.status`` and ``Round.status`` change only through ``trainings.state.transition_*``, which
  checks the allowed source states under a row lock; nothing assigns them freely.
- ``(training, number)`` is unique for rounds, ``(round, agent, kind)`` for tasks; an update belongs to
  exactly one task.
- Tensors never live in the database: updates and versions are blobs addressed by sha256.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Training(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        RUNNING = "running", "running"
        COMPLETED = "completed", "completed"
        STOPPED = "stopped", "stopped by operator"
        FAILED = "failed", "failed"
        BUDGET_EXHAUSTED = "budget_exhausted", "privacy budget exhausted"

    TERMINAL = frozenset({Status.COMPLETED, Status.STOPPED, Status.FAILED, Status.BUDGET_EXHAUSTED})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    algorithm = models.CharField(max_length=32)
    config = models.JSONField(help_text="The validated TrainingConfiguration, as JSON.")
    model_spec = models.JSONField(null=True, blank=True)
    parameter_spec = models.JSONField()
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.PENDING, db_index=True)
    current_round = models.PositiveIntegerField(default=0)
    current_version = models.ForeignKey(
        "versioning.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    best_accuracy = models.FloatField(null=True, blank=True)
    stop_reason = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class Round(models.Model):
    class Status(models.TextChoices):
        WAITING = "waiting_for_agents", "waiting for agents"
        COLLECTING = "collecting", "collecting updates"
        AGGREGATING = "aggregating", "aggregating"
        COMPLETED = "completed", "completed"
        FAILED = "failed", "failed"
        CANCELLED = "cancelled", "cancelled"

    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.WAITING, db_index=True)
    attempt = models.PositiveIntegerField(default=0, help_text="How many times tasks were issued.")
    base_version = models.ForeignKey("versioning.ModelVersion", on_delete=models.PROTECT, related_name="+")
    deadline = models.DateTimeField(null=True, blank=True, db_index=True)
    opened_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["training", "number"]
        constraints = [
            models.UniqueConstraint(fields=["training", "number"], name="unique_round_number_per_training"),
        ]

    def __str__(self) -> str:
        return f"round {self.number} of {self.training_id} ({self.status})"


class Task(models.Model):
    class Kind(models.TextChoices):
        FIT = "fit", "fit"
        SECAGG_ADVERTISE = "secagg_advertise", "secure aggregation: advertise keys"
        SECAGG_SHARE = "secagg_share", "secure aggregation: share keys"
        SECAGG_MASKED_INPUT = "secagg_masked_input", "secure aggregation: train and upload masked input"
        SECAGG_UNMASK = "secagg_unmask", "secure aggregation: unmask"

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        DELIVERED = "delivered", "delivered"
        COMPLETED = "completed", "completed"
        FAILED = "failed", "failed"
        EXPIRED = "expired", "expired"
        CANCELLED = "cancelled", "cancelled"

    OPEN = frozenset({Status.PENDING, Status.DELIVERED})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="tasks")
    agent = models.ForeignKey("clients.Agent", on_delete=models.CASCADE, related_name="tasks")
    kind = models.CharField(max_length=24, choices=Kind.choices, default=Kind.FIT)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempt = models.PositiveIntegerField(default=1)
    base_version = models.ForeignKey(
        "versioning.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The global version the agent trains from (asynchronous: the newest at issue time).",
    )
    config = models.JSONField(default=dict, blank=True)
    deadline = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["round", "agent", "kind", "attempt"], name="unique_task_per_agent_per_round_attempt"
            ),
        ]
        indexes = [models.Index(fields=["agent", "status"])]

    def __str__(self) -> str:
        return f"{self.kind} task for {self.agent_id} in {self.round_id} ({self.status})"


class ClientUpdate(models.Model):
    task = models.OneToOneField(Task, on_delete=models.CASCADE, related_name="update")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="updates")
    agent = models.ForeignKey("clients.Agent", on_delete=models.CASCADE, related_name="updates")
    blob_name = models.CharField(max_length=255)
    blob_sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField()
    num_examples = models.PositiveIntegerField()
    metrics = models.JSONField(default=dict, blank=True)
    update_norm = models.FloatField()
    staleness = models.PositiveIntegerField(
        null=True, blank=True, help_text="Versions published between the update's base and its aggregation."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"update from {self.agent_id} for {self.round_id}"


class AggregationOutbox(models.Model):
    """The durable intent to aggregate a round (a transactional outbox row).

    Written in the transaction that moves the round to ``aggregating``, so the intent survives a broker
    outage or a worker killed mid-task; relayed to Celery after commit and again by the beat check until
    the round leaves ``aggregating``. The running task heartbeats here; a row with no sign of life for
    ``FEDSITE_AGGREGATION_STALL_SECONDS`` is sent again (aggregation is idempotent).
    """

    round = models.OneToOneField(Round, on_delete=models.CASCADE, related_name="aggregation_outbox")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="Last successful publish to the broker."
    )
    sends = models.PositiveIntegerField(default=0, help_text="Successful publishes (1 unless re-sent).")
    send_failures = models.PositiveIntegerField(default=0, help_text="Publishes the broker refused.")
    last_error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True, help_text="When a worker last started it.")
    runs = models.PositiveIntegerField(default=0, help_text="Times a worker started the task.")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="When the round left aggregating (done or failed)."
    )

    def __str__(self) -> str:
        return f"aggregation intent for {self.round_id} (sends {self.sends})"


class SecAggSession(models.Model):
    """One attempt of a secure-aggregation round (trainings/services/secagg.py): its public setup and phase.

    Holds only public values: the round setup (parties, graph seed, configuration) and which agent is which
    party. What each agent sent is in :class:`SecAggMessage`; the server's protocol state is rebuilt from
    these rows at every step, so a restarted web or worker process resumes the round where it was.
    """

    class Phase(models.TextChoices):
        ADVERTISE = "advertise", "advertise keys"
        SHARE = "share", "share keys"
        MASKED_INPUT = "masked_input", "masked input"
        UNMASK = "unmask", "unmasking"
        AGGREGATING = "aggregating", "aggregating"
        COMPLETED = "completed", "completed"
        FAILED = "failed", "failed"

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="secagg_sessions")
    attempt = models.PositiveIntegerField()
    phase = models.CharField(max_length=16, choices=Phase.choices, default=Phase.ADVERTISE)
    setup = models.JSONField(help_text="flcore.secagg.RoundSetup.to_json(): public round parameters.")
    parties = models.JSONField(help_text="Party id (decimal string) -> agent pk.")
    deadline = models.DateTimeField(db_index=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["round", "attempt"]
        constraints = [
            models.UniqueConstraint(fields=["round", "attempt"], name="unique_secagg_session_per_attempt"),
        ]

    def __str__(self) -> str:
        return f"secure aggregation of {self.round_id}, attempt {self.attempt} ({self.phase})"


class SecAggMessage(models.Model):
    """What one agent sent in one phase: public keys and signature, encrypted share bundles, a reference
    to its masked input (a safetensors blob), or its unmask response. Never an unmasked value."""

    session = models.ForeignKey(SecAggSession, on_delete=models.CASCADE, related_name="messages")
    agent = models.ForeignKey("clients.Agent", on_delete=models.CASCADE, related_name="+")
    party_id = models.PositiveBigIntegerField()
    phase = models.CharField(max_length=16, choices=SecAggSession.Phase.choices)
    body = models.JSONField(default=dict, blank=True)
    blob_name = models.CharField(max_length=255, blank=True)
    blob_sha256 = models.CharField(max_length=64, blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["session", "phase", "party_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "agent", "phase"], name="unique_secagg_message_per_agent_phase"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.phase} of party {self.party_id} in {self.session_id}"
