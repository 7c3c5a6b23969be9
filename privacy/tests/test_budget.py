"""Privacy budgets: calibration, the ledger against dp-accounting directly, and the guard that stops a
training at exactly the right round (not one late) over the REST path."""

from __future__ import annotations

import json
from typing import Any

import dp_accounting
import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from dp_accounting import pld, rdp

from fedsite.celery import app as celery_app
from flcore.parameters import ParameterSpec, to_bytes
from privacy.accounting import calibrate_noise_multiplier, composed_epsilon, round_event, rounds_affordable
from privacy.models import PrivacyBudget
from trainings.models import Round, Training


@pytest.fixture
def eager_celery():
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def test_calibrated_noise_spends_the_budget_and_no_less_noise_would() -> None:
    z = calibrate_noise_multiplier(
        epsilon=2.0, delta=1e-5, rounds=30, sampling_probability=0.2, mechanism="gaussian", accountant="rdp"
    )
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(z)), 30
    )
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    assert accountant.get_epsilon(1e-5) <= 2.0 + 1e-6
    weaker = rdp.RdpAccountant()
    weaker.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(z * 0.98)), 30
        )
    )
    assert weaker.get_epsilon(1e-5) > 2.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_composition_of_heterogeneous_rounds_equals_dp_accounting(accountant: str) -> None:
    rounds = [(1.1, 0.1), (1.1, 0.25), (0.9, 0.5), (2.0, 1.0)]
    events = [
        round_event(mechanism="gaussian", noise_multiplier=z, sampling_probability=q) for z, q in rounds
    ]
    direct = (
        rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant(value_discretization_interval=1e-4)
    )
    for z, q in rounds:
        base = dp_accounting.GaussianDpEvent(z)
        direct.compose(base if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, base))
    assert composed_epsilon(events, delta=1e-6, accountant=accountant) == pytest.approx(
        direct.get_epsilon(1e-6), rel=1e-9
    )


def test_laplace_with_sampling_needs_pld() -> None:
    event = round_event(mechanism="laplace", noise_multiplier=2.0, sampling_probability=0.3)
    with pytest.raises(ValueError, match="pld"):
        composed_epsilon([event], delta=1e-5, accountant="rdp")
    assert composed_epsilon([event], delta=1e-5, accountant="pld") > 0


def test_rounds_affordable_is_the_largest_count_that_fits() -> None:
    event = round_event(mechanism="gaussian", noise_multiplier=1.0, sampling_probability=0.5)
    k = rounds_affordable([], event, epsilon=3.0, delta=1e-5, accountant="rdp")
    assert composed_epsilon([event] * k, delta=1e-5, accountant="rdp") <= 3.0
    assert composed_epsilon([event] * (k + 1), delta=1e-5, accountant="rdp") > 3.0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"privacy": {"mode": "central", "epsilon": 1.0}, "algorithm": "median"}, "privacy.mode"),
        (
            {"privacy": {"mode": "local", "mechanism": "laplace", "accountant": "rdp", "epsilon": 1.0}},
            "privacy.accountant",
        ),
        ({"privacy_level": "extreme"}, "privacy_level"),
        ({"privacy": {"mode": "local", "epsilon": -1}}, "epsilon"),
        (
            {
                "privacy_budget": {"total_epsilon": 1.0, "total_delta": 1e-5},
                "algorithm": "fedbuff",
                "hyperparameters": {"buffer_size": 2},
            },
            "privacy",
        ),
    ],
)
def test_bad_privacy_settings_are_400(staff_client: Any, body: dict[str, Any], field: str) -> None:
    response = staff_client.post(
        "/api/training/start",
        {"name": "p", "model_type": "logreg", "input_dim": 4, "num_classes": 3, **body},
        content_type="application/json",
    )
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["details"]


