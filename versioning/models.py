"""Global model versions: every aggregation writes one, addressed by the sha256 of its safetensors blob.

Invariants: ``(training, number)`` is unique; ``blob_sha256`` is the sha256 of the stored bytes; a version's
weights, metrics and parent never change after it is written (rollback makes a new version that points at
an old blob). Only two things may change later: ``pinned`` (an operator's choice) and pruning, which clears
``blob_name``/``state_blob_name`` and sets ``blob_pruned_at`` (the metadata stays).

A row *names* a blob when one of its blob-name columns holds the blob's name; a blob is deleted only when no
row names it (``versioning.retention``). ``Blob`` is the registry row that writers and the garbage collector
lock, so a reference added while a deletion is being decided is never lost.
"""

from __future__ import annotations

import uuid

from django.db import models


class ModelVersion(models.Model):
    class Origin(models.TextChoices):
        INITIAL = "initial", "initial"
        AGGREGATION = "aggregation", "aggregation"
        ROLLBACK = "rollback", "rollback"
        UPLOAD = "upload", "uploaded"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    training = models.ForeignKey("trainings.Training", on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.AGGREGATION)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    blob_name = models.CharField(max_length=255)
    blob_sha256 = models.CharField(max_length=64, db_index=True)
    size_bytes = models.PositiveBigIntegerField()
    num_parameters = models.PositiveBigIntegerField()
    metrics = models.JSONField(default=dict, blank=True)
    state_blob_name = models.CharField(
        max_length=255, blank=True, help_text="Server optimizer state after this version (empty: none)."
    )
    state_blob_sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    pinned = models.BooleanField(default=False, help_text="A pinned version is never pruned.")
    pinned_by = models.CharField(max_length=150, blank=True)
    pinned_at = models.DateTimeField(null=True, blank=True)
    blob_pruned_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When retention deleted this version's blobs (its metadata stays); empty: blobs kept.",
    )

    class Meta:
        ordering = ["training", "number"]
        constraints = [
            models.UniqueConstraint(fields=["training", "number"], name="unique_version_number_per_training"),
        ]

    def __str__(self) -> str:
        return f"v{self.number} of {self.training_id}"

    @property
    def is_pruned(self) -> bool:
        return self.blob_pruned_at is not None


class Rollback(models.Model):
    """An operator's or the rollback policy's request to make an earlier version current again.

    On a finished (or not yet started) training it is applied at once. On a running training it is
    ``pending`` until the round in flight commits; then a new version of origin ``rollback`` (the target's
    weights and server-optimizer state, ``parent`` = the target) becomes current, so the next round starts
    from it. A newer request supersedes a pending one.
    """

    class Trigger(models.TextChoices):
        MANUAL = "manual", "manual"
        AUTOMATIC = "automatic", "automatic (rollback policy)"

    class Status(models.TextChoices):
        PENDING = "pending", "pending (next round)"
        APPLIED = "applied", "applied"
        SUPERSEDED = "superseded", "superseded by a newer request"

    training = models.ForeignKey("trainings.Training", on_delete=models.CASCADE, related_name="rollbacks")
    target = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="rollbacks_to")
    version = models.OneToOneField(
        ModelVersion,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="rollback",
        help_text="The version of origin rollback this request created (empty while pending).",
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.MANUAL)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    actor = models.CharField(max_length=150, blank=True)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["training", "created_at"]

    def __str__(self) -> str:
        return f"{self.trigger} rollback of {self.training_id} to v{self.target.number} ({self.status})"


class Blob(models.Model):
    """The registry row of one stored blob: the lock that writers and the garbage collector share.

    ``touched_at`` is the last time a writer stored or re-used the blob; a writer's row that names it is
    written within seconds of that, so the collector leaves blobs touched within the grace period alone.
    ``condemned_at`` is set by the transaction that found no row naming the blob; the file is removed after
    that transaction commits, by a second one that re-checks (under this row's lock) that no writer has
    touched it since. A writer that finds its blob condemned revives it and re-writes a missing file.
    """

    name = models.CharField(max_length=255, primary_key=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    touched_at = models.DateTimeField(db_index=True)
    condemned_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name
