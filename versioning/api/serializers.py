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


class RetentionSectionSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The ``retention`` section of a training configuration (docs/versioning.md, "Retention"); validated by
    ``versioning.retention.retention_parse``."""

    keep_last = serializers.IntegerField(required=False, default=5, min_value=0)
    keep_every = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1)
    keep_best = serializers.BooleanField(required=False, default=True)
    metric = serializers.CharField(
        required=False, allow_null=True, default=None, help_text="null: the rollback metric, else accuracy"
    )
    update_blobs_hours = serializers.FloatField(
        required=False,
        allow_null=True,
        default=None,
        help_text="hours update blobs are kept after their round; null: FEDSITE_UPDATE_BLOB_RETENTION_HOURS",
    )
