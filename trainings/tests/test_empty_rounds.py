"""Private rounds with no update, over REST: an empty Poisson sample is a release, accounted in the ledger
(central DP: noise only, McMahan et al. 2018; local DP: the version repeats its parent); a round whose
sampled agents all decline is re-drawn up to ``max_round_attempts`` and then ends the training with a
reason and an alert, never with an aggregation exception."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from monitoring.models import Alert
from privacy.models import PrivacyBudget
from trainings import services
from trainings.models import Round, Task, Training
from trainings.tests.agent_rest import next_task
from versioning.services import version_read_parameters

_BUDGET = {"epsilon": 1000.0, "delta": 1e-5, "noise_multiplier": 0.7, "clip_norm": 0.5}
PRIVACY = {mode: {"mode": mode, **_BUDGET} for mode in ("central", "local")}


def _decline(client: Any, token: str, task_id: str) -> Any:
    return client.post(
        f"/api/v1/agent/tasks/{task_id}/fail",
        {"reason": "this agent cannot apply local DP"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )


def _training_with_empty_first_sample(
    make_training: Any, capture: Any, mode: str, **overrides: Any
) -> Training:
    """Start private trainings until one's first Poisson sample is empty (q = 1/20 over 20 agents: each
    try is empty with probability 0.95^20 = 0.36, so 60 tries all fail with probability below 1e-11)."""
    for _ in range(60):
        with capture(execute=True):
            training = make_training(
                min_clients_per_round=1,
                max_clients_per_round=1,
                max_rounds=1,
                privacy=PRIVACY[mode],
                **overrides,
            )
        first = training.rounds.get(number=1)
        if not first.tasks.exists():
            training.refresh_from_db()
            return training
        services.training_stop(training_id=training.pk)
    raise AssertionError("no empty Poisson sample in 60 tries")


@pytest.mark.django_db
@pytest.mark.parametrize("mode", ["central", "local"])
def test_empty_poisson_sample_is_released_and_accounted(
    make_agent: Any, make_training: Any, eager_celery: Any, django_capture_on_commit_callbacks: Any, mode: str
) -> None:
    for _ in range(20):
        make_agent()
    training = _training_with_empty_first_sample(
        make_training, django_capture_on_commit_callbacks, mode, input_dim=200, num_classes=10
    )
    first = training.rounds.get(number=1)
    assert first.status == Round.Status.COMPLETED, first.error
    assert training.status == Training.Status.COMPLETED, training.stop_reason
    assert not training.alerts.filter(kind=Alert.Kind.AGGREGATION_FAILED).exists()
    alert = training.alerts.get(kind=Alert.Kind.ROUND_EMPTY, round_number=1)
    assert alert.severity == Alert.Severity.INFO
    # the sampling is what is accounted: the ledger holds the round at the q it was drawn with
    budget = PrivacyBudget.objects.get(training=training)
    entry = budget.ledger.get(round_number=1)
    assert first.metrics["privacy_sampling_probability"] == pytest.approx(1 / 20)
    assert entry.sampling_probability == pytest.approx(1 / 20 if mode == "central" else 1.0)
    assert budget.spent_epsilon > 0
    version = training.versions.get(number=1)
    assert version.metrics["num_agents_reporting"] == 0
    base = version_read_parameters(training.versions.get(number=0))
    new = version_read_parameters(version)
    residual = np.concatenate([(new[k].astype(np.float64) - base[k]).ravel() for k in base])
    if mode == "central":
        # noise only, over the fixed denominator m = 1: N(0, (z C)^2) per coordinate, 2010 coordinates
        assert residual.std() == pytest.approx(0.7 * 0.5, rel=0.1)
    else:
        assert not residual.any()  # local DP: nobody released anything, the version repeats its parent


@pytest.mark.django_db
@pytest.mark.parametrize("mode", ["central", "local"])
def test_round_whose_agents_all_decline_is_handled_then_fails_with_a_reason(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
    mode: str,
) -> None:
    """Local DP: re-drawn within the round (nothing was released). Central DP: released with noise only,
    as drawn (a re-draw would bias who is in the released sample); the next round is drawn as usual.
    Either way the second time in a row ends the training (max_round_attempts = 2) with the reasons."""
    tokens = [make_agent()[1] for _ in range(3)]
    training = make_training(
        min_clients_per_round=1,
        max_clients_per_round=3,  # q = 3/3: every agent is sampled, every attempt
        max_rounds=3,
        max_round_attempts=2,
        privacy=PRIVACY[mode],
    )
    for step in (1, 2):
        round_ = training.rounds.get(status=Round.Status.COLLECTING)
        assert (round_.number, round_.attempt) == ((1, step) if mode == "local" else (step, 1))
        for token in tokens:
            task = next_task(client, token)
            assert task.status_code == 200, task.content
            if mode == "local":
                assert "local_dp" in task.json()["config"]
            with django_capture_on_commit_callbacks(execute=True):
                response = _decline(client, token, task.json()["task_id"])
            assert response.status_code == 200, response.content
        if step == 1:
            warning = training.alerts.get(kind=Alert.Kind.ROUND_DECLINED)
            assert warning.severity == Alert.Severity.WARNING
            assert warning.details["declined"] == 3
            assert "cannot apply local DP" in warning.message
    round_.refresh_from_db()
    training.refresh_from_db()
    assert round_.status == Round.Status.FAILED
    assert "declined" in round_.error and "cannot apply local DP" in round_.error
    assert training.status == Training.Status.FAILED
    assert "declined" in training.stop_reason
    critical = training.alerts.get(kind=Alert.Kind.ROUND_DECLINED, severity=Alert.Severity.CRITICAL)
    assert "start a new training" in critical.message
    assert not training.alerts.filter(kind=Alert.Kind.AGGREGATION_FAILED).exists()
    assert not Task.objects.filter(round__training=training, status__in=list(Task.OPEN)).exists()
    ledger = list(PrivacyBudget.objects.get(training=training).ledger.values_list("round_number", flat=True))
    if mode == "local":
        assert ledger == []  # nothing was released, so nothing was accounted
    else:
        assert ledger == [1]  # round 1 was released (noise only) and accounted; round 2 was not
        first = training.versions.get(number=1)
        assert first.metrics["num_agents_reporting"] == 0
        base = version_read_parameters(training.versions.get(number=0))
        assert any((version_read_parameters(first)[k] != base[k]).any() for k in base)  # the noise


@pytest.mark.django_db
def test_local_dp_round_with_some_declines_aggregates_the_rest(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile

    from flcore.parameters import ParameterSpec, to_bytes

    (_, t1), (_, t2) = make_agent(), make_agent()
    training = make_training(
        min_clients_per_round=2, max_clients_per_round=2, max_rounds=1, privacy=PRIVACY["local"]
    )
    task1 = next_task(client, t1).json()
    with django_capture_on_commit_callbacks(execute=True):
        assert _decline(client, t1, task1["task_id"]).status_code == 200
    task2 = next_task(client, t2).json()
    spec = ParameterSpec.from_json(training.parameter_spec)
    delta = {t.name: np.full(t.shape, 0.01, dtype=np.float32) for t in spec.tensors}
    with django_capture_on_commit_callbacks(execute=True):
        upload = client.post(
            task2["upload_url"],
            {"update": SimpleUploadedFile("u", to_bytes(delta)), "meta": '{"num_examples": 5}'},
            HTTP_AUTHORIZATION=f"Bearer {t2}",
        )
    assert upload.status_code == 201, upload.content
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED, training.stop_reason
    assert training.versions.get(number=1).metrics["num_agents_reporting"] == 1
    assert not training.alerts.filter(kind=Alert.Kind.ROUND_DECLINED).exists()
