"""Documentation shapes for the versioning parts of other apps' requests (validation is in services)."""

from __future__ import annotations

from rest_framework import serializers


class RollbackSectionSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The ``rollback`` section of a training configuration (docs/versioning.md); validated by
    ``versioning.policy.rollback_parse``."""

    enabled = serializers.BooleanField(required=False, default=False)
    metric = serializers.CharField(required=False, default="accuracy", help_text="a round metric's name")
    performance_threshold = serializers.FloatField(
        required=False, default=0.05, help_text="relative degradation from the best value, in [0, 1)"
    )
    consecutive_degradations = serializers.IntegerField(required=False, default=3, min_value=1)
    rollback_to_best = serializers.BooleanField(required=False, default=True)
    max_rollbacks = serializers.IntegerField(required=False, default=3, min_value=0)
