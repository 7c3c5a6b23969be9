"""Request documentation of monitoring's part of a training configuration (validation is
``monitoring.anomalies.anomaly_policy_parse``, called by ``TrainingConfiguration.from_dict``)."""

from __future__ import annotations

from rest_framework import serializers

from monitoring.anomalies import ACTIONS, STATISTICS


class AnomalySectionSerializer(serializers.Serializer):
    """The ``anomaly`` block: detection on updates and what to do with flagged ones."""

    enabled = serializers.BooleanField(required=False, default=True)
    threshold = serializers.FloatField(
        required=False, help_text="robust z-score past which a statistic flags an update (default 3.5)"
    )
    thresholds = serializers.DictField(
        child=serializers.FloatField(allow_null=True),
        required=False,
        help_text=f"per statistic ({', '.join(STATISTICS)}); null: not scored",
    )
    action = serializers.ChoiceField(list(ACTIONS), required=False, help_text="exclude drops flagged updates")
    quarantine_after = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="flags in this training after which the agent is quarantined",
    )
