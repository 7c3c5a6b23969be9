"""Anomaly detection on updates, through the real upload and aggregation path.

Planted outliers are flagged by the statistic they distort and, when the policy says so, left out of the
aggregate (checked against a brute-force FedAvg of the kept updates); real clean rounds of honest digits
agents leave no flag; the z-scores equal a brute-force median/MAD computation.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from clients.models import Agent
from fedsite.errors import ValidationFailed
from flcore.parameters import ParameterSpec
from monitoring.analytics import robust_z_scores
from monitoring.models import Alert, AuditLog, UpdateStatistics
from monitoring.tests.federation import DIGITS_CONFIG, DigitsAgents
from trainings.configuration import TrainingConfiguration
from trainings.models import Task
from versioning.services import version_read_parameters

NUM_AGENTS = 8


@pytest.fixture(autouse=True)
def _thresholds(settings: Any) -> None:
    settings.FEDSITE_ANOMALY_DETECTION = True
    settings.FEDSITE_ANOMALY_THRESHOLD = 3.5
    settings.FEDSITE_ANOMALY_MIN_UPDATES = 5
    settings.FEDSITE_ANOMALY_MIN_SPREAD = 0.1
    settings.FEDSITE_ANOMALY_ACTION = "flag"


# --- robust z-scores -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_z_scores_match_a_brute_force_median_and_mad(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = [float(v) for v in rng.standard_normal(11 + seed)] + [40.0]

    median = statistics.median(values)
    mad = statistics.median([abs(v - median) for v in values])
    expected = [(v - median) / (1.4826 * mad) for v in values]

    assert robust_z_scores(values) == pytest.approx(expected, rel=1e-12)


def test_robust_z_scores_fall_back_to_the_mean_deviation_when_most_values_are_equal() -> None:
    values = [1.0] * 9 + [2.0]
    mean_deviation = 1.0 / 10
    assert robust_z_scores(values) == pytest.approx([0.0] * 9 + [1.0 / (1.2533 * mean_deviation)])
    assert robust_z_scores([3.0] * 6) == [0.0] * 6


def test_the_spread_floor_caps_scores_of_closely_agreeing_values() -> None:
    values = [0.95, 0.951, 0.949, 0.952, 0.948, 0.90]
    assert robust_z_scores(values)[-1] < -20  # MAD 0.0015: an ordinary difference looks extreme
    assert robust_z_scores(values, min_scale=0.1)[-1] == pytest.approx((0.90 - 0.9495) / 0.1)


# --- the configuration block ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"threshold": 0}, "anomaly.threshold"),
        ({"threshold": "high"}, "anomaly.threshold"),
        ({"action": "delete"}, "anomaly.action"),
        ({"quarantine_after": 0}, "anomaly.quarantine_after"),
        ({"quarantine_after": 2.5}, "anomaly.quarantine_after"),
        ({"thresholds": {"norm": 3}}, "anomaly.thresholds.norm"),
        ({"thresholds": {"cosine": -1}}, "anomaly.thresholds.cosine"),
        ({"colour": "red"}, "anomaly.colour"),
        ("exclude", "anomaly"),
    ],
)
def test_bad_anomaly_block_is_refused_naming_the_field(block: Any, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        TrainingConfiguration.from_dict({"name": "t", "anomaly": block})
    assert field in caught.value.details


@pytest.mark.django_db
def test_bad_anomaly_block_over_rest_is_a_400_naming_the_field(staff_client: Any) -> None:
    response = staff_client.post(
        "/api/training/start",
        {"name": "t", "anomaly": {"action": "exclude", "quarantine_after": -3}},
        content_type="application/json",
    )
    assert response.status_code == 400, response.content
    assert "anomaly.quarantine_after" in response.content.decode()


def test_good_anomaly_block_is_normalised() -> None:
    config = TrainingConfiguration.from_dict(
        {"name": "t", "anomaly": {"threshold": 3, "action": "exclude", "quarantine_after": 3}}
    )
    assert config.anomaly == {
        "enabled": True,
        "threshold": 3.0,
        "thresholds": {},
        "action": "exclude",
        "quarantine_after": 3,
    }
    assert TrainingConfiguration.from_dict(config.to_dict()).anomaly == config.anomaly


# --- planted outliers over the real path -----------------------------------------------------------------
def _planted(spec: ParameterSpec, *, attackers: dict[int, str], seed: int = 0):
    """Honest agents send a common direction plus small noise; attackers distort one statistic."""
    direction = {
        t.name: np.random.default_rng(99).standard_normal(t.shape).astype(np.float32) for t in spec.tensors
    }
    sent: dict[int, Any] = {}

    def make(index: int, base: Any) -> tuple[Any, int, float | None]:
        rng = np.random.default_rng([seed, index, len(sent)])
        delta = {
            k: 0.1 * v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in direction.items()
        }
        loss = 1.0 + 0.02 * float(rng.standard_normal())
        attack = attackers.get(index)
        if attack == "sign_flip":
            delta = {k: -v for k, v in delta.items()}
        elif attack == "scaling":
            delta = {k: 20 * v for k, v in delta.items()}
        elif attack == "loss":
            loss = 9.0
        sent[index] = delta
        return delta, 10 + index, loss

    return make, sent


def _training(make_training: Any, **overrides: Any) -> Any:
    return make_training(
        min_clients_per_round=NUM_AGENTS,
        max_clients_per_round=NUM_AGENTS,
        max_rounds=4,
        **overrides,
    )


def _flags(training: Any, round_number: int) -> dict[str, list[str]]:
    return {
        row.agent.agent_id: row.reasons
        for row in UpdateStatistics.objects.filter(training=training, round_number=round_number, flagged=True)
    }


@pytest.mark.django_db
def test_planted_outliers_are_flagged_by_the_statistic_they_distort(
    rest_round: Any, make_agent: Any, make_training: Any
) -> None:
    agents = [make_agent(f"a{i}") for i in range(NUM_AGENTS)]
    training = _training(make_training)
    spec = ParameterSpec.from_json(training.parameter_spec)
    clean, _ = _planted(spec, attackers={})
    rest_round(training, agents, clean)
    planted, _ = _planted(spec, attackers={0: "sign_flip", 1: "scaling", 2: "loss"}, seed=1)

    with CaptureQueriesContext(connection) as context:
        number = rest_round(training, agents, planted)

    assert number == 2
    writes = [q["sql"] for q in context.captured_queries if 'INTO "monitoring_updatestatistics"' in q["sql"]]
    assert len(writes) == 1, writes  # the round's rows in one statement
    flags = _flags(training, 2)
    assert flags == {"a0": ["cosine"], "a1": ["update_norm"], "a2": ["train_loss", "loss_jump"]}
    rows = {r.agent.agent_id: r for r in UpdateStatistics.objects.filter(training=training, round_number=2)}
    assert len(rows) == NUM_AGENTS
    assert rows["a0"].cosine < -0.9 < 0.9 < rows["a3"].cosine
    assert rows["a0"].action == UpdateStatistics.Action.FLAGGED  # the default action only flags
    norms = [r.update_norm for r in rows.values()]
    floor = 0.1 * statistics.median(norms)
    expected = robust_z_scores(norms, min_scale=floor)[list(rows).index("a3")]
    assert rows["a3"].scores["update_norm"] == pytest.approx(expected)
    alert = Alert.objects.get(kind=Alert.Kind.UPDATE_ANOMALY, training=training)
    assert alert.resolved_at is None and sorted(alert.details["flagged"]) == ["a0", "a1", "a2"]
    round_metrics = training.rounds.get(number=2).metrics
    assert round_metrics["anomaly_flagged"] == 3 and round_metrics["anomaly_excluded"] == 0
    assert round_metrics["num_agents_reporting"] == NUM_AGENTS

    # a clean round resolves the training's anomaly alert
    clean_again, _ = _planted(spec, attackers={}, seed=2)
    rest_round(training, agents, clean_again)
    assert _flags(training, 3) == {}
    alert.refresh_from_db()
    assert alert.resolved_at is not None and "Round 3" in alert.resolution


@pytest.mark.django_db
def test_cosine_is_to_the_previous_global_step_computed_by_brute_force(
    rest_round: Any, make_agent: Any, make_training: Any
) -> None:
    agents = [make_agent(f"a{i}") for i in range(NUM_AGENTS)]
    training = _training(make_training)
    spec = ParameterSpec.from_json(training.parameter_spec)
    first, _ = _planted(spec, attackers={})
    rest_round(training, agents, first)
    second, sent = _planted(spec, attackers={0: "sign_flip"}, seed=5)

    rest_round(training, agents, second)

    v0, v1 = (version_read_parameters(training.versions.get(number=n)) for n in (0, 1))
    step = np.concatenate([(v1[t.name].astype(np.float64) - v0[t.name]).ravel() for t in spec.tensors])
    for row in UpdateStatistics.objects.filter(training=training, round_number=2).select_related("agent"):
        index = int(row.agent.agent_id[1:])
        u = np.concatenate([sent[index][t.name].astype(np.float64).ravel() for t in spec.tensors])
        assert row.cosine == pytest.approx(
            float(u @ step / (np.linalg.norm(u) * np.linalg.norm(step))), abs=1e-5
        )
        assert row.update_norm == pytest.approx(float(np.linalg.norm(u)), rel=1e-6)
    assert (
        UpdateStatistics.objects.filter(training=training, round_number=1, cosine__isnull=False).count() == 0
    )


@pytest.mark.django_db
@pytest.mark.parametrize("algorithm", ["fedavg", "median"])
def test_exclude_drops_the_flagged_updates_before_the_strategy(
    rest_round: Any, make_agent: Any, make_training: Any, algorithm: str
) -> None:
    from flcore.strategies import build_strategy

    agents = [make_agent(f"a{i}") for i in range(NUM_AGENTS)]
    training = _training(make_training, algorithm=algorithm, anomaly={"action": "exclude"})
    spec = ParameterSpec.from_json(training.parameter_spec)
    clean, _ = _planted(spec, attackers={})
    rest_round(training, agents, clean)
    planted, sent = _planted(spec, attackers={0: "sign_flip", 1: "scaling"}, seed=3)

    rest_round(training, agents, planted)

    assert set(_flags(training, 2)) == {"a0", "a1"}
    actions = dict(
        UpdateStatistics.objects.filter(training=training, round_number=2).values_list(
            "agent__agent_id", "action"
        )
    )
    assert actions["a0"] == actions["a1"] == UpdateStatistics.Action.EXCLUDED
    assert actions["a2"] == UpdateStatistics.Action.NONE
    base = version_read_parameters(training.versions.get(number=1))
    kept = [i for i in range(NUM_AGENTS) if i not in (0, 1)]
    strategy = build_strategy(algorithm, {})
    expected, _, _ = strategy.aggregate(
        base, [sent[i] for i in kept], [10 + i for i in kept], strategy.init_state(spec)
    )
    served = version_read_parameters(training.versions.get(number=2))
    for name in expected:
        np.testing.assert_allclose(served[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    metrics = training.rounds.get(number=2).metrics
    assert metrics["anomaly_excluded"] == 2 and metrics["num_agents_reporting"] == NUM_AGENTS - 2


@pytest.mark.django_db
def test_quarantine_after_k_flags_is_audited_and_reversible_by_an_operator(
    rest_round: Any, staff_client: Any, make_agent: Any, make_training: Any
) -> None:
    agents = [make_agent(f"a{i}") for i in range(NUM_AGENTS)]
    training = make_training(
        min_clients_per_round=NUM_AGENTS - 1,
        max_clients_per_round=NUM_AGENTS,
        max_rounds=5,
        anomaly={"action": "flag", "quarantine_after": 2},
    )
    spec = ParameterSpec.from_json(training.parameter_spec)
    for seed, attackers in ((0, {}), (1, {0: "scaling"}), (2, {0: "scaling"})):
        make, _ = _planted(spec, attackers=attackers, seed=seed)
        rest_round(training, agents, make)

    a0 = Agent.objects.get(agent_id="a0")
    assert UpdateStatistics.objects.filter(training=training, agent=a0, flagged=True).count() == 2
    assert a0.status == Agent.Status.QUARANTINED
    assert AuditLog.objects.filter(action="agent.quarantine_anomalies", object_id=str(a0.pk)).exists()
    assert (
        AuditLog.objects.get(action="agent.quarantined", object_id=str(a0.pk)).actor
        == "system:anomaly-detector"
    )
    alert = Alert.objects.get(kind=Alert.Kind.AGENT_QUARANTINED, subject="agent:a0")
    assert alert.resolved_at is None
    training.refresh_from_db()
    assert not Task.objects.filter(round__training=training, round__number=4, agent=a0).exists()

    response = staff_client.post("/api/v1/agents/a0/activate/")

    assert response.status_code == 200, response.content
    a0.refresh_from_db()
    assert a0.status == Agent.Status.ACTIVE
    alert.refresh_from_db()
    assert alert.resolved_at is not None
    assert AuditLog.objects.filter(action="agent.active", object_id=str(a0.pk)).exists()


# --- real clean rounds ----------------------------------------------------------------------------------
@pytest.mark.django_db
def test_real_clean_rounds_of_honest_digits_agents_leave_no_flag(
    rest_round: Any, make_agent: Any, make_training: Any
) -> None:
    num_agents = 10
    agents = [make_agent(f"h{i:02d}") for i in range(num_agents)]
    training = make_training(
        **DIGITS_CONFIG, min_clients_per_round=num_agents, max_clients_per_round=num_agents, max_rounds=4
    )
    honest = DigitsAgents(num_agents)

    for _ in range(4):
        rest_round(training, agents, honest)

    rows = UpdateStatistics.objects.filter(training=training)
    assert rows.count() == 4 * num_agents
    assert rows.filter(flagged=True).count() == 0
    scored = rows.filter(round_number=3).first()
    assert set(scored.scores) == {"update_norm", "cosine", "train_loss", "loss_jump"}
    assert not Alert.objects.filter(kind=Alert.Kind.UPDATE_ANOMALY).exists()


# --- the endpoint ---------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_anomalies_endpoint_lists_flags_with_scores_staff_only(
    rest_round: Any, staff_client: Any, make_agent: Any, make_training: Any
) -> None:
    agents = [make_agent(f"a{i}") for i in range(NUM_AGENTS)]
    training = _training(make_training)
    spec = ParameterSpec.from_json(training.parameter_spec)
    rest_round(training, agents, _planted(spec, attackers={})[0])
    rest_round(training, agents, _planted(spec, attackers={1: "scaling"}, seed=4)[0])
    url = f"/api/v1/trainings/{training.pk}/anomalies"

    response = staff_client.get(url)

    assert response.status_code == 200, response.content
    body = response.json()
    assert [(u["round"], u["agent_id"], u["reasons"]) for u in body["updates"]] == [
        (2, "a1", ["update_norm"])
    ]
    assert body["updates"][0]["scores"]["update_norm"] > 3.5
    assert body["policy"]["action"] == "flag" and body["policy"]["thresholds"]["cosine"] == 3.5
    everything = staff_client.get(url + "?all=1&round=2").json()["updates"]
    assert len(everything) == NUM_AGENTS
    assert staff_client.get(url + "?round=zero").status_code == 400
    assert (
        staff_client.get("/api/v1/trainings/00000000-0000-0000-0000-000000000000/anomalies").status_code
        == 404
    )
    assert Client().get(url).status_code in (401, 403)