@pytest.mark.django_db
def test_seed_style_budget_and_level_are_accepted(staff_client: Any, make_agent: Any) -> None:
    for _ in range(4):
        make_agent()
    response = staff_client.post(
        "/api/training/start",
        {
            "name": "seed",
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
            "max_rounds": 10,
            "min_clients_per_round": 1,
            "max_clients_per_round": 2,
            "privacy_budget": {"total_epsilon": 5.0, "total_delta": 1e-5},
            "privacy": {"mode": "local"},
        },
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    training_id = response.json()["training_id"]
    report = staff_client.get(f"/api/trainings/{training_id}/privacy").json()
    assert report["budget"] == {"epsilon": 5.0, "delta": 1e-5}
    assert report["spent_epsilon"] == 0 and report["ledger"] == []
    assert report["rounds_affordable"] >= 10  # calibrated for max_rounds with q = 2/4


@pytest.mark.django_db
def test_guard_stops_at_exactly_the_last_affordable_round_over_rest(
    client: Any,
    staff_client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Local DP (agents add the noise) with a fixed noise multiplier: the ledger after each round equals
    dp-accounting's epsilon for those rounds, and the training ends with budget_exhausted after exactly the
    number of rounds the budget affords."""
    agents = [make_agent() for _ in range(4)]
    z, budget_epsilon = 2.4, 8.0
    # local DP: the server knows who takes part (no amplification, q = 1) and one agent's clipped update
    # moves by up to 2C against noise zC, so each round is a Gaussian event with multiplier z / 2
    event = dp_accounting.GaussianDpEvent(z / 2)
    expected_rounds = 0
    while True:
        accountant = rdp.RdpAccountant()
        accountant.compose(event, expected_rounds + 1)
        if accountant.get_epsilon(1e-5) > budget_epsilon:
            break
        expected_rounds += 1
    assert 1 <= expected_rounds < 30
    training = make_training(
        min_clients_per_round=1,
        max_clients_per_round=4,
        max_rounds=50,
        privacy={
            "mode": "local",
            "epsilon": budget_epsilon,
            "delta": 1e-5,
            "noise_multiplier": z,
            "clip_norm": 1.0,
        },
    )
    spec = ParameterSpec.from_json(training.parameter_spec)
    tokens = [token for _, token in agents]
    rounds_run = 0
    while True:
        training.refresh_from_db()
        if training.status != Training.Status.RUNNING:
            break
        for token in tokens:
            poll = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
            assert poll.status_code == 200, poll.content
            task = poll.json()
            assert task["config"]["local_dp"] == {
                "mechanism": "gaussian",
                "clip_norm": 1.0,
                "noise_multiplier": z,
            }
            delta = {t.name: np.full(t.shape, 0.01, dtype=np.float32) for t in spec.tensors}
            with django_capture_on_commit_callbacks(execute=True):
                upload = client.post(
                    task["upload_url"],
                    {
                        "update": SimpleUploadedFile("u", to_bytes(delta)),
                        "meta": json.dumps({"num_examples": 5}),
                    },
                    HTTP_AUTHORIZATION=f"Bearer {token}",
                )
            assert upload.status_code == 201, upload.content
        rounds_run += 1
        assert rounds_run <= expected_rounds, "the guard let a round overspend the budget"
    assert training.status == Training.Status.BUDGET_EXHAUSTED
    assert rounds_run == expected_rounds, training.stop_reason
    budget = PrivacyBudget.objects.get(training=training)
    accountant = rdp.RdpAccountant()
    accountant.compose(event, expected_rounds)
    assert budget.spent_epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert budget.spent_epsilon <= budget_epsilon
    report = staff_client.get(f"/api/trainings/{training.pk}/privacy").json()
    assert [row["round"] for row in report["ledger"]] == list(range(1, expected_rounds + 1))
    assert report["rounds_affordable"] == 0
    kinds = list(training.alerts.filter(kind="privacy_budget").values_list("severity", flat=True))
    assert "critical" in kinds and len(kinds) >= 2  # threshold alerts, then the stop
    assert Round.objects.get(training=training, number=expected_rounds + 1).status == Round.Status.CANCELLED


def test_grouping_repeated_rounds_gives_the_same_epsilon_as_composing_each() -> None:
    e = round_event(mechanism="gaussian", noise_multiplier=1.3, sampling_probability=0.2)
    f = round_event(mechanism="gaussian", noise_multiplier=0.9, sampling_probability=0.5)
    ledger = [e] * 20 + [f] * 3 + [e] * 5
    direct = rdp.RdpAccountant()
    for event in ledger:
        direct.compose(event)
    assert composed_epsilon(ledger, delta=1e-5, accountant="rdp") == pytest.approx(
        direct.get_epsilon(1e-5), rel=1e-9
    )
