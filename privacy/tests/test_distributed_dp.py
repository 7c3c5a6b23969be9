"""Distributed DP (the Skellam mechanism): configuration, accounting in dp-accounting's RDP accountant, the
budget and its ledger, the guard that never opens an overspending round, and validate_privacy's section."""

from __future__ import annotations

import io
import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from django.core.management import CommandError, call_command
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant

from flcore.dp.skellam import DEFAULT_BETA, SkellamParameters, aggregate_coordinate_bound, skellam_rdp
from privacy.accounting import (
    AccountingError,
    RdpAccountant,
    SkellamDpEvent,
    calibrate_skellam,
    calibrate_skellam_mu,
    composed_epsilon,
    overflow_stddevs,
    round_event,
    rounds_affordable,
    skellam_epsilon,
    skellam_round_event,
)
from privacy.configuration import parse_privacy
from privacy.models import PrivacyBudget
from privacy.selectors import privacy_report
from privacy.services import budget_allows, budget_create, budget_next_event, ledger_record
from privacy.validation import check_distributed, noise_switched_off
from trainings.models import Round, Training

SECURE = {"secure_aggregation": {"protocol": "secagg+"}}
PARAMETERS = SkellamParameters(clip_norm=1.0, scale=50.0, agent_mu=40_000.0, bits=20, dimension=500)


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------
def test_distributed_settings_are_normalised() -> None:
    data = {
        "min_clients_per_round": 4,
        "privacy": {"mechanism": "distributed_skellam", "epsilon": 2.0, "clip_norm": 0.5, "bits": 24},
        **SECURE,
    }

    settings_, errors = parse_privacy(data, algorithm="fedavg", default_level="none")

    assert errors == {}
    assert settings_ is not None
    assert (settings_["mode"], settings_["mechanism"], settings_["accountant"]) == (
        "distributed",
        "skellam",
        "rdp",
    )
    assert (settings_["epsilon"], settings_["delta"], settings_["clip_norm"]) == (2.0, 1e-5, 0.5)
    assert (settings_["bits"], settings_["min_agents"], settings_["rounding_beta"]) == (24, 4, DEFAULT_BETA)


def test_a_level_works_for_distributed_dp() -> None:
    settings_, errors = parse_privacy(
        {"privacy": {"mode": "distributed", "level": "medium", "min_agents": 3}, **SECURE},
        algorithm="fedprox",
        default_level="none",
    )

    assert errors == {}
    assert settings_ is not None and settings_["epsilon"] == 3.0 and settings_["min_agents"] == 3


@pytest.mark.parametrize(
    ("section", "extra", "algorithm", "field"),
    [
        ({"mechanism": "distributed_skellam", "epsilon": 1.0}, {}, "fedavg", "privacy.mode"),  # no SecAgg
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "mode": "central"},
            SECURE,
            "fedavg",
            "privacy.mode",
        ),
        ({"mechanism": "distributed_skellam", "epsilon": 1.0}, SECURE, "krum", "privacy.mode"),
        ({"mechanism": "distributed_skellam", "epsilon": 1.0, "bits": 40}, SECURE, "fedavg", "privacy.bits"),
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "bits": 16.5},
            SECURE,
            "fedavg",
            "privacy.bits",
        ),
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "min_agents": 0},
            SECURE,
            "fedavg",
            "privacy.min_agents",
        ),
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "rounding_beta": 1.5},
            SECURE,
            "fedavg",
            "privacy.rounding_beta",
        ),
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "accountant": "pld"},
            SECURE,
            "fedavg",
            "privacy.accountant",
        ),
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "noise_multiplier": 2.0},
            SECURE,
            "fedavg",
            "privacy.noise_multiplier",
        ),
        (
            {"mode": "distributed", "mechanism": "gaussian", "epsilon": 1.0},
            SECURE,
            "fedavg",
            "privacy.mechanism",
        ),
        ({"mode": "central", "epsilon": 1.0, "bits": 20}, {}, "fedavg", "privacy.bits"),
        (
            {"mechanism": "distributed_skellam", "epsilon": 1.0, "adaptive_clipping": True},
            SECURE,
            "fedavg",
            "privacy.adaptive_clipping",
        ),
    ],
)
def test_bad_distributed_settings_name_the_field(
    section: dict[str, Any], extra: dict[str, Any], algorithm: str, field: str
) -> None:
    settings_, errors = parse_privacy(
        {"privacy": section, **extra}, algorithm=algorithm, default_level="none"
    )

    assert settings_ is None
    assert field in errors, errors


