"""Comparing two versions over REST, checked against numpy on the decoded blobs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flcore.parameters import ParameterSpec, from_bytes
from monitoring.models import AuditLog
from versioning.blobs import blob_read
from versioning.models import ModelVersion


def _decoded(version: ModelVersion) -> dict[str, np.ndarray]:
    spec = ParameterSpec.from_json(version.training.parameter_spec)
    data = blob_read(version.blob_name)
    return {k: v.astype(np.float64) for k, v in from_bytes(data, spec=spec, max_bytes=len(data)).items()}


@pytest.fixture
def trained(make_agent: Any, make_training: Any, run_round: Any) -> Any:
    tokens = [make_agent()[1], make_agent()[1]]
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=3)
    run_round(training, tokens, [1.0, 3.0], eval_accuracy=0.5, eval_num_examples=10)
    run_round(training, tokens, [-2.0, 0.5], eval_accuracy=0.7, eval_num_examples=10)
    assert training.versions.count() == 3
    return training


@pytest.mark.django_db
def test_compare_matches_numpy_on_the_decoded_blobs(staff_client: Any, trained: Any) -> None:
    response = staff_client.get(f"/api/v1/trainings/{trained.pk}/versions/compare?a=0&b=2")
    assert response.status_code == 200, response.content
    body = response.json()
    a = _decoded(trained.versions.get(number=0))
    b = _decoded(trained.versions.get(number=2))
    assert [t["name"] for t in body["tensors"]] == list(a)
    for row in body["tensors"]:
        ta, tb = a[row["name"]], b[row["name"]]
        assert row["shape"] == list(ta.shape)
        assert row["l2_distance"] == pytest.approx(np.linalg.norm(tb - ta), rel=1e-9)
        assert row["max_abs_difference"] == pytest.approx(np.max(np.abs(tb - ta)), rel=1e-9)
        if np.linalg.norm(ta) > 0:
            assert row["relative_change"] == pytest.approx(np.linalg.norm(tb - ta) / np.linalg.norm(ta))
            cosine = ta.ravel() @ tb.ravel() / (np.linalg.norm(ta) * np.linalg.norm(tb))
            assert row["cosine_similarity"] == pytest.approx(cosine, rel=1e-9)
        else:  # a zero tensor (logreg bias at init) has no direction and no relative change
            assert row["relative_change"] is None and row["cosine_similarity"] is None
    flat_a = np.concatenate([v.ravel() for v in a.values()])
    flat_b = np.concatenate([v.ravel() for v in b.values()])
    overall = body["overall"]
    assert overall["l2_distance"] == pytest.approx(np.linalg.norm(flat_b - flat_a), rel=1e-9)
    assert overall["relative_change"] == pytest.approx(
        np.linalg.norm(flat_b - flat_a) / np.linalg.norm(flat_a), rel=1e-9
    )
    assert overall["cosine_similarity"] == pytest.approx(
        flat_a @ flat_b / (np.linalg.norm(flat_a) * np.linalg.norm(flat_b)), rel=1e-9
    )
    assert overall["max_abs_difference"] == pytest.approx(np.max(np.abs(flat_b - flat_a)), rel=1e-9)
    assert body["a"]["number"] == 0 and body["b"]["number"] == 2
    assert AuditLog.objects.filter(action="version.compare", object_id=str(trained.pk)).exists()


@pytest.mark.django_db
def test_compare_reports_metric_deltas(staff_client: Any, trained: Any) -> None:
    body = staff_client.get(f"/api/v1/trainings/{trained.pk}/versions/compare?a=1&b=2").json()
    m1, m2 = trained.versions.get(number=1).metrics, trained.versions.get(number=2).metrics
    deltas = body["metric_deltas"]
    assert deltas["federated_accuracy"]["delta"] == pytest.approx(
        m2["federated_accuracy"] - m1["federated_accuracy"]
    )
    assert deltas["federated_accuracy"]["delta"] == pytest.approx(0.2)
    assert set(deltas) == {k for k in set(m1) & set(m2)}


@pytest.mark.django_db
def test_same_version_is_identical(staff_client: Any, trained: Any) -> None:
    body = staff_client.get(f"/api/v1/trainings/{trained.pk}/versions/compare?a=2&b=2").json()
    assert body["overall"]["l2_distance"] == 0.0
    assert body["overall"]["cosine_similarity"] == pytest.approx(1.0)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("a=0", 400, "b"),
        ("b=1", 400, "a"),
        ("a=x&b=1", 400, "a"),
        ("a=0&b=-1", 400, "b"),
        ("a=0&b=99", 404, "b"),
        ("a=%C2%B3&b=1", 400, "a"),  # a superscript digit is not a number
        ("a=0&b=99999999999999999999", 400, "b"),
    ],
)
def test_bad_version_numbers_are_clear_4xx(
    staff_client: Any, trained: Any, query: str, status: int, field: str
) -> None:
    response = staff_client.get(f"/api/v1/trainings/{trained.pk}/versions/compare?{query}")
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert field in error["details"] and field in error["message"]


@pytest.mark.django_db
def test_compare_needs_staff_and_a_real_training(client: Any, staff_client: Any, trained: Any) -> None:
    from django.test import Client

    assert Client().get(f"/api/v1/trainings/{trained.pk}/versions/compare?a=0&b=1").status_code in (401, 403)
    missing = staff_client.get("/api/v1/trainings/not-a-uuid/versions/compare?a=0&b=1")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "training_not_found"
