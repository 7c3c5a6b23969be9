"""Drive real rounds over the agent protocol (REST) with an eager Celery, for the versioning tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from flcore.parameters import ParameterSpec, to_bytes


@pytest.fixture
def run_round(
    client: Any, eager_celery: Any, django_capture_on_commit_callbacks: Any
) -> Callable[..., list[dict[str, Any]]]:
    """Every agent polls its task and uploads a delta of ``values[i]`` everywhere (plus metrics)."""

    def run(training: Any, tokens: list[str], values: list[float], **metrics: float) -> list[dict[str, Any]]:
        spec = ParameterSpec.from_json(training.parameter_spec)
        payloads = []
        with django_capture_on_commit_callbacks(execute=True):
            for token, value in zip(tokens, values, strict=True):
                task = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
                assert task.status_code == 200, task.content
                payloads.append(task.json())
                rng = np.random.default_rng(int(abs(value) * 1000) + len(payloads))
                delta = {
                    t.name: (value + 0.1 * rng.standard_normal(t.shape)).astype(np.float32)
                    for t in spec.tensors
                }
                upload = client.post(
                    f"/api/v1/agent/tasks/{task.json()['task_id']}/update",
                    {
                        "update": SimpleUploadedFile("u.safetensors", to_bytes(delta)),
                        "meta": json.dumps({"num_examples": 10, "metrics": metrics}),
                    },
                    HTTP_AUTHORIZATION=f"Bearer {token}",
                )
                assert upload.status_code == 201, upload.content
        training.refresh_from_db()
        return payloads

    return run


@pytest.fixture(autouse=True)
def _own_blob_store(settings: Any, tmp_path: Any) -> None:
    """Each test its own blob store: content-addressed blobs (version 0 of a seed) are shared otherwise,
    and the corruption tests damage files on disk."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