@pytest.mark.django_db
def test_distributed_dp_without_secure_aggregation_is_400_over_rest(staff_client: Any) -> None:
    response = staff_client.post(
        "/api/training/start",
        {
            "name": "ddp",
            "model_type": "logreg",
            "input_dim": 4,
            "num_classes": 3,
            "privacy": {"mechanism": "distributed_skellam", "epsilon": 2.0},
        },
        content_type="application/json",
    )

    assert response.status_code == 400, response.content
    assert "secure aggregation" in response.json()["error"]["details"]["privacy.mode"]


# ---------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------
def test_the_accountant_adds_the_paper_bound_order_by_order() -> None:
    event = skellam_round_event(parameters=PARAMETERS, noise_agents=10)
    accountant = RdpAccountant()

    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 7))

    orders = np.asarray(accountant._orders)
    expected = 7 * skellam_rdp(
        orders, l1_sensitivity=event.l1_sensitivity, l2_sensitivity=event.l2_sensitivity, mu=event.mu
    )
    np.testing.assert_allclose(accountant._rdp, expected, rtol=1e-14)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(orders, expected, 1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(epsilon, rel=1e-14)


def test_replace_one_doubles_the_sensitivities_and_counts_the_noise_of_n_agents() -> None:
    event = skellam_round_event(parameters=PARAMETERS, noise_agents=10)
    paper = skellam_round_event(parameters=PARAMETERS, noise_agents=10, replace_one=False)

    assert event.l2_sensitivity == pytest.approx(2 * PARAMETERS.l2_sensitivity)
    assert event.l1_sensitivity == pytest.approx(2 * PARAMETERS.l1_sensitivity)
    assert event.mu == paper.mu == 10 * PARAMETERS.agent_mu
    assert paper.l2_sensitivity == PARAMETERS.l2_sensitivity


def test_gaussian_accounting_is_unchanged_by_the_skellam_aware_accountant() -> None:
    event = round_event(mechanism="gaussian", noise_multiplier=1.1, sampling_probability=0.1)
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(event, 40))

    assert composed_epsilon([event] * 40, delta=1e-5, accountant="rdp") == pytest.approx(
        reference.get_epsilon(1e-5), rel=1e-12
    )


def test_pld_cannot_account_a_skellam_round() -> None:
    event = skellam_round_event(parameters=PARAMETERS, noise_agents=5)

    with pytest.raises(AccountingError, match="cannot account SkellamDpEvent"):
        composed_epsilon([event], delta=1e-5, accountant="pld")


@pytest.mark.parametrize(("epsilon", "rounds", "agents"), [(1.0, 10, 20), (3.0, 50, 10), (8.0, 200, 100)])
def test_calibration_and_its_inverse_round_trip(epsilon: float, rounds: int, agents: int) -> None:
    common = {"rounds": rounds, "noise_agents": agents, "delta": 1e-5}

    mu = calibrate_skellam_mu(epsilon=epsilon, clip_norm=1.0, scale=30.0, dimension=1000, **common)

    parameters = SkellamParameters(clip_norm=1.0, scale=30.0, agent_mu=mu, bits=32, dimension=1000)
    spent = skellam_epsilon(parameters=parameters, **common)
    assert epsilon * (1 - 1e-4) <= spent <= epsilon
    weaker = SkellamParameters(clip_norm=1.0, scale=30.0, agent_mu=mu * (1 - 1e-4), bits=32, dimension=1000)
    assert skellam_epsilon(parameters=weaker, **common) > epsilon


def test_noise_needed_per_agent_falls_as_one_over_n() -> None:
    kwargs = {"epsilon": 2.0, "delta": 1e-5, "rounds": 20, "clip_norm": 1.0, "scale": 30.0, "dimension": 1000}

    mu_10 = calibrate_skellam_mu(noise_agents=10, **kwargs)
    mu_40 = calibrate_skellam_mu(noise_agents=40, **kwargs)

    assert mu_10 / mu_40 == pytest.approx(4.0, rel=1e-5)  # the accountant sees only n mu


