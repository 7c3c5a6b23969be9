"""Agents (the machines that hold private data) and the keys that let them enrol themselves.

Invariants: a token is stored only as its sha256 (``token_hash``); the clear token is shown once, at
creation. ``agent_id`` is the agent's public name, unique and stable.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

# \A and \Z, not ^ and $: "$" also matches before a trailing newline, so "abc\n" would pass for "abc".
AGENT_ID_PATTERN = r"\A[A-Za-z0-9_.-]{1,64}\Z"
agent_id_validator = RegexValidator(
    AGENT_ID_PATTERN, "An agent id is 1 to 64 characters from letters, digits, '_', '.' and '-'."
)


class Agent(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "active"
        QUARANTINED = "quarantined", "quarantined"
        DISABLED = "disabled", "disabled"

    class EnrolledVia(models.TextChoices):
        OPERATOR = "operator", "operator-issued token"
        ENROLLMENT_KEY = "enrollment_key", "self-enrolment with a key"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent_id = models.CharField(max_length=64, unique=True, validators=[agent_id_validator])
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_prefix = models.CharField(
        max_length=12, editable=False, help_text="First characters, to tell tokens apart."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    state = models.CharField(
        max_length=16, default="idle", help_text="What the agent last said it was doing."
    )
    capabilities = models.JSONField(default=dict, blank=True)
    enrolled_via = models.CharField(max_length=16, choices=EnrolledVia.choices, default=EnrolledVia.OPERATOR)
    last_seen_at = models.DateTimeField(null=True, blank=True, db_index=True)
    identity_public_key = models.CharField(
        max_length=64,
        blank=True,
        editable=False,
        help_text="Base64 Ed25519 public key the agent signs its secure-aggregation keys with; set once.",
    )
    identity_key_registered_at = models.DateTimeField(null=True, blank=True, editable=False)
    tasks_completed = models.PositiveIntegerField(default=0)
    tasks_failed = models.PositiveIntegerField(default=0)
    tasks_expired = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["agent_id"]

    def __str__(self) -> str:
        return self.agent_id

    @property
    def reliability(self) -> float:
        """Share of assigned tasks completed, with a Beta(1, 1) prior so a new agent scores 0.5."""
        done = self.tasks_completed
        total = done + self.tasks_failed + self.tasks_expired
        return (done + 1) / (total + 2)


class EnrollmentKey(models.Model):
    """A secret an operator hands out so agents can enrol themselves (stored hashed)."""

    label = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(max_length=12, editable=False)
    max_uses = models.PositiveIntegerField(null=True, blank=True, help_text="Empty means unlimited.")
    uses = models.PositiveIntegerField(default=0)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.label} ({self.key_prefix}…)"
