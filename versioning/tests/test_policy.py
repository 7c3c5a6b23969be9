"""The automatic rollback policy: its configuration field and its decisions after real rounds."""

from __future__ import annotations

from typing import Any

import pytest

from fedsite.errors import ValidationFailed
from monitoring.models import Alert, AuditLog
from trainings.configuration import TrainingConfiguration
from trainings.models import Training
from versioning.models import ModelVersion, Rollback
from versioning.policy import is_degraded

BASE = {"name": "t", "model_type": "logreg", "input_dim": 4, "num_classes": 3}


def test_degradation_is_relative_to_the_best_value() -> None:
    assert not is_degraded(0.76, 0.8, threshold=0.05, metric="accuracy")  # 5% of 0.8 is 0.04
    assert is_degraded(0.759, 0.8, threshold=0.05, metric="accuracy")
    assert not is_degraded(1.04, 1.0, threshold=0.05, metric="federated_loss")
    assert is_degraded(1.051, 1.0, threshold=0.05, metric="federated_loss")  # a loss degrades upwards
    assert not is_degraded(0.2, 1.0, threshold=0.05, metric="federated_loss")
    assert is_degraded(-1.1, -1.0, threshold=0.05, metric="score")  # |best| keeps the sign right


@pytest.mark.parametrize(
    ("rollback", "field"),
    [
        ("yes", "rollback"),
        ({"enabled": "yes"}, "rollback.enabled"),
        ({"enabled": True, "performance_threshold": 1.5}, "rollback.performance_threshold"),
        ({"enabled": True, "performance_threshold": -0.1}, "rollback.performance_threshold"),
        ({"enabled": True, "consecutive_degradations": 0}, "rollback.consecutive_degradations"),
        ({"enabled": True, "max_rollbacks": 2.5}, "rollback.max_rollbacks"),
        ({"enabled": True, "metric": ""}, "rollback.metric"),
        ({"enabled": True, "patience": 3}, "rollback.patience"),
    ],
)
def test_bad_rollback_settings_name_the_field(rollback: Any, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        TrainingConfiguration.from_dict({**BASE, "rollback": rollback})
    assert field in caught.value.details and field in caught.value.message


def test_asynchronous_trainings_cannot_use_the_policy() -> None:
    with pytest.raises(ValidationFailed) as caught:
        TrainingConfiguration.from_dict(
            {**BASE, "algorithm": "fedbuff", "rollback": {"enabled": True}, "hyperparameters": {}}
        )
    assert "rollback" in caught.value.details


def test_defaults_are_filled_in() -> None:
    config = TrainingConfiguration.from_dict({**BASE, "rollback": {"enabled": True}})
    assert config.rollback == {
        "enabled": True,
        "metric": "accuracy",
        "performance_threshold": 0.05,
        "consecutive_degradations": 3,
        "rollback_to_best": True,
        "max_rollbacks": 3,
    }
    assert TrainingConfiguration.from_dict(config.to_dict()) == config


@pytest.mark.django_db
def test_rest_refuses_a_bad_policy_with_the_field_named(staff_client: Any) -> None:
    response = staff_client.post(
        "/api/v1/trainings/",
        {**BASE, "start": False, "rollback": {"enabled": True, "consecutive_degradations": "3"}},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert "rollback.consecutive_degradations" in response.json()["error"]["details"]
    assert not Training.objects.exists()


def _policy_training(make_training: Any, **rollback: Any) -> Any:
    return make_training(
        min_clients_per_round=2,
        max_clients_per_round=2,
        max_rounds=10,
        rollback={
            "enabled": True,
            "metric": "federated_accuracy",
            "performance_threshold": 0.1,
            "consecutive_degradations": 2,
            "rollback_to_best": True,
            "max_rollbacks": 1,
            **rollback,
        },
    )


def _round(run_round: Any, training: Any, tokens: list[str], accuracy: float) -> None:
    run_round(training, tokens, [0.1, 0.2], eval_accuracy=accuracy, eval_num_examples=10)


@pytest.mark.django_db
def test_rolls_back_after_consecutive_degradations_then_stops_at_max_rollbacks(
    make_agent: Any, make_training: Any, run_round: Any
) -> None:
    tokens = [make_agent()[1], make_agent()[1]]
    training = _policy_training(make_training)
    _round(run_round, training, tokens, 0.6)
    _round(run_round, training, tokens, 0.8)  # the best: version 2
    _round(run_round, training, tokens, 0.5)  # degraded (more than 10% below 0.8)
    assert not Rollback.objects.exists()
    _round(run_round, training, tokens, 0.5)  # degraded twice in a row: back to the best
    rollback = Rollback.objects.get(training=training)
    assert rollback.trigger == Rollback.Trigger.AUTOMATIC and rollback.target.number == 2
    assert "federated_accuracy" in rollback.reason
    best = training.versions.get(number=2)
    assert training.current_version.origin == ModelVersion.Origin.ROLLBACK
    assert training.current_version.number == 5 and training.current_version.blob_sha256 == best.blob_sha256
    next_round = training.rounds.order_by("-number").first()
    assert next_round.number == 6 and next_round.base_version.blob_sha256 == best.blob_sha256
    assert AuditLog.objects.filter(action="training.rollback", actor="system:rollback-policy").exists()

    _round(run_round, training, tokens, 0.5)  # the count starts again after a rollback: 1
    assert training.status == Training.Status.RUNNING
    _round(run_round, training, tokens, 0.5)  # 2 again, and the one rollback allowed is used
    assert training.status == Training.Status.STOPPED
    assert "max_rollbacks (1)" in training.stop_reason
    assert Rollback.objects.filter(training=training).count() == 1
    assert Alert.objects.filter(training=training, kind=Alert.Kind.TRAINING_FAILED).exists()
    assert not training.rounds.filter(status__in=["waiting_for_agents", "collecting"]).exists()


@pytest.mark.django_db
def test_a_recovered_round_breaks_the_streak(make_agent: Any, make_training: Any, run_round: Any) -> None:
    tokens = [make_agent()[1], make_agent()[1]]
    training = _policy_training(make_training)
    for accuracy in (0.8, 0.5, 0.75, 0.5):  # 0.75 is within 10% of 0.8
        _round(run_round, training, tokens, accuracy)
    assert not Rollback.objects.exists()
    assert training.status == Training.Status.RUNNING


@pytest.mark.django_db
def test_a_loss_rolls_back_when_it_grows_to_the_version_before_the_streak(
    make_agent: Any, make_training: Any, run_round: Any
) -> None:
    tokens = [make_agent()[1], make_agent()[1]]
    training = _policy_training(make_training, metric="federated_loss", rollback_to_best=False)
    for loss in (0.5, 0.52, 0.9, 0.9):  # best v1; v2 within 10%; v3 and v4 degraded
        run_round(training, tokens, [0.1, 0.2], eval_loss=loss, eval_accuracy=0.5, eval_num_examples=10)
    rollback = Rollback.objects.get(training=training)
    assert rollback.target.number == 2  # the last version before the streak, not the best (v1)
