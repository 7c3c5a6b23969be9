"""Acceptance: a central-DP training on digits with 20 agents runs to its budget and stops exactly there,
and the privacy API shows spent epsilon equal to dp-accounting's for the same events."""

from __future__ import annotations

import json
from typing import Any

import dp_accounting
import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from dp_accounting import rdp

from fedsite.celery import app as celery_app
from flcore.data import client_split
from flcore.models import ModelSpec, build_model
from flcore.parameters import from_bytes, subtract, to_bytes
from flcore.training import sgd_fit
from privacy.models import PrivacyBudget
from trainings.models import Training

NUM_AGENTS = 20


@pytest.fixture
def eager_celery():
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.mark.django_db
def test_central_dp_digits_training_stops_exactly_at_its_budget(
    client: Any,
    staff_client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    agents = [make_agent(f"dp-agent-{i:02d}") for i in range(NUM_AGENTS)]
    z, budget_epsilon, expected_per_round = 2.0, 4.0, 10  # about 8 rounds fit
    training = make_training(
        name="central dp digits",
        model_type="logreg",
        input_dim=64,
        num_classes=10,
        max_rounds=100,
        min_clients_per_round=1,
        max_clients_per_round=expected_per_round,
        local_epochs=2,
        batch_size=16,
        learning_rate=0.2,
        evaluation_dataset="digits",
        privacy={
            "mode": "central",
            "epsilon": budget_epsilon,
            "delta": 1e-5,
            "noise_multiplier": z,
            "clip_norm": 1.0,
        },
    )
    model = build_model(ModelSpec.from_json(training.model_spec))
    data = {
        agent.agent_id: client_split("digits", num_clients=NUM_AGENTS, client_index=i, scheme="iid", seed=0)
        for i, (agent, _) in enumerate(agents)
    }
    rounds = 0
    while True:
        training.refresh_from_db()
        if training.status != Training.Status.RUNNING:
            break
        rounds += 1
        assert rounds <= 100
        for agent, token in agents:
            poll = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
            if poll.status_code == 204:  # not sampled this round
                continue
            task = poll.json()
            download = client.get(task["model"]["url"], HTTP_AUTHORIZATION=f"Bearer {token}")
            params = from_bytes(b"".join(download.streaming_content), max_bytes=10**7)
            x, y, _, _ = data[agent.agent_id]
            fit = sgd_fit(
                model,
                params,
                x,
                y,
                epochs=2,
                batch_size=16,
                learning_rate=0.2,
                rng=np.random.default_rng(task["config"]["seed"]),
            )
            delta = subtract(fit.parameters, params)
            with django_capture_on_commit_callbacks(execute=True):
                upload = client.post(
                    task["upload_url"],
                    {
                        "update": SimpleUploadedFile("u", to_bytes(delta)),
                        "meta": json.dumps({"num_examples": fit.num_examples}),
                    },
                    HTTP_AUTHORIZATION=f"Bearer {token}",
                )
            assert upload.status_code == 201, upload.content
    assert training.status == Training.Status.BUDGET_EXHAUSTED, training.stop_reason
    budget = PrivacyBudget.objects.get(training=training)
    ledger = list(budget.ledger.order_by("round_number"))
    assert len(ledger) >= 3
    assert [entry.round_number for entry in ledger] == list(range(1, len(ledger) + 1))
    assert {entry.sampling_probability for entry in ledger} == {expected_per_round / NUM_AGENTS}
    # dp-accounting on the same events: the spend after the last round fits, one more round would not
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, len(ledger))
    spent = accountant.get_epsilon(1e-5)
    accountant.compose(event)
    assert spent <= budget_epsilon < accountant.get_epsilon(1e-5)
    report = staff_client.get(f"/api/trainings/{training.pk}/privacy").json()
    assert report["spent_epsilon"] == pytest.approx(spent, rel=1e-9)
    assert report["remaining_epsilon"] == pytest.approx(budget_epsilon - spent, rel=1e-9)
    assert report["rounds_affordable"] == 0
    assert training.versions.count() == len(ledger) + 1  # one released (noised) version per accounted round
