"""The retention policy: exactly the right versions keep their blobs (checked against brute force), and its
configuration is validated with errors that name the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedsite.errors import ValidationFailed
from trainings.configuration import TrainingConfiguration
from versioning.retention import DEFAULTS, VersionFacts, retention_parse, versions_to_keep


def brute_force_keep(versions: list[VersionFacts], retention: dict[str, Any], metric: str) -> set[int]:
    """Each version judged on its own, straight from the definitions in docs/versioning.md."""

    def better(a: float, b: float) -> bool:
        return a < b if "loss" in metric else a > b

    kept = set()
    for v in versions:
        newer = sum(1 for w in versions if w.number > v.number)
        nobody_better = v.metric is not None and not any(
            w.metric is not None and better(w.metric, v.metric) for w in versions
        )
        if (
            v.protected
            or newer < retention["keep_last"]
            or (retention["keep_every"] is not None and v.number % retention["keep_every"] == 0)
            or (retention["keep_best"] and nobody_better)
        ):
            kept.add(v.number)
    return kept


def random_history(rng: np.random.Generator) -> tuple[list[VersionFacts], dict[str, Any], str]:
    size = int(rng.integers(0, 30))
    numbers = sorted(rng.choice(60, size=size, replace=False).tolist())
    # few distinct values, so ties for the best are common; None: a version without the metric
    values = [None, 0.1, 0.5, 0.5, 0.9, float(rng.random())]
    versions = [
        VersionFacts(
            number=int(n),
            metric=values[int(rng.integers(len(values)))],
            protected=bool(rng.random() < 0.15),
        )
        for n in numbers
    ]
    retention = {
        **DEFAULTS,
        "keep_last": int(rng.integers(0, 8)),
        "keep_every": None if rng.random() < 0.4 else int(rng.integers(1, 10)),
        "keep_best": bool(rng.random() < 0.7),
    }
    metric = "federated_loss" if rng.random() < 0.5 else "accuracy"
    return versions, retention, metric


def test_the_policy_keeps_exactly_what_brute_force_keeps_over_random_histories() -> None:
    rng = np.random.default_rng(20261201)
    checked_pruning = 0
    for _ in range(2000):
        versions, retention, metric = random_history(rng)
        kept = versions_to_keep(versions, retention, metric=metric)
        assert kept == brute_force_keep(versions, retention, metric), (versions, retention, metric)
        checked_pruning += len(versions) - len(kept)
    assert checked_pruning > 1000  # the histories do prune: the comparison is not between two "keep all"


def test_a_training_without_retention_keeps_every_version() -> None:
    versions = [VersionFacts(number=n) for n in range(10)]
    assert versions_to_keep(versions, None, metric="accuracy") == set(range(10))


def test_loss_like_metrics_keep_the_lowest_and_ties_are_all_kept() -> None:
    versions = [VersionFacts(0, 0.9), VersionFacts(1, 0.2), VersionFacts(2, 0.2), VersionFacts(3, 0.5)]
    policy = {**DEFAULTS, "keep_last": 0}
    assert versions_to_keep(versions, policy, metric="loss") == {1, 2}
    assert versions_to_keep(versions, policy, metric="accuracy") == {0}


def test_defaults_and_normalised_values() -> None:
    settings_, errors = retention_parse({"keep_every": 10, "update_blobs_hours": 2})
    assert errors == {}
    assert settings_ == {**DEFAULTS, "keep_every": 10, "update_blobs_hours": 2.0}
    assert retention_parse(None) == (None, {})


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"keep_last": -1}, "retention.keep_last"),
        ({"keep_last": True}, "retention.keep_last"),
        ({"keep_last": 2.5}, "retention.keep_last"),
        ({"keep_every": 0}, "retention.keep_every"),
        ({"keep_best": "yes"}, "retention.keep_best"),
        ({"metric": ""}, "retention.metric"),
        ({"update_blobs_hours": -1}, "retention.update_blobs_hours"),
        ({"update_blobs_hours": float("inf")}, "retention.update_blobs_hours"),
        ({"keep_forever": True}, "retention.keep_forever"),
        ([1, 2], "retention"),
    ],
)
def test_bad_retention_is_refused_naming_the_field(settings: Any, value: Any, field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        TrainingConfiguration.from_dict({"name": "t", "retention": value})
    assert field in caught.value.details, caught.value.details
    assert field in caught.value.message


def test_the_configuration_stores_the_validated_retention(settings: Any) -> None:
    configuration = TrainingConfiguration.from_dict({"name": "t", "retention": {"keep_last": 3}})
    assert configuration.to_dict()["retention"] == {**DEFAULTS, "keep_last": 3}
    assert TrainingConfiguration.from_dict({"name": "t"}).to_dict()["retention"] is None


@pytest.mark.django_db
def test_rest_refuses_bad_retention_with_a_400_naming_the_field(staff_client: Any) -> None:
    response = staff_client.post(
        "/api/v1/trainings/",
        {"name": "t", "start": False, "retention": {"keep_every": -3}},
        content_type="application/json",
    )
    assert response.status_code == 400, response.content
    assert "retention.keep_every" in response.json()["error"]["details"]
