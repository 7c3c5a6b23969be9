"""``TrainingConfiguration``: the validated description of a training (the seed's name and keys).

It is a plain frozen dataclass so it can cross boundaries (REST, ``manage.py start_training``, the
Python coordinator API). ``from_dict`` accepts JSON and reports every bad field at once; ``to_dict``
is what the ``Training.config`` column stores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from django.conf import settings

from fedsite.errors import ValidationFailed
from fedsite.parsers import json_check
from flcore.errors import ConfigError
from flcore.strategies import AggregationAlgorithm, NotEnoughUpdates, Strategy, build_strategy
from monitoring.anomalies import anomaly_policy_parse
from privacy.configuration import parse_privacy
from trainings.secagg_config import SecAggTrainingConfig, secure_aggregation_parse
from versioning.policy import rollback_parse
from versioning.retention import retention_parse

MODEL_TYPES = {"logreg": "logreg", "mlp": "mlp", "neural_network": "mlp"}
SELECTION_POLICIES = ("random", "reliability")
EVALUATION_DATASETS = ("digits", "mnist")
# The algorithms the coordinator can run end to end (flcore may know more than the server wires up).
SERVER_ALGORITHMS = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "krum",
    "multikrum",
    "median",
    "trimmed_mean",
    "norm_bounded",
    "fedbuff",
    "fedasync",
)


@dataclass(frozen=True)
class TrainingConfiguration:
    """What an operator asks for. Field names follow the seed; defaults suit sklearn's digits."""

    name: str
    algorithm: AggregationAlgorithm = AggregationAlgorithm.FEDAVG
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    privacy_budget: Any = None  # the seed's PrivacyBudget(total_epsilon, total_delta); folded into privacy
    privacy_level: str | None = None  # the seed's PrivacyLevel; folded into privacy
    model_type: str = "mlp"
    input_dim: int = 64
    num_classes: int = 10
    hidden_sizes: tuple[int, ...] = (64,)
    target_accuracy: float | None = None
    max_rounds: int = 100
    min_clients_per_round: int | None = None
    max_clients_per_round: int | None = None
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    round_timeout_seconds: float | None = None
    max_round_attempts: int | None = None
    selection: str = "random"
    evaluation_dataset: str | None = None
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    rollback: dict[str, Any] | None = None  # the automatic rollback policy (versioning/policy.py)
    retention: dict[str, Any] | None = None  # which versions keep their blobs (versioning/retention.py)
    anomaly: dict[str, Any] | None = None  # anomaly detection on updates (monitoring/anomalies.py)
    secure_aggregation: dict[str, Any] | None = None  # masked rounds (trainings/secagg_config.py)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> TrainingConfiguration:
        """Validate JSON-like input; raise ``ValidationFailed`` naming every bad field."""
        if not isinstance(data, dict):
            raise ValidationFailed("A training configuration must be a JSON object.")
        known = {f.name for f in fields(cls)}
        errors: dict[str, str] = {}
        for key, value in data.items():
            # NUL characters and lone surrogates cannot be stored; too deep a value is refused too.
            try:
                json_check(value, field=str(key))
            except ValidationFailed as exc:
                errors.update(exc.details)
        unknown = sorted(set(data) - known)
        for key in unknown:
            errors.setdefault(key, f"Unknown field. Known fields: {sorted(known)}.")
        values: dict[str, Any] = {}

        def take(
            name: str,
            kind: type,
            *,
            minimum: float | None = None,
            maximum: float | None = None,
            nullable: bool = False,
        ) -> None:
            if name not in data:
                return
            value = data[name]
            if value is None and nullable:
                values[name] = None
                return
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                errors[name] = f"Must be an integer. Found {value!r}."
                return
            if kind is float:
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    errors[name] = f"Must be a finite number. Found {value!r}."
                    return
                value = float(value)
            if kind is str and not isinstance(value, str):
                errors[name] = f"Must be a string. Found {value!r}."
                return
            if minimum is not None and value < minimum:
                errors[name] = f"Must be at least {minimum}. Found {value!r}."
                return
            if maximum is not None and value > maximum:
                errors[name] = f"Must be at most {maximum}. Found {value!r}."
                return
            values[name] = value

        if "name" not in data:
            errors["name"] = "Required."
        take("name", str)
        if isinstance(values.get("name"), str) and not 1 <= len(values["name"].strip()) <= 200:
            errors["name"] = "Must be 1 to 200 characters."
        if "algorithm" in data:
            try:
                values["algorithm"] = AggregationAlgorithm(data["algorithm"])
                if values["algorithm"].value not in SERVER_ALGORITHMS:
                    raise ValueError(values["algorithm"])
            except ValueError:
                errors["algorithm"] = (
                    f"Unknown algorithm {data['algorithm']!r}. Available: {list(SERVER_ALGORITHMS)}."
                )
        if "hyperparameters" in data and not isinstance(data["hyperparameters"], dict):
            errors["hyperparameters"] = "Must be a JSON object of the algorithm's hyperparameters."
        take("model_type", str)
        if "model_type" in values and values["model_type"] not in MODEL_TYPES:
            errors["model_type"] = f"Unknown model type. Available: {sorted(MODEL_TYPES)}."
        take("input_dim", int, minimum=1, maximum=10_000_000)
        take("num_classes", int, minimum=2, maximum=100_000)
        if "hidden_sizes" in data:
            hidden = data["hidden_sizes"]
            if not isinstance(hidden, list | tuple) or not all(
                isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 100_000 for h in hidden
            ):
                errors["hidden_sizes"] = f"Must be a list of positive integers. Found {hidden!r}."
            else:
                values["hidden_sizes"] = tuple(hidden)
        take("target_accuracy", float, minimum=0.0, maximum=1.0, nullable=True)
        take("max_rounds", int, minimum=1, maximum=1_000_000)
        take("min_clients_per_round", int, minimum=1, nullable=True)
        take("max_clients_per_round", int, minimum=1, nullable=True)
        take("local_epochs", int, minimum=1, maximum=10_000)
        take("batch_size", int, minimum=1, maximum=1_000_000)
        take("learning_rate", float, minimum=1e-12, maximum=1e3)
        take("round_timeout_seconds", float, minimum=1.0, maximum=7 * 24 * 3600, nullable=True)
        take("max_round_attempts", int, minimum=1, maximum=1000, nullable=True)
        take("selection", str)
        if "selection" in values and values["selection"] not in SELECTION_POLICIES:
            errors["selection"] = f"Must be one of {SELECTION_POLICIES}."
        take("evaluation_dataset", str, nullable=True)
        if values.get("evaluation_dataset") not in (None, *EVALUATION_DATASETS):
            errors["evaluation_dataset"] = f"Must be null or one of {list(EVALUATION_DATASETS)}."
        take("seed", int, minimum=0, maximum=2**63 - 1)
        if "metadata" in data:
            if not isinstance(data["metadata"], dict):
                errors["metadata"] = "Must be a JSON object."
            else:
                values["metadata"] = data["metadata"]

        model_type = MODEL_TYPES.get(values.get("model_type", "mlp"), "mlp")
        if model_type == "logreg" and "hidden_sizes" not in data:
            values["hidden_sizes"] = ()
        if model_type == "logreg" and values.get("hidden_sizes"):
            errors["hidden_sizes"] = "A logreg model has no hidden layers; omit hidden_sizes or pass []."
        if model_type == "mlp" and "hidden_sizes" in values and not values["hidden_sizes"]:
            errors["hidden_sizes"] = "An mlp needs at least one hidden layer."
        low = values.get("min_clients_per_round") or settings.FEDSITE_MIN_CLIENTS_PER_ROUND
        high = values.get("max_clients_per_round") or settings.FEDSITE_MAX_CLIENTS_PER_ROUND
        if "min_clients_per_round" not in errors and "max_clients_per_round" not in errors and low > high:
            errors["min_clients_per_round"] = (
                f"min_clients_per_round ({low}) is larger than max_clients_per_round ({high})."
            )
        algorithm = values.get("algorithm", AggregationAlgorithm.FEDAVG)
        privacy, privacy_errors = parse_privacy(
            data, algorithm=algorithm.value, default_level=settings.FEDSITE_DEFAULT_PRIVACY_LEVEL
        )
        errors.update(privacy_errors)
        values["privacy"] = privacy
        values["privacy_budget"] = None  # folded into ``privacy``: one source of truth
        values["privacy_level"] = None
        if "algorithm" not in errors and "hyperparameters" not in errors:
            try:
                strategy = build_strategy(algorithm.value, data.get("hyperparameters") or {})
                values["hyperparameters"] = strategy.hyperparameters()
                if "min_clients_per_round" not in errors:
                    strategy.check_num_updates(low)
            except NotEnoughUpdates as exc:
                errors["min_clients_per_round"] = (
                    f"{exc} Every round must be able to deliver at least that many updates; "
                    "raise min_clients_per_round or change the hyperparameters."
                )
            except ConfigError as exc:
                errors["hyperparameters"] = str(exc)
        if "rollback" in data:
            rollback, rollback_errors = rollback_parse(data["rollback"])
            errors.update(rollback_errors)
            if rollback and rollback["enabled"] and data.get("algorithm") in ("fedbuff", "fedasync"):
                errors["rollback"] = (
                    "An asynchronous training (fedbuff, fedasync) cannot use the rollback policy: its next "
                    "step is open before a round's metrics are known. Disable rollback or pick a "
                    "synchronous algorithm."
                )
            values["rollback"] = rollback
        if "retention" in data:
            retention, retention_errors = retention_parse(data["retention"])
            errors.update(retention_errors)
            values["retention"] = retention
        if "anomaly" in data:
            anomaly, anomaly_errors = anomaly_policy_parse(data["anomaly"])
            errors.update(anomaly_errors)
            values["anomaly"] = anomaly
        if "secure_aggregation" in data:
            secure, secure_errors = secure_aggregation_parse(
                data["secure_aggregation"], algorithm=algorithm.value, privacy=privacy
            )
            errors.update(secure_errors)
            values["secure_aggregation"] = secure
        if errors:
            raise ValidationFailed(
                "The training configuration is invalid: "
                + "; ".join(f"{key}: {message}" for key, message in errors.items()),
                details=errors,
            )
        if "model_type" in values:
            values["model_type"] = MODEL_TYPES[values["model_type"]]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data.get("privacy_level") is not None:
            data["privacy_level"] = str(data["privacy_level"])
        data["algorithm"] = self.algorithm.value
        data["hidden_sizes"] = list(self.hidden_sizes)
        return data

    # ------------------------------------------------------------------------------------------
    @property
    def min_clients(self) -> int:
        return self.min_clients_per_round or settings.FEDSITE_MIN_CLIENTS_PER_ROUND

    @property
    def max_clients(self) -> int:
        return max(self.max_clients_per_round or settings.FEDSITE_MAX_CLIENTS_PER_ROUND, self.min_clients)

    @property
    def round_timeout(self) -> float:
        return self.round_timeout_seconds or settings.FEDSITE_ROUND_TIMEOUT

    @property
    def round_attempts(self) -> int:
        return self.max_round_attempts or settings.FEDSITE_MAX_ROUND_ATTEMPTS

    def strategy(self) -> Strategy:
        """The validated aggregation strategy of this training."""
        return build_strategy(self.algorithm.value, self.hyperparameters)

    def secagg(self) -> SecAggTrainingConfig | None:
        """Secure aggregation of this training, or None for plain rounds."""
        if self.secure_aggregation is None:
            return None
        return SecAggTrainingConfig.from_dict(self.secure_aggregation)

    def model_spec_json(self) -> dict[str, Any]:
        return {
            "architecture": self.model_type,
            "input_dim": self.input_dim,
            "num_classes": self.num_classes,
            "hidden_sizes": list(self.hidden_sizes),
        }
