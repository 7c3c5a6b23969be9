"""Central DP over the REST path: the server clips each agent's delta, sums them unweighted, adds Gaussian
noise of standard deviation z*C to the sum and divides by the expected number of agents; the round is
recorded in the ledger with its sampling probability."""

from __future__ import annotations

import json
from typing import Any

import dp_accounting
import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from dp_accounting import rdp

from fedsite.celery import app as celery_app
from flcore.parameters import ParameterSpec, to_bytes
from privacy.models import PrivacyBudget
from versioning.services import version_read_parameters


@pytest.fixture
def eager_celery():
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.mark.django_db
def test_central_dp_round_clips_sums_and_adds_calibrated_noise(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    agents = [make_agent() for _ in range(4)]
    z, clip = 0.8, 0.5
    training = make_training(
        model_type="logreg",
        input_dim=200,
        num_classes=10,
        min_clients_per_round=1,
        max_clients_per_round=4,
        max_rounds=5,
        privacy={"mode": "central", "epsilon": 50.0, "delta": 1e-5, "noise_multiplier": z, "clip_norm": clip},
    )
    budget = PrivacyBudget.objects.get(training=training)
    assert budget.expected_clients_per_round == 4
    spec = ParameterSpec.from_json(training.parameter_spec)
    base = version_read_parameters(training.current_version)
    rng = np.random.default_rng(0)
    deltas = []
    for index, (_, token) in enumerate(agents):
        poll = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
        assert poll.status_code == 200, poll.content  # q = 4/4: every eligible agent is sampled
        task = poll.json()
        assert "local_dp" not in task["config"]
        scale = 100.0 if index == 0 else 0.001  # one huge update must be clipped to C
        delta = {t.name: (rng.standard_normal(t.shape) * scale).astype(np.float32) for t in spec.tensors}
        deltas.append(delta)
        with django_capture_on_commit_callbacks(execute=True):
            upload = client.post(
                task["upload_url"],
                {
                    "update": SimpleUploadedFile("u", to_bytes(delta)),
                    "meta": json.dumps({"num_examples": 10 * (index + 1)}),
                },
                HTTP_AUTHORIZATION=f"Bearer {token}",
            )
        assert upload.status_code == 201, upload.content
    version = training.versions.get(number=1)
    new = version_read_parameters(version)

    def clipped(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        norm = np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in d.values()))
        factor = min(1.0, clip / norm)
        return {k: v.astype(np.float64) * factor for k, v in d.items()}

    clipped_sum = {k: sum(clipped(d)[k] for d in deltas) for k in base}
    residual = np.concatenate(
        [(new[k].astype(np.float64) - base[k] - clipped_sum[k] / 4).ravel() for k in base]
    )
    # the residual is the noise / m: N(0, (z C / m)^2) per coordinate, 2010 coordinates
    expected_std = z * clip / 4
    assert residual.std() == pytest.approx(expected_std, rel=0.1)
    assert abs(residual.mean()) < 4 * expected_std / np.sqrt(residual.size)
    # un-noised FedAvg would be dominated by the huge update: the server's step is bounded by C
    step = np.sqrt(sum(float(np.sum((new[k].astype(np.float64) - base[k]) ** 2)) for k in base))
    assert step < clip + 5 * expected_std * np.sqrt(residual.size)
    # the ledger has the round, composed by dp-accounting
    budget.refresh_from_db()
    entry = budget.ledger.get()
    assert entry.round_number == 1 and entry.sampling_probability == 1.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z))
    assert budget.spent_epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert version.metrics["privacy_epsilon_spent"] == pytest.approx(budget.spent_epsilon)
    assert "strategy_num_clipped" not in version.metrics  # an exact count is not DP: never published


