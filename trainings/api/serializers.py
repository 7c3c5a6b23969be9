"""Serializers for the operator API (read shapes only; writes go through services)."""

from __future__ import annotations

from rest_framework import serializers

from monitoring.api.serializers import AnomalySectionSerializer
from trainings.configuration import SERVER_ALGORITHMS
from trainings.models import Round, Training
from versioning.api.serializers import RetentionSectionSerializer, RollbackSectionSerializer


class TrainingSerializer(serializers.ModelSerializer):
    current_version_number = serializers.IntegerField(
        source="current_version.number", read_only=True, default=None
    )

    class Meta:
        model = Training
        fields = [
            "id",
            "name",
            "algorithm",
            "status",
            "config",
            "model_spec",
            "current_round",
            "current_version_number",
            "best_accuracy",
            "stop_reason",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class RoundSerializer(serializers.ModelSerializer):
    base_version_number = serializers.IntegerField(source="base_version.number", read_only=True)
    tasks = serializers.SerializerMethodField()

    class Meta:
        model = Round
        fields = [
            "id",
            "training",
            "number",
            "status",
            "attempt",
            "base_version_number",
            "deadline",
            "opened_at",
            "closed_at",
            "completed_at",
            "metrics",
            "error",
            "tasks",
        ]
        read_only_fields = fields

    def get_tasks(self, round_: Round) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in round_.tasks.values_list("status", flat=True):
            counts[status] = counts.get(status, 0) + 1
        return counts


PRIVACY_LEVEL_CHOICES = ("none", "low", "medium", "high")


class PrivacySectionSerializer(serializers.Serializer):
    """The ``privacy`` section (docs/privacy.md); validated by ``privacy.configuration.parse_privacy``."""

    mode = serializers.ChoiceField(["central", "local"], required=False)
    level = serializers.ChoiceField(PRIVACY_LEVEL_CHOICES, required=False)
    epsilon = serializers.FloatField(required=False, help_text="total epsilon of the training's budget")
    delta = serializers.FloatField(required=False, help_text="total delta of the training's budget")
    noise_multiplier = serializers.FloatField(required=False)
    clip_norm = serializers.FloatField(required=False)
    mechanism = serializers.ChoiceField(["gaussian", "laplace"], required=False)
    accountant = serializers.ChoiceField(["rdp", "pld"], required=False)
    population = serializers.IntegerField(required=False)
    adaptive_clipping = serializers.BooleanField(required=False)
    target_quantile = serializers.FloatField(required=False)
    clip_learning_rate = serializers.FloatField(required=False)


class PrivacyBudgetSerializer(serializers.Serializer):
    """The seed's ``PrivacyBudget``."""

    total_epsilon = serializers.FloatField()
    total_delta = serializers.FloatField()


class SecureAggregationSectionSerializer(serializers.Serializer):
    """The ``secure_aggregation`` section (docs/secure-aggregation.md); validated by
    ``trainings.secagg_config.secure_aggregation_parse``."""

    protocol = serializers.ChoiceField(["secagg+", "secagg"], required=False, default="secagg+")
    clip_norm = serializers.FloatField(help_text="L2 norm every agent clips its delta to")
    threshold = serializers.FloatField(
        required=False, allow_null=True, help_text="shares per neighbourhood: an integer >= 2, a fraction"
    )
    neighbours = serializers.IntegerField(required=False, allow_null=True, help_text="secagg+: even degree")
    bits = serializers.IntegerField(required=False, default=32)
    weight_cap = serializers.IntegerField(required=False, default=1000)
    phase_timeout_seconds = serializers.FloatField(required=False, default=60)


class TrainingConfigurationSerializer(serializers.Serializer):
    """Documents the request body; validation itself is ``TrainingConfiguration.from_dict``.

    ``trainings/tests/test_openapi.py`` checks that these fields are exactly the configuration's fields
    plus ``start``, so the schema cannot fall behind the code.
    """

    name = serializers.CharField(max_length=200)
    algorithm = serializers.ChoiceField(list(SERVER_ALGORITHMS), required=False, default="fedavg")
    hyperparameters = serializers.DictField(
        required=False, help_text="the algorithm's hyperparameters (docs/strategies.md); errors name the key"
    )
    privacy = PrivacySectionSerializer(required=False, allow_null=True)
    privacy_budget = PrivacyBudgetSerializer(required=False, allow_null=True)
    privacy_level = serializers.ChoiceField(PRIVACY_LEVEL_CHOICES, required=False, allow_null=True)
    start = serializers.BooleanField(
        required=False, default=True, help_text="start at once (default) or create it pending"
    )
    model_type = serializers.ChoiceField(["logreg", "mlp", "neural_network"], required=False)
    input_dim = serializers.IntegerField(required=False)
    num_classes = serializers.IntegerField(required=False)
    hidden_sizes = serializers.ListField(child=serializers.IntegerField(), required=False)
    target_accuracy = serializers.FloatField(required=False, allow_null=True)
    max_rounds = serializers.IntegerField(required=False)
    min_clients_per_round = serializers.IntegerField(required=False, allow_null=True)
    max_clients_per_round = serializers.IntegerField(required=False, allow_null=True)
    local_epochs = serializers.IntegerField(required=False)
    batch_size = serializers.IntegerField(required=False)
    learning_rate = serializers.FloatField(required=False)
    round_timeout_seconds = serializers.FloatField(required=False, allow_null=True)
    max_round_attempts = serializers.IntegerField(required=False, allow_null=True)
    selection = serializers.ChoiceField(["random", "reliability"], required=False)
    evaluation_dataset = serializers.ChoiceField(["digits", "mnist"], required=False, allow_null=True)
    seed = serializers.IntegerField(required=False)
    metadata = serializers.DictField(required=False)
    rollback = RollbackSectionSerializer(required=False, allow_null=True)
    retention = RetentionSectionSerializer(required=False, allow_null=True)
    anomaly = AnomalySectionSerializer(required=False, allow_null=True)
    secure_aggregation = SecureAggregationSectionSerializer(required=False, allow_null=True)
