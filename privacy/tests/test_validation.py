"""``manage.py validate_privacy``: passes on the real code, fails when the noise is switched off, and its
statistics (Clopper-Pearson, the epsilon lower bound) agree with hand-computed values."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from flcore.dp import mechanisms
from privacy.validation import (
    QUICK_ACCOUNTANT_GRID,
    AccountantSetting,
    check_accountants,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound,
    noise_switched_off,
    prv_available,
    run_audit,
)


def test_quick_validation_passes() -> None:
    out = io.StringIO()

    call_command("validate_privacy", "--quick", stdout=out)

    text = out.getvalue()
    assert "All privacy checks passed." in text
    assert "FAIL" not in text


def test_break_noise_fails_and_the_audit_bound_exceeds_the_accounted_epsilon() -> None:
    out = io.StringIO()

    with pytest.raises(CommandError, match="FAILED in: mechanisms, audit"):
        call_command(
            "validate_privacy", "--quick", "--break-noise", "--sections", "mechanisms,audit", stdout=out
        )

    text = out.getvalue()
    bound = float(re.search(r"empirical epsilon lower bound\s+([0-9.]+)", text).group(1))
    rdp, pld = (
        float(x) for x in re.search(r"accounted epsilon, RDP / PLD\s+([0-9.]+) / ([0-9.]+)", text).groups()
    )
    assert bound > max(rdp, pld)


def test_break_noise_is_undone_after_the_command() -> None:
    with noise_switched_off():
        assert not mechanisms.gaussian_noise((10,), 1.0, np.random.default_rng(0)).any()

    assert mechanisms.gaussian_noise((10,), 1.0, np.random.default_rng(0)).any()


def test_unknown_section_is_refused() -> None:
    with pytest.raises(CommandError, match="Unknown sections"):
        call_command("validate_privacy", "--sections", "mechanism", stdout=io.StringIO())


@pytest.mark.parametrize(
    ("successes", "trials", "alpha", "lower", "upper"),
    [
        # The textbook exact 95% interval for 5 of 10 (two one-sided 97.5% bounds).
        (5, 10, 0.025, 0.187086, 0.812914),
        # k = 0: upper = 1 - alpha^(1/n); k = n: lower = alpha^(1/n).
        (0, 1000, 0.05, 0.0, 1 - 0.05 ** (1 / 1000)),
        (20, 20, 0.05, 0.05 ** (1 / 20), 1.0),
        # 1 of 4 at 95% one-sided: upper solves (1-p)^4 + 4p(1-p)^3 = 0.05.
        (1, 4, 0.05, 1 - 0.95 ** (1 / 4), 0.751395),
    ],
)
def test_clopper_pearson_matches_hand_values(
    successes: int, trials: int, alpha: float, lower: float, upper: float
) -> None:
    assert clopper_pearson_lower(successes, trials, alpha=alpha) == pytest.approx(lower, abs=1e-6)
    assert clopper_pearson_upper(successes, trials, alpha=alpha) == pytest.approx(upper, abs=1e-6)


def test_clopper_pearson_upper_covers_the_true_rate() -> None:
    rng = np.random.default_rng(0)
    p, n, alpha = 0.03, 200, 0.05

    covered = [clopper_pearson_upper(int(k), n, alpha=alpha) >= p for k in rng.binomial(n, p, size=2000)]

    assert np.mean(covered) >= 1 - alpha  # exact intervals are conservative


@pytest.mark.parametrize(
    ("fpr", "fnr", "delta", "expected"),
    [
        (0.01, 0.2, 0.0, math.log(0.8 / 0.01)),
        (0.2, 0.01, 0.0, math.log(0.8 / 0.01)),
        (0.05, 0.05, 1e-5, math.log((1 - 1e-5 - 0.05) / 0.05)),
        (0.5, 0.5, 0.0, 0.0),  # a coin flip proves nothing
        (0.7, 0.6, 0.0, 0.0),  # worse than chance: clamped at 0
        (0.0, 0.3, 0.0, math.inf),  # no false positive at all: unbounded
    ],
)
def test_epsilon_lower_bound_formula(fpr: float, fnr: float, delta: float, expected: float) -> None:
    assert epsilon_lower_bound(
        false_positive_rate=fpr, false_negative_rate=fnr, delta=delta
    ) == pytest.approx(expected)


def test_audit_of_the_real_round_respects_the_accounted_epsilon() -> None:
    result = run_audit(trials=400, seed=1, noise_multiplier=1.0)

    assert result.passed
    assert 0 <= result.epsilon_lower_bound <= result.epsilon_pld <= result.epsilon_rdp


def test_audit_without_noise_proves_more_than_the_accounted_epsilon() -> None:
    with noise_switched_off():
        result = run_audit(trials=400, seed=1, noise_multiplier=2.0)

    assert (result.false_positives, result.false_negatives) == (0, 0)
    assert result.epsilon_lower_bound > result.epsilon_rdp
    assert not result.passed


@pytest.mark.skipif(
    not prv_available(), reason="prv-accountant not installed (requirements/privacy-validation.txt)"
)
def test_accountants_agree_with_the_prv_accountant() -> None:
    report = check_accountants(QUICK_ACCOUNTANT_GRID[:3])

    assert report.passed, report
    for check in report.checks:
        assert check.rdp_epsilon is not None and check.rdp_epsilon >= check.prv_lower
        assert check.prv_lower <= check.pld_epsilon <= check.prv_upper + check.pld_tolerance


@pytest.mark.skipif(
    not prv_available(), reason="prv-accountant not installed (requirements/privacy-validation.txt)"
)
def test_accountant_check_catches_a_wrong_epsilon(monkeypatch: pytest.MonkeyPatch) -> None:
    from privacy import validation

    real = validation._our_epsilon
    monkeypatch.setattr(
        validation, "_our_epsilon", lambda setting, accountant: 0.5 * real(setting, accountant)
    )

    report = check_accountants([AccountantSetting("gaussian", 1.0, 1.0, 1, 1e-5)])

    assert not report.passed


def test_missing_prv_accountant_fails_the_section_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from privacy import validation

    monkeypatch.setattr(validation, "prv_available", lambda: False)
    out = io.StringIO()

    with pytest.raises(CommandError, match="accountants"):
        call_command("validate_privacy", "--sections", "accountants", stdout=out)

    assert "pip install -r requirements/privacy-validation.txt" in out.getvalue()
