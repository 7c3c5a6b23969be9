"""Private rounds sample agents the way the ledger says: Poisson sampling at q (checked statistically over
many draws, with bounds the right code misses with probability below 1e-6), and each released round is
recorded with that q and the event's multiplier (central: z; local: z / 2 with no amplification)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from scipy import stats

from fedsite.celery import app as celery_app
from flcore.parameters import ParameterSpec, to_bytes
from privacy.models import PrivacyBudget
from trainings import services
from trainings.models import Training

ALPHA = 1e-7  # per bound; two bounds, so the right code fails this file with probability < 1e-6
Z = 0.7


def _privacy(mode: str, noise_multiplier: float = Z) -> dict[str, Any]:
    return {
        "mode": mode,
        "epsilon": 1000.0,
        "delta": 1e-5,
        "noise_multiplier": noise_multiplier,
        "clip_norm": 0.5,
    }


@pytest.fixture
def eager_celery():
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def _chernoff_lower_threshold(pmf: np.ndarray, values: np.ndarray, draws: int, alpha: float) -> float:
    """Largest t with P(sum of ``draws`` i.i.d. copies of Y <= t) <= alpha, by the Chernoff bound
    P(sum Y <= t) <= exp(lambda t) E[exp(-lambda Y)]^draws, minimised over lambda > 0."""
    lambdas = np.geomspace(1e-4, 50.0, 4000)
    log_mgf = np.log(np.exp(-np.outer(lambdas, values)) @ pmf)  # log E[exp(-lambda Y)]
    # bound(t) <= alpha  <=>  lambda t + draws log_mgf <= log alpha for some lambda
    return float(np.max((np.log(alpha) - draws * log_mgf) / lambdas))


def _assert_binomial_draws(counts: list[int], n: int, q: float) -> None:
    """Assert ``counts`` look like i.i.d. Binomial(n, q) draws; each bound fails with probability ALPHA."""
    counts_array = np.array(counts)
    draws = len(counts)
    # 1. The total is Binomial(n * draws, q): selecting every eligible agent (n each time) is far outside.
    total = int(counts_array.sum())
    low, high = stats.binom.ppf(ALPHA / 2, n * draws, q), stats.binom.isf(ALPHA / 2, n * draws, q)
    assert low <= total <= high, (total, low, high, counts)
    # 2. Each draw varies like Binomial(n, q): a fixed-size sample of m agents (no spread) is refused.
    support = np.arange(n + 1)
    squared = (support - n * q) ** 2
    threshold = _chernoff_lower_threshold(stats.binom.pmf(support, n, q), squared, draws, ALPHA)
    assert threshold > 0
    assert float(((counts_array - n * q) ** 2).sum()) > threshold, (counts, threshold)


@pytest.mark.django_db
def test_central_dp_selection_is_a_poisson_sample_at_the_accounted_rate(
    make_agent: Any, make_training: Any
) -> None:
    n, expected, draws = 20, 5, 40
    for _ in range(n):
        make_agent()
    counts = []
    for _ in range(draws):  # a large noise multiplier only makes dp-accounting's budget check quicker
        training = make_training(
            min_clients_per_round=1, max_clients_per_round=expected, privacy=_privacy("central", 4.0)
        )
        round_ = training.rounds.get(number=1)
        q = round_.metrics["privacy_sampling_probability"]
        assert q == pytest.approx(expected / n)
        counts.append(round_.tasks.filter(attempt=1).count())
        services.training_stop(training_id=training.pk)
    _assert_binomial_draws(counts, n, q)


@pytest.mark.django_db
def test_a_redrawn_local_dp_round_is_a_fresh_poisson_sample_at_the_same_q(
    make_agent: Any, make_training: Any
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from trainings.models import Round

    n, expected, draws = 20, 5, 40
    for _ in range(n):
        make_agent()
    from clients.models import Agent

    counts: list[int] = []
    while len(counts) < draws:
        # Every agent shows life again: an agent whose task expired is not selected for a new training's
        # first round until it does (trainings.selectors.agents_selectable), and without this the agents
        # run out after a few trainings and the loop never collects its draws.
        Agent.objects.update(last_seen_at=timezone.now())
        training = make_training(
            min_clients_per_round=1,
            max_clients_per_round=expected,
            max_round_attempts=1000,
            privacy=_privacy("local", 4.0),
        )
        round_ = training.rounds.get(number=1)
        # every sampled agent misses the deadline: the round is re-drawn (an empty draw closes it)
        while round_.status == Round.Status.COLLECTING and len(counts) < draws:
            Round.objects.filter(pk=round_.pk).update(deadline=timezone.now() - timedelta(seconds=1))
            services.rounds_check_deadlines()
            round_.refresh_from_db()
            if round_.attempt > 1:
                counts.append(round_.tasks.filter(attempt=round_.attempt).count())
        services.training_stop(training_id=training.pk)
    _assert_binomial_draws(counts, n, expected / n)


@pytest.mark.django_db
@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_released_round_is_recorded_with_its_sampling_rate_and_multiplier(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
    mode: str,
) -> None:
    tokens = {agent.pk: token for agent, token in (make_agent() for _ in range(10))}
    with django_capture_on_commit_callbacks(execute=True):
        training = make_training(
            min_clients_per_round=1, max_clients_per_round=3, max_rounds=1, privacy=_privacy(mode)
        )
    spec = ParameterSpec.from_json(training.parameter_spec)
    delta = {t.name: np.full(t.shape, 0.01, dtype=np.float32) for t in spec.tensors}
    for task in training.rounds.get(number=1).tasks.all():
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(
                f"/api/v1/agent/tasks/{task.pk}/update",
                {"update": SimpleUploadedFile("u", to_bytes(delta)), "meta": json.dumps({"num_examples": 3})},
                HTTP_AUTHORIZATION=f"Bearer {tokens[task.agent_id]}",
            )
        assert response.status_code == 201, response.content
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED, training.stop_reason
    entry = PrivacyBudget.objects.get(training=training).ledger.get(round_number=1)
    if mode == "central":  # the server samples in secret: amplification at q = 3 / 10
        assert (entry.sampling_probability, entry.noise_multiplier) == (pytest.approx(0.3), Z)
    else:  # the server knows who took part (q = 1), and one agent's update moves by 2C against z C
        assert (entry.sampling_probability, entry.noise_multiplier) == (1.0, pytest.approx(Z / 2))
    assert training.versions.get(number=1).metrics["privacy_sampling_probability"] == pytest.approx(0.3)
