"""Every synchronous aggregation rule trains through the REST path and the Celery aggregation task.

The server's result after two rounds (streaming or chunked combination from stored blobs, server optimizer
state persisted with each version and read back for the next round) must equal flcore's in-process
``Strategy.aggregate`` run on the same deltas.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from flcore.parameters import ParameterSpec, to_bytes
from flcore.strategies import build_strategy
from trainings.models import Round, Training
from versioning.services import version_read_parameters

CASES: list[tuple[str, dict[str, Any]]] = [
    ("fedavg", {}),
    ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    ("fedprox", {"proximal_mu": 0.1}),
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
    ("krum", {"num_malicious": 1}),
    ("multikrum", {"num_malicious": 1, "num_selected": 3}),
    ("median", {}),
    ("trimmed_mean", {"trim_fraction": 0.2}),
    ("norm_bounded", {"clip_norm": 0.5}),
    ("norm_bounded", {"clip_norm": 0.5, "inner": "median"}),
]
NUM_AGENTS = 5


@pytest.fixture(params=["in_process", "split"])
def aggregation_mode(request: Any, settings: Any) -> str:
    """Run each rule both in one process and split into coordinate chunks (Celery chords)."""
    settings.FEDSITE_CHUNKED_AGGREGATION_BYTES = 0 if request.param == "split" else 10**12
    return str(request.param)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("algorithm", "hyperparameters"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)]
)
def test_rule_over_rest_matches_in_process_aggregation(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
    algorithm: str,
    hyperparameters: dict[str, Any],
    aggregation_mode: str,
) -> None:
    agents = [make_agent() for _ in range(NUM_AGENTS)]
    training = make_training(
        algorithm=algorithm,
        hyperparameters=hyperparameters,
        min_clients_per_round=NUM_AGENTS,
        max_clients_per_round=NUM_AGENTS,
        max_rounds=2,
    )
    strategy = build_strategy(algorithm, hyperparameters)
    spec = ParameterSpec.from_json(training.parameter_spec)
    expected = version_read_parameters(training.current_version)
    state = strategy.init_state(spec)
    rng = np.random.default_rng(42)
    for round_number in (1, 2):
        deltas, sizes = [], []
        for index, (_agent, token) in enumerate(agents):
            response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
            assert response.status_code == 200, response.content
            task = response.json()
            assert task["round"] == round_number
            if algorithm == "fedprox":
                assert task["config"]["proximal_mu"] == pytest.approx(0.1)
            scale = 10.0 if index == 0 else 0.3  # agent 0 sends an outlier
            delta = {t.name: (rng.standard_normal(t.shape) * scale).astype(np.float32) for t in spec.tensors}
            deltas.append(delta)
            sizes.append(10 + index)
            with django_capture_on_commit_callbacks(execute=True):
                upload = client.post(
                    task["upload_url"],
                    {
                        "update": SimpleUploadedFile("u", to_bytes(delta)),
                        "meta": json.dumps({"num_examples": 10 + index}),
                    },
                    HTTP_AUTHORIZATION=f"Bearer {token}",
                )
            assert upload.status_code == 201, upload.content
        expected, state, _ = strategy.aggregate(expected, deltas, sizes, state)
        training.refresh_from_db()
        assert training.rounds.get(number=round_number).status == Round.Status.COMPLETED
        served = version_read_parameters(training.versions.get(number=round_number))
        for name in expected:
            np.testing.assert_allclose(served[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED
    last = training.rounds.get(number=2).metrics
    split = aggregation_mode == "split" and not build_strategy(algorithm, hyperparameters).streaming
    assert ("strategy_num_chunks" in last) == split


@pytest.mark.django_db
def test_krum_training_needs_enough_agents_per_round(staff_client: Any) -> None:
    response = staff_client.post(
        "/api/training/start",
        {
            "name": "k",
            "algorithm": "krum",
            "hyperparameters": {"num_malicious": 2},
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
            "min_clients_per_round": 5,
            "max_clients_per_round": 9,
        },
        content_type="application/json",
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "min_clients_per_round" in error["details"] and "2f + 3" in error["message"].replace("2*f", "2f")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("algorithm", "hyperparameters", "field"),
    [
        ("fedadam", {"beta_2": 1.5}, "beta_2"),
        ("trimmed_mean", {}, "trim_fraction"),
        ("fedavgm", {"momentum": 0.9}, "momentum"),
        ("norm_bounded", {"clip_norm": -1}, "clip_norm"),
    ],
)
def test_bad_hyperparameters_are_400_naming_the_field(
    staff_client: Any, algorithm: str, hyperparameters: dict[str, Any], field: str
) -> None:
    response = staff_client.post(
        "/api/training/start",
        {
            "name": "h",
            "algorithm": algorithm,
            "hyperparameters": hyperparameters,
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
        },
        content_type="application/json",
    )
    assert response.status_code == 400
    assert field in response.json()["error"]["details"]["hyperparameters"]
