"""Export (zip with weights and a model card) and verified downloads; a corrupted blob is never served."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest

from flcore.models import ModelSpec, build_model
from flcore.parameters import from_bytes
from monitoring.models import Alert, AuditLog
from versioning.blobs import blob_local_path, blob_read


@pytest.fixture
def trained(make_agent: Any, make_training: Any, run_round: Any) -> Any:
    tokens = [make_agent()[1], make_agent()[1]]
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=2)
    run_round(training, tokens, [1.0, 2.0], eval_accuracy=0.4, eval_num_examples=10)
    run_round(training, tokens, [0.5, 0.5], eval_accuracy=0.6, eval_num_examples=10)
    return training


def _zip(response: Any) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))


@pytest.mark.django_db
def test_export_is_a_zip_of_the_weights_and_a_model_card(staff_client: Any, trained: Any) -> None:
    version = trained.versions.get(number=2)
    response = staff_client.get(f"/api/v1/versions/{version.pk}/export/")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/zip"
    bundle = _zip(response)
    assert sorted(bundle.namelist()) == ["model_card.json", "weights.safetensors"]
    weights = bundle.read("weights.safetensors")
    assert hashlib.sha256(weights).hexdigest() == version.blob_sha256
    card = json.loads(bundle.read("model_card.json"))
    assert card["version"]["sha256"] == version.blob_sha256
    assert card["version"]["number"] == 2
    assert card["version"]["metrics"]["federated_accuracy"] == pytest.approx(0.6)
    assert card["round"]["number"] == 2 and card["round"]["status"] == "completed"
    assert card["training"]["config"]["max_rounds"] == 2
    assert [p["number"] for p in card["parent_chain"]] == [1, 0]
    assert card["parent_chain"][0]["sha256"] == trained.versions.get(number=1).blob_sha256
    assert "privacy" not in card  # no budget, nothing spent
    # the spec rebuilds the model with flcore, and the weights load into it
    model = build_model(ModelSpec.from_json(card["model"]["spec"]))
    parameters = from_bytes(weights, spec=model.parameter_spec(), max_bytes=len(weights))
    stored = from_bytes(blob_read(version.blob_name), spec=model.parameter_spec(), max_bytes=len(weights))
    assert all(np.array_equal(parameters[k], stored[k]) for k in stored)
    assert AuditLog.objects.filter(action="version.export", object_id=str(version.pk)).exists()


@pytest.mark.django_db
def test_export_of_a_private_training_reports_the_privacy_spent(
    staff_client: Any, make_agent: Any, make_training: Any, run_round: Any
) -> None:
    tokens = [make_agent()[1], make_agent()[1]]
    training = make_training(
        min_clients_per_round=2,
        max_clients_per_round=2,
        max_rounds=2,
        privacy={"mode": "central", "epsilon": 8.0, "delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 1.0},
    )
    run_round(training, tokens, [0.1, 0.2])
    version = training.versions.get(number=1)
    card = json.loads(
        _zip(staff_client.get(f"/api/v1/versions/{version.pk}/export/")).read("model_card.json")
    )
    assert card["privacy"]["epsilon_budget"] == 8.0
    assert card["privacy"]["epsilon_spent"] == pytest.approx(version.metrics["privacy_epsilon_spent"])
    assert card["privacy"]["epsilon_spent"] > 0


def _corrupt(version: Any) -> None:
    path = blob_local_path(version.blob_name)
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    data[-1] ^= 0xFF
    with open(path, "wb") as handle:
        handle.write(bytes(data))


@pytest.mark.django_db
@pytest.mark.parametrize("route", ["export", "download"])
def test_a_corrupted_blob_is_refused_with_an_alert(staff_client: Any, trained: Any, route: str) -> None:
    version = trained.versions.get(number=2)
    _corrupt(version)
    response = staff_client.get(f"/api/v1/versions/{version.pk}/{route}/")
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "blob_corrupted"
    assert "corrupted" in error["message"] and version.blob_sha256 in error["message"]
    alert = Alert.objects.get(training=trained, kind=Alert.Kind.SYSTEM)
    assert alert.severity == Alert.Severity.CRITICAL and alert.details["version"] == 2
    assert not AuditLog.objects.filter(action=f"version.{route}", object_id=str(version.pk)).exists()


@pytest.mark.django_db
def test_download_serves_verified_weights(staff_client: Any, trained: Any) -> None:
    version = trained.versions.get(number=1)
    response = staff_client.get(f"/api/v1/versions/{version.pk}/download/")
    assert response.status_code == 200
    assert hashlib.sha256(b"".join(response.streaming_content)).hexdigest() == version.blob_sha256
    assert response["ETag"] == f'"{version.blob_sha256}"'
    assert AuditLog.objects.filter(action="version.download", object_id=str(version.pk)).exists()