def test_chosen_scale_fills_the_modulus_and_no_more() -> None:
    kwargs = {
        "epsilon": 3.0,
        "delta": 1e-5,
        "rounds": 20,
        "noise_agents": 10,
        "clip_norm": 1.0,
        "dimension": 4000,
    }

    parameters = calibrate_skellam(summed_agents=20, bits=18, **kwargs)

    def bound(p: SkellamParameters) -> float:
        return aggregate_coordinate_bound(
            num_agents=20,
            clip_norm=1.0,
            scale=p.scale,
            dimension=4000,
            agent_mu=p.agent_mu,
            stddevs=overflow_stddevs(4000),
        )

    assert bound(parameters) <= 2**17
    larger_scale = 1.01 * parameters.scale
    mu = calibrate_skellam_mu(scale=larger_scale, **kwargs)
    assert (
        bound(SkellamParameters(clip_norm=1.0, scale=larger_scale, agent_mu=mu, bits=18, dimension=4000))
        > 2**17
    )
    assert skellam_epsilon(parameters=parameters, noise_agents=10, rounds=20, delta=1e-5) <= 3.0


def test_too_few_bits_are_refused() -> None:
    with pytest.raises(AccountingError, match="raise bits"):
        calibrate_skellam(
            epsilon=1.0,
            delta=1e-5,
            rounds=100,
            noise_agents=5,
            summed_agents=1000,
            clip_norm=1.0,
            dimension=100_000,
            bits=8,
        )


def test_rounds_affordable_counts_skellam_rounds() -> None:
    event = skellam_round_event(parameters=PARAMETERS, noise_agents=10)

    k = rounds_affordable([], event, epsilon=4.0, delta=1e-5, accountant="rdp")

    assert k >= 1
    assert composed_epsilon([event] * k, delta=1e-5, accountant="rdp") <= 4.0
    assert composed_epsilon([event] * (k + 1), delta=1e-5, accountant="rdp") > 4.0


# ---------------------------------------------------------------------------------------------------------
# The budget, the ledger and the guard
# ---------------------------------------------------------------------------------------------------------
def _distributed_budget(training: Training, *, epsilon: float = 4.0, rounds: int = 6) -> PrivacyBudget:
    settings_, errors = parse_privacy(
        {"privacy": {"mechanism": "distributed_skellam", "epsilon": epsilon, "min_agents": 2}, **SECURE},
        algorithm="fedavg",
        default_level="none",
    )
    assert errors == {} and settings_ is not None
    return budget_create(
        training=training, settings_=settings_, planned_rounds=rounds, expected_clients=3, population=3
    )


@pytest.mark.django_db
def test_budget_is_calibrated_and_the_ledger_spends_it_in_the_planned_rounds(make_training: Any) -> None:
    training = make_training(start=False)
    budget = _distributed_budget(training)

    assert (budget.mode, budget.mechanism, budget.accountant) == ("distributed", "skellam", "rdp")
    assert budget.dimension == 15 and budget.noise_agents == 2 and budget.bits == 20
    parameters = SkellamParameters(
        clip_norm=1.0, scale=budget.skellam_scale, agent_mu=budget.skellam_agent_mu, bits=20, dimension=15
    )
    event = skellam_round_event(parameters=parameters, noise_agents=2)
    assert budget.noise_multiplier == pytest.approx(
        math.sqrt(2 * 2 * budget.skellam_agent_mu) / budget.skellam_scale
    )
    epsilons = []
    for number in range(1, 7):
        next_event, q = budget_next_event(budget, eligible=3)
        assert next_event == event and q == 1.0
        allowed, _ = budget_allows(budget, next_event)
        assert allowed
        epsilons.append(
            ledger_record(budget=budget, round_number=number, sampling_probability=q).epsilon_after
        )
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 6))
    assert epsilons[-1] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert epsilons == sorted(epsilons) and 4.0 * (1 - 1e-3) <= epsilons[-1] <= 4.0
    allowed, next_epsilon = budget_allows(budget, event)
    assert not allowed and next_epsilon > 4.0
    entry = budget.ledger.get(round_number=3)
    assert entry.sampling_probability == 1.0 and entry.event["class_name"] == "SkellamDpEvent"
    assert entry.event["mu"] == pytest.approx(2 * budget.skellam_agent_mu)
    report = privacy_report(training)
    assert report["rounds_affordable"] == 0 and report["mechanism"] == "skellam"
    assert report["distributed"]["agent_mu"] == budget.skellam_agent_mu
    assert ledger_record(budget=budget, round_number=3, sampling_probability=1.0).pk == entry.pk  # idempotent