@pytest.mark.django_db
def test_central_dp_uses_poisson_sampling_and_records_q(make_agent: Any, make_training: Any) -> None:
    for _ in range(10):
        make_agent()
    training = make_training(
        model_type="logreg",
        input_dim=4,
        num_classes=3,
        min_clients_per_round=1,
        max_clients_per_round=3,
        max_rounds=5,
        privacy={"mode": "central", "level": "low"},
    )
    round_ = training.rounds.get(number=1)
    assert round_.metrics["privacy_sampling_probability"] == pytest.approx(0.3)
    assert round_.metrics["privacy_eligible_agents"] == 10
    budget = PrivacyBudget.objects.get(training=training)
    assert budget.level == "low" and budget.epsilon == 8.0
    # the calibrated noise lets max_rounds rounds at q=0.3 fit in the budget and not many more
    event = dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(budget.noise_multiplier))
    accountant = rdp.RdpAccountant()
    accountant.compose(event, 5)
    assert accountant.get_epsilon(1e-5) <= 8.0 + 1e-6


@pytest.mark.django_db
def test_status_and_dashboard_show_the_budget(staff_client: Any, make_agent: Any, make_training: Any) -> None:
    make_agent(), make_agent()
    training = make_training(
        model_type="logreg",
        input_dim=4,
        num_classes=3,
        min_clients_per_round=1,
        max_clients_per_round=2,
        privacy={"mode": "central", "level": "medium"},
    )
    status = staff_client.get(f"/api/training/{training.pk}/status").json()
    assert status["privacy"]["epsilon"] == 3.0 and status["privacy"]["spent_epsilon"] == 0.0
    page = staff_client.get(f"/dashboard/trainings/{training.pk}/")
    assert page.status_code == 200 and b"Privacy budget (central DP)" in page.content
    plain = make_training(model_type="logreg", input_dim=4, num_classes=3)
    assert staff_client.get(f"/api/training/{plain.pk}/status").json()["privacy"] is None


@pytest.mark.django_db
def test_adaptive_clipping_moves_the_clip_norm_towards_the_quantile(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """Every update is far above the initial C, so the unclipped fraction is ~0 < 0.5 and C must grow by
    about exp(0.2 * 0.5) per round (Andrew et al. 2021); the next round clips with the stored C."""
    from flcore.strategies import ServerState
    from versioning.blobs import blob_read

    agents = [make_agent() for _ in range(20)]
    training = make_training(
        model_type="logreg",
        input_dim=4,
        num_classes=3,
        min_clients_per_round=1,
        max_clients_per_round=20,
        max_rounds=2,
        privacy={
            "mode": "central",
            "epsilon": 100.0,
            "noise_multiplier": 1.0,
            "clip_norm": 0.01,
            "adaptive_clipping": True,
        },
    )
    spec = ParameterSpec.from_json(training.parameter_spec)
    for round_number in (1, 2):
        for _, token in agents:
            task = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}").json()
            delta = {t.name: np.full(t.shape, 1.0, dtype=np.float32) for t in spec.tensors}
            with django_capture_on_commit_callbacks(execute=True):
                response = client.post(
                    task["upload_url"],
                    {
                        "update": SimpleUploadedFile("u", to_bytes(delta)),
                        "meta": json.dumps({"num_examples": 3}),
                    },
                    HTTP_AUTHORIZATION=f"Bearer {token}",
                )
            assert response.status_code == 201
        version = training.versions.get(number=round_number)
        state = ServerState.from_bytes(blob_read(version.state_blob_name), spec)
        clip_after = float(state.scalars["dp_clip_norm"])
        clip_used = version.metrics["strategy_dp_clip_norm"]
        assert clip_used == pytest.approx(0.01 * np.exp(0.1) ** (round_number - 1), rel=0.05)
        assert clip_after == pytest.approx(clip_used * np.exp(0.1), rel=0.05)


@pytest.mark.django_db
def test_adaptive_clipping_with_too_much_noise_for_the_count_is_refused(staff_client: Any) -> None:
    response = staff_client.post(
        "/api/training/start",
        {
            "name": "a",
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
            "max_clients_per_round": 5,
            "privacy": {
                "mode": "central",
                "epsilon": 5.0,
                "noise_multiplier": 2.0,
                "adaptive_clipping": True,
            },
        },
        content_type="application/json",
    )
    assert response.status_code == 400
    assert "expected_clients_per_round / 10" in response.json()["error"]["message"]