@pytest.mark.django_db
def test_guard_opens_an_affordable_round_and_never_an_overspending_one(
    make_training: Any, make_agent: Any
) -> None:
    for _ in range(3):
        make_agent()
    affordable = make_training(start=False)
    _distributed_budget(affordable)
    spent = make_training(start=False)
    budget = _distributed_budget(spent)
    for number in range(1, 7):  # six released rounds: the calibrated budget is spent
        ledger_record(budget=budget, round_number=number, sampling_probability=1.0)
    from trainings.services import training_start

    training_start(training_id=affordable.pk)
    training_start(training_id=spent.pk)

    affordable.refresh_from_db()
    spent.refresh_from_db()
    assert affordable.status == Training.Status.RUNNING
    assert Round.objects.get(training=affordable, number=1).status == Round.Status.COLLECTING
    assert spent.status == Training.Status.BUDGET_EXHAUSTED
    assert Round.objects.get(training=spent, number=1).status == Round.Status.CANCELLED
    assert not Round.objects.get(training=spent, number=1).tasks.exists()
    assert budget.ledger.count() == 6


@pytest.mark.django_db
def test_a_budget_the_modulus_cannot_hold_is_refused(make_training: Any) -> None:
    from fedsite.errors import ValidationFailed

    training = make_training(start=False)
    settings_, _ = parse_privacy(
        {
            "privacy": {"mechanism": "distributed_skellam", "epsilon": 0.1, "bits": 8, "min_agents": 1},
            **SECURE,
        },
        algorithm="fedavg",
        default_level="none",
    )
    with pytest.raises(ValidationFailed, match="raise bits"):
        budget_create(
            training=training, settings_=settings_, planned_rounds=500, expected_clients=500, population=500
        )
    assert not PrivacyBudget.objects.filter(training=training).exists()


# ---------------------------------------------------------------------------------------------------------
# validate_privacy
# ---------------------------------------------------------------------------------------------------------
def test_distributed_check_passes_and_fails_without_noise() -> None:
    report = check_distributed(trials=3, seed=2)
    assert report.passed, report

    with noise_switched_off():
        broken = check_distributed(trials=3, seed=2)

    assert not broken.passed
    assert all(not check.passed for check in broken.statistical)
    assert all(check.passed for check in broken.analytic)  # the accounting does not see the noise


def test_validate_privacy_distributed_section() -> None:
    out = io.StringIO()
    call_command("validate_privacy", "--quick", "--sections", "distributed", stdout=out)
    assert "All privacy checks passed." in out.getvalue()

    with pytest.raises(CommandError, match="FAILED in: distributed"):
        call_command(
            "validate_privacy", "--quick", "--sections", "distributed", "--break-noise", stdout=io.StringIO()
        )


def test_skellam_event_is_a_dp_accounting_event() -> None:
    event = SkellamDpEvent(l1_sensitivity=4.0, l2_sensitivity=2.0, mu=10.0)
    assert event.to_named_tuple().class_name == "SkellamDpEvent"
    assert hash(event) == hash(SkellamDpEvent(l1_sensitivity=4.0, l2_sensitivity=2.0, mu=10.0))


def test_the_documented_epsilon_table() -> None:
    from privacy.validation import distributed_epsilon_table

    reference, rows = distributed_epsilon_table(dimension=500, mu_factors=(0.5, 1.0, 4.0), rounds=(1, 20))

    calibrated = next(row for row in rows if row["factor"] == 1.0)
    assert 3.0 * (1 - 1e-3) <= calibrated["skellam_20"] <= 3.0
    for row in rows:
        assert row["skellam_20"] >= row["gaussian_20"] - 1e-9
        assert row["skellam_1"] < row["skellam_20"]
    assert [row["skellam_20"] for row in rows] == sorted((row["skellam_20"] for row in rows), reverse=True)
    assert reference.dimension == 500
